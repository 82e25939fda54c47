"""A seeded tiny run on the tests' random tiny Llama (built in-process, nothing downloaded), and the comparison of
two runs' metrics.json and per-answer files apart from timings and the environment record: how a refactor shows
that it changed no number (issue 16).

    # before and after a change; the old checkout's package goes first on the path:
    git worktree add /tmp/before COMMIT
    PYTHONPATH=/tmp/before/src .venv/bin/python bench/same_metrics.py run /tmp/tiny-before
    .venv/bin/python bench/same_metrics.py run /tmp/tiny-after
    .venv/bin/python bench/same_metrics.py compare /tmp/tiny-before /tmp/tiny-after
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.helpers
from tests.helpers import build_model, build_tokenizer, differences, tiny_overrides, untimed  # noqa: E402

COMPARED_FILES = ("data/train.jsonl", "data/heldout.jsonl", "eval_*.jsonl")  # patterns under the run directory


def tiny_run(out: Path) -> None:
    from oocrlab import build_config, run_experiment

    model_dir = out / "model"
    tokenizer = build_tokenizer()
    build_model(len(tokenizer)).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    run_experiment(build_config(overrides=tiny_overrides(str(model_dir))), out / "run")


def compare(a: Path, b: Path) -> list[str]:
    found = differences(*(untimed(json.loads((r / "run" / "metrics.json").read_text())) for r in (a, b)), "metrics")
    for pattern in COMPARED_FILES:
        names = sorted({p.relative_to(r / "run") for r in (a, b) for p in (r / "run").glob(pattern)})
        for name in names:
            if not all((r / "run" / name).is_file() for r in (a, b)):
                found.append(f"{name}: only in one")
            elif (a / "run" / name).read_bytes() != (b / "run" / name).read_bytes():
                found.append(f"{name} differs")
    return found


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "run":
        tiny_run(Path(sys.argv[2]))
    elif len(sys.argv) == 4 and sys.argv[1] == "compare":
        found = compare(Path(sys.argv[2]), Path(sys.argv[3]))
        print("\n".join(found[:50]) or "the same metrics.json and answers, timings and the environment aside")
        sys.exit(1 if found else 0)
    else:
        sys.exit(__doc__)

"""GPU smoke check: the whole pipeline on a small random Llama on CUDA, in the default dtype (bf16
where the card has it) and with 8-bit and 4-bit loading (bitsandbytes). Prints one JSON line per case.

Usage (on a CUDA machine, from the repository root):
    python bench/gpu_smoke.py --out /tmp/gpu-smoke     # results also in /tmp/gpu-smoke/results.jsonl
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from oocrlab import build_config, run_experiment  # noqa: E402
from tests.helpers import build_model, build_tokenizer, tiny_overrides  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="directory for the runs (must not exist)")
    args = parser.parse_args()
    assert torch.cuda.is_available(), "this check needs a CUDA GPU"
    model_dir = tempfile.mkdtemp(prefix="oocrlab-small-llama-")
    tokenizer = build_tokenizer()
    build_model(len(tokenizer), hidden_size=256).save_pretrained(model_dir)  # bnb 4-bit wants dims >= its block size
    tokenizer.save_pretrained(model_dir)
    results = Path(args.out) / "results.jsonl"
    results.parent.mkdir(parents=True, exist_ok=True)

    def report(line: dict) -> None:
        print(json.dumps(line), flush=True)
        with results.open("a") as f:
            f.write(json.dumps(line) + "\n")

    failed = False
    for quantization in ("none", "8bit", "4bit"):
        cfg = build_config(overrides=tiny_overrides(model_dir) | {"model.quantization": quantization, "train.max_steps": 20})
        try:
            run = run_experiment(cfg, Path(args.out) / quantization)
        except Exception as e:  # try every case; the exit code says whether any failed
            report({"quantization": quantization, "error": f"{type(e).__name__}: {e}"})
            failed = True
            continue
        m = run.metrics()
        tuned, original = (m["probe"]["hidden"][c]["cos_hidden"]["mean"] for c in ("tuned", "original"))
        report({
            "quantization": quantization, "device": m["train"]["device"], "dtype": m["train"]["dtype"],
            "loss_first": m["train"]["loss_first"], "loss_last": m["train"]["loss_last"],
            "tokens_per_second": m["train"]["tokens_per_second"],
            "layer0_tuned_equals_original": tuned[0] == original[0],
            "max_layer_diff": max(abs(a - b) for a, b in zip(tuned, original)),
            "eval_parsed": m["eval"]["distance"]["tuned"]["n_parsed"],
        })
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()

"""Every write of a tiny run fails in turn, as a full disk (ENOSPC) and as a read-only file system (EROFS) (issue 20).

One uninterrupted run records its writes (tests/injection.py) and a copy of its directory as each stage starts.
Write k of stage S is then failed in `oocrlab run --resume` on a copy of the directory as S started (the writes that
create the run, in `oocrlab run --out`): the command must end with one line naming the cause and how to go on,
exit 2, and leave every file complete or absent. Then `oocrlab run --resume` without the fault runs until the next
stage starts, where the directory must equal the uninterrupted run's at that point, wall times aside: from there on
the resumed run is the uninterrupted one. After the last stage that is the finished run, metrics.json included."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import importlib
import io
import json
import os
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml

from oocrlab import experiment
from oocrlab.cli import main
from tests.helpers import UNTIMED, differences, one_line, set_flags, small_run_values, untimed
from tests.injection import Write, Writes

# the smallest budgets (test_faults.py's), one checkpoint (at step 2 of 3) and a one-point trajectory: every kind of
# file a run writes, as few times as it can
FLAGS = {"train.max_steps": 3, "train.checkpoints": 1, "train.trajectory": [0], "eval.max_cities": 2, "eval.near_cities": 1,
         "eval.free_form_samples": 1, "eval.in_context_docs": 1}
# in the report: each stage's wall time, the training's throughput, and the run's own path
VARIES = re.compile(r"\d[\d,.]*(?= s\b| tokens/s)|(?:/[\w.@+-]+){2,}")


# and how a resumed training's last call went (the same training, resumed from its checkpoint)
RESUMED = (*UNTIMED, "resumed_from_step", "tokens_seen")


def numbers(path: Path):
    """A metrics.json's numbers, those that differ between runs of the same computation aside."""
    return untimed(json.loads(path.read_text()), RESUMED)


def temporary(name: str) -> bool:
    """A file or directory written under a dotted name, to be renamed once complete (a run holds no other)."""
    return any(part.startswith(".") for part in name.split("/"))


# forked children and byte-for-byte comparisons: on the CPU, where a run of the tiny model is deterministic
pytestmark = pytest.mark.skipif(not hasattr(os, "fork") or torch.cuda.is_available(), reason="needs fork and a CPU-only run")


class Stop(BaseException):
    """The stage after the redone one started (not an Exception: nothing on the way catches it)."""


@contextlib.contextmanager
def stages(writes: Writes, snapshots: Path | None = None, stop_at: str | None = None):
    """Keeps `writes.stage` current; copies the run directory as each stage starts into snapshots/STAGE; stops
    the command when stage `stop_at` starts. Yields the stages started, in order."""
    real, started = experiment.run_stage, []

    def run_stage(name, cfg, run, models=None):
        if name == stop_at:
            raise Stop
        writes.stage = name
        started.append(name)
        if snapshots is not None:
            shutil.copytree(run.path, snapshots / name)
        return real(name, cfg, run, models)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(experiment, "run_stage", run_stage)
        yield started


@dataclass
class Reference:
    values: dict  # the config overrides it was made with
    out: Path
    states: dict[str, Path]  # the directory as each stage started ("create": before the run existed), then "end"
    writes: list[Write]

    def after(self, stage: str) -> tuple[str | None, Path]:
        """The stage after `stage` (None after the last) and the directory as it started."""
        names = list(self.states)
        following = names[names.index(stage) + 1]
        return (None if following == "end" else following), self.states[following]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_model_dir) -> Reference:
    root = tmp_path_factory.mktemp("reference")
    out, snapshots = root / "run", root / "snapshots"
    values = small_run_values(tiny_model_dir, **FLAGS)
    with Writes(out) as writes, stages(writes, snapshots) as started:
        assert main(["run", "--out", str(out), *set_flags(values)]) == 0
    states = {"create": root / "nothing"} | {name: snapshots / name for name in started} | {"end": out}
    return Reference(values, out, states, writes.seen)


def cli(argv: list[str]) -> int | str:
    """`oocrlab ARGV`'s exit code, or the exception that escaped it (a traceback a user would see)."""
    try:
        return main(argv)
    except Exception as e:
        return f"a traceback: {type(e).__name__}: {str(e)[:200]}"


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def files(directory: Path) -> dict[str, Path]:
    return {str(p.relative_to(directory)): p for p in sorted(directory.rglob("*")) if p.is_file()} if directory.exists() else {}


def readable(path: Path) -> bool:
    """Whether a file reads in full with the reader its kind has (for files no reference state holds)."""
    import safetensors.torch

    data = path.read_bytes()
    try:
        if path.suffix == ".json":
            json.loads(data)
        elif path.suffix == ".safetensors":
            safetensors.torch.load(data)
        elif path.suffix in (".pt", ".pth", ".bin"):
            torch.load(path, weights_only=False)
        else:
            return bool(data)
    except Exception:
        return False
    return True


def same_file(path: Path, versions: list[Path]) -> bool:
    """`path` equals one of `versions` (the same file in reference states), wall times aside."""
    if path.name == "metrics.json":
        try:
            return any(not differences(numbers(path), numbers(v)) for v in versions)
        except ValueError:
            return False
    if path.suffix == ".html":
        return any(VARIES.sub("#", path.read_text()) == VARIES.sub("#", v.read_text()) for v in versions)
    return digest(path) in {digest(v) for v in versions}


def incomplete(run: Path, reference: Reference) -> list[str]:
    """Files of `run` that are half-written: a temporary file left, a file that is none of the versions the
    uninterrupted run had, a checkpoint or adapter directory missing files."""
    found = []
    versions: dict[str, list[Path]] = {}
    for state in reference.states.values():
        for name, path in files(state).items():
            versions.setdefault(name, []).append(path)
    written = {w.path for w in reference.writes if not temporary(w.path)}
    for name, path in files(run).items():
        if temporary(name):
            found.append(f"{name}: a temporary file left behind")
        elif name in versions and not same_file(path, versions[name]):
            found.append(f"{name}: none of the versions the uninterrupted run wrote")
        elif name not in versions and not readable(path):
            found.append(f"{name}: does not read in full")
    for directory in [*run.glob("checkpoints/checkpoint-*"), *run.glob("trajectory/step-*"), run / "adapter"]:
        if directory.is_dir():  # every file the uninterrupted run had there (written there, or renamed in with it)
            inside = str(directory.relative_to(run)) + "/"
            missing = {name for name in [*versions, *written] if name.startswith(inside)} - set(files(run))
            if missing:
                found.append(f"{inside}: incomplete, without {sorted(missing)}")
    return found


def different(run: Path, state: Path) -> list[str]:
    """How `run` differs from a reference state, wall times aside."""
    mine, theirs = files(run), files(state)
    found = [f"{name}: only in one" for name in sorted(mine.keys() ^ theirs.keys())]
    for name in sorted(mine.keys() & theirs.keys()):
        if name == "metrics.json":  # the numbers, and which stages are recorded as finished
            found += differences(numbers(mine[name]), numbers(theirs[name]), name)
            found += differences(*(list(json.loads(p.read_text()).get("timings", {})) for p in (mine[name], theirs[name])), "timings")
        elif not same_file(mine[name], [theirs[name]]):
            found.append(f"{name} differs")
    return found


def state(run: Path) -> str:
    """What `--resume` starts from: the directory's files (and empty directories) and their contents, metrics.json's
    wall times aside but which stages it records as finished included."""
    parts = []
    for path in sorted(run.rglob("*")) if run.exists() else ():
        if path.is_dir():
            content = "a directory"
        elif path.name == "metrics.json":
            metrics = json.loads(path.read_text())
            content = json.dumps([numbers(path), list(metrics.get("timings", {}))])
        else:
            content = digest(path)
        parts.append(f"{path.relative_to(run)} {content}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def resume_argv(reference: Reference, stage: str, run: Path) -> list[str]:
    """The command that (re)starts `stage`: the first writes create the run."""
    return ["run", "--out", str(run), *set_flags(reference.values)] if stage == "create" else ["run", "--resume", str(run)]


def failed(reference: Reference, write: Write, code: int, returned, run: Path, capsys) -> list[str]:
    """What is wrong with how a command ended after `write` failed with `code` (the forked child's view)."""
    if returned != 2:
        return [f"exit {returned}"]
    try:
        line = one_line(capsys)
    except AssertionError as e:
        return [f"not one line: {str(e)[-300:]}"]
    causes = ("the disk is full", "is the disk full?", os.strerror(code)) if code == errno.ENOSPC else ("read-only", os.strerror(code))
    found = [] if any(cause in line for cause in causes) and ("--resume" in line or write.stage == "create") else [line]
    return found + incomplete(run, reference)


def redo(reference: Reference, stage: str, run: Path) -> list[str]:
    """`oocrlab run --resume` without the fault, up to the next stage: how the directory then differs from the
    uninterrupted run's."""
    following, then = reference.after(stage)
    returned = 0  # until the next stage started
    with Writes(run) as writes, stages(writes, stop_at=following), contextlib.suppress(Stop):
        returned = cli(resume_argv(reference, stage, run))
    return different(run, then) if returned == 0 else [f"exit {returned}"]


@pytest.fixture(scope="module")
def redone() -> dict[str, list[str]]:
    """A state faults left -> how resuming from it went (both tests' faults leave many of the same)."""
    return {}


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS], ids=["full-disk", "read-only"])
def test_every_write_fails_in_one_line_and_resume_reaches_the_uninterrupted_run(reference, redone, tmp_path, capsys, code):
    run, place = tmp_path / "run", tmp_path / "faults"
    with Writes(run, fork=code, place=place, after_fork=capsys.readouterr) as writes, stages(writes):
        try:
            returned = cli(resume_argv(reference, "create", run))
        finally:
            if writes.child is not None:  # a forked child, whose write `writes.child` failed: checked, then ended
                try:
                    write = reference.writes[writes.child]
                    problems = failed(reference, write, code, returned, run, capsys)
                    (place / f"{writes.child}.json").write_text(json.dumps({"problems": problems, "state": state(run)}))
                finally:
                    os._exit(0)
    # the parent's run: the same writes as the reference, none failed, and the same directory (the children's moved away)
    assert returned == 0 and writes.seen == reference.writes and different(run, reference.out) == []
    problems = []
    for n, write in enumerate(reference.writes):
        where = f"write {n} ({write.stage} stage, {write.kind} {write.path}, {errno.errorcode[code]})"
        if writes.exits[n] != 0 or not (place / f"{n}.json").exists():
            problems.append(f"{where}: the child ended with {writes.exits[n]}")
            continue
        child = json.loads((place / f"{n}.json").read_text())
        problems += [f"{where}: {p}" for p in child["problems"]]
        if child["state"] not in redone:  # resuming is a function of the state left: once per state
            redone[child["state"]] = redo(reference, write.stage, place / str(n) / "run")
        problems += [f"{where}, then --resume: {d}" for d in redone[child["state"]][:5]]
    assert not problems, f"{len(problems)} problems in {len(reference.writes)} writes:\n" + "\n".join(problems[:40])


# The corruption sweep: every file of the finished run (and of a checkpoint, in a run interrupted in training),
# cut to half or replaced by garbage of the same length, under every sub-command that reads it
DAMAGES = {"half": lambda data: data[: len(data) // 2], "garbage": lambda data: random.Random(len(data)).randbytes(max(len(data), 16))}


def commands(place: Path, reference: Reference) -> dict[str, list[str]]:
    """Every sub-command that reads a run, on place/sweep/seed-0: the one run of the sweep in place/sweep.yaml."""
    run = str(place / "sweep" / "seed-0")
    return {"resume": ["run", "--resume", run], "eval": ["eval", run], "probe": ["probe", run], "report": ["report", run],
            "compare": ["compare", run, str(reference.out), "--out", str(place / "compare.html")], "table": ["table", run],
            "vector": ["vector", run, "--layer", "1", "--out", str(place / "vector")], "sweep": ["sweep", str(place / "sweep.yaml")]}


def finished_copy(reference: Reference, place: Path) -> Path:
    """A copy of the finished run as a sweep's one run (seed 0, as the reference was made)."""
    run = place / "sweep" / "seed-0"
    shutil.copytree(reference.out, run)
    (place / "sweep.yaml").write_text(yaml.safe_dump({"out": str(place / "sweep"), "set": reference.values, "grid": {"seed": [0]}}))
    return run


def outputs(place: Path, printed: str) -> dict[str, bytes]:
    """What a sub-command wrote beside the run (a page, a vector, the sweep's summary) and printed, its place's path
    written as PLACE."""
    found = {name: path.read_bytes() for name, path in files(place).items() if not name.startswith("sweep/seed-0/")}
    found.pop("sweep.yaml")
    return {name: data.replace(str(place).encode(), b"PLACE") for name, data in (found | {"stdout": printed.encode()}).items()}


@pytest.fixture(scope="module")
def readers(reference, tmp_path_factory) -> dict[str, tuple[set[str], Path, dict[str, bytes]]]:
    """Per sub-command: the files of the finished run it reads, and, after it ran on an intact copy, the run directory
    and what it wrote elsewhere or printed (outputs)."""
    found = {}
    for name in commands(Path(), reference):
        place = tmp_path_factory.mktemp(f"intact-{name}")
        run = finished_copy(reference, place)
        with Writes(run) as writes, contextlib.redirect_stdout(io.StringIO()) as printed:
            assert main(commands(place, reference)[name]) == 0
        found[name] = (writes.read & set(files(reference.out)), run, outputs(place, printed.getvalue()))
    read = set().union(*(reads for reads, _, _ in found.values()))
    assert read >= {"config.yaml", "metrics.json", "data/train.jsonl", "data/heldout.jsonl", "adapter/adapter_model.safetensors",
                    "adapter/adapter_config.json", "train_log.jsonl", "probe_shift.safetensors"}
    return found


@pytest.mark.parametrize("damage", DAMAGES)
def test_every_file_of_a_finished_run_damaged_is_refused_in_one_line_or_recomputed(reference, readers, tmp_path, capsys, damage):
    problems, tried = [], 0
    for name in files(reference.out):
        for command, (reads, intact, intact_outputs) in readers.items():
            if name not in reads:
                continue
            place = tmp_path / f"{tried}"
            run = finished_copy(reference, place)
            (run / name).write_bytes(DAMAGES[damage]((run / name).read_bytes()))
            tried += 1
            capsys.readouterr()
            returned = cli(commands(place, reference)[command])
            where = f"{name} ({damage}) under {command}"
            if returned == 2:
                try:
                    one_line(capsys)
                except AssertionError as e:
                    problems.append(f"{where}: not one line: {str(e)[-300:]}")
            elif returned != 0:
                problems.append(f"{where}: {returned if isinstance(returned, str) else f'exit {returned}'}")
            else:  # it recomputed what it needs: the same run, pages, files and output as from the intact file
                problems += [f"{where}: exit 0, but {d}" for d in different(run, intact)[:3]]
                mine = outputs(place, capsys.readouterr().out)
                problems += [f"{where}: exit 0, but its {n} differs" for n in sorted(mine.keys() | intact_outputs.keys())
                             if mine.get(n) != intact_outputs.get(n)]
    assert not problems, f"{len(problems)} problems in {tried} damaged runs:\n" + "\n".join(problems[:40])


@pytest.fixture(scope="module")
def interrupted(reference, tmp_path_factory) -> Path:
    """The run as a full disk when saving the adapter leaves it: trained to the last step, its checkpoint (step 2)
    finished, no adapter."""
    training = importlib.import_module("oocrlab.train")  # the module (the package exports its train function)
    run = tmp_path_factory.mktemp("interrupted") / "run"
    shutil.copytree(reference.states["train"], run)
    real = training.save_adapter

    def full(model, target):  # the trajectory's snapshot is saved before, into trajectory/
        if target.name == "adapter":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(model, target)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(training, "save_adapter", full)
        assert main(["run", "--resume", str(run)]) == 2
    assert [p.name for p in (run / "checkpoints").glob("checkpoint-*")] == ["checkpoint-2"] and not (run / "adapter").exists()
    return run


@pytest.mark.parametrize("damage", DAMAGES)
def test_every_file_of_a_checkpoint_damaged_is_refused_in_one_line_or_recomputed(reference, interrupted, tmp_path, capsys, damage):
    """Resuming the training from a checkpoint one of whose files is damaged: one line, or the same training."""
    intact = tmp_path / "intact"
    shutil.copytree(interrupted, intact)
    with Writes(intact) as reads:
        assert redo(reference, "train", intact) == []  # resumed from the intact checkpoint: the uninterrupted run
    problems, tried = [], 0
    for name in sorted(n for n in reads.read if n.startswith("checkpoints/")):
        run = tmp_path / str(tried) / "run"
        shutil.copytree(interrupted, run)
        (run / name).write_bytes(DAMAGES[damage]((run / name).read_bytes()))
        tried += 1
        capsys.readouterr()
        found = redo(reference, "train", run)
        if found and found[0] == "exit 2":
            try:
                one_line(capsys)
            except AssertionError as e:
                problems.append(f"{name} ({damage}): not one line: {str(e)[-300:]}")
        else:
            problems += [f"{name} ({damage}): {d}" for d in found[:3]]
    assert {Path(n).name for n in reads.read} >= {"trainer_state.json", "adapter_model.safetensors", "optimizer.pt", "rng_state.pth"}
    assert not problems, f"{len(problems)} problems in {tried} damaged checkpoints:\n" + "\n".join(problems[:40])

"""Faults a new user meets, each one line on stderr and exit 2 with nothing lost or half-written (issue 20; a full
disk or read-only file system at every write, and every file damaged: tests/system/test_fault_injection.py): a
damaged config.yaml or metrics.json under --resume, an unwritable --out, a model directory that holds no model,
compare on a directory that is no finished run; `--resume RUN --from STAGE` redoes a stage and every one after it
(the way to retrain a damaged adapter); an interruption (Ctrl-C, SIGTERM) says that --resume continues."""

import errno
import json
import os
import signal
from pathlib import Path

import pytest
from safetensors import SafetensorError

from oocrlab import experiment
from oocrlab.cli import main
from tests.helpers import one_line, small_run_flags

FULL_DISK = 'Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })'


def files(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("damage, file, message", [
    ("train: [unclosed\n", "config.yaml", "config.yaml is damaged"),
    ("- a YAML list\n- of two items\n", "config.yaml", "not a mapping of config sections"),
    (None, "metrics.json", "metrics.json is damaged"),  # cut in half
    ("[1, 2]", "metrics.json", "not a JSON object"),
])
def test_a_damaged_run_file_under_resume_is_one_line_and_left_as_it_is(tmp_path, tiny_model_dir, capsys, damage, file, message):
    out = tmp_path / "run"
    assert main(["data", "--out", str(out), *small_run_flags(tiny_model_dir)]) == 0
    target = out / file
    target.write_bytes(target.read_bytes()[: len(target.read_bytes()) // 2] if damage is None else damage.encode())
    before = files(out)
    capsys.readouterr()
    for argv in (["run", "--resume", str(out)], ["eval", str(out)]):
        assert main(argv) == 2
        err = one_line(capsys)
        assert message in err and str(target) in err
    assert files(out) == before


@pytest.mark.parametrize("command", ["run", "data"])
@pytest.mark.parametrize("fails", ["mkdir", "write"])
def test_an_unwritable_out_is_one_line_and_leaves_nothing(tmp_path, tiny_model_dir, monkeypatch, capsys, command, fails):
    """A read-only file system (EROFS), when creating the run directory or writing into it."""
    import tempfile

    out = tmp_path / "read-only" / "run"
    original = Path.mkdir if fails == "mkdir" else tempfile.mkstemp

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(out))

    if fails == "mkdir":
        monkeypatch.setattr(Path, "mkdir", lambda self, *a, **k: read_only() if "read-only" in str(self) else original(self, *a, **k))
    else:
        monkeypatch.setattr(tempfile, "mkstemp", read_only)
    capsys.readouterr()
    assert main([command, "--out", str(out), *small_run_flags(tiny_model_dir)]) == 2
    assert "Read-only file system" in one_line(capsys) and not out.exists()


@pytest.mark.parametrize("holds, message", [([], "holds no model (no config.json)"),
                                            (["pytorch_model.bin"], "has no safetensors weights, only pytorch_model.bin")])
def test_a_model_directory_without_a_model_is_one_line(tmp_path, capsys, holds, message):
    model = tmp_path / "model"
    model.mkdir()
    for name in holds:
        (model / name).write_bytes(b"\x80\x02}q\x00.")  # a pickle
    for command in ("data", "run"):
        out = tmp_path / command
        assert main([command, "--out", str(out), "--model", str(model)]) == 2
        assert message in one_line(capsys) and not out.exists()


def test_compare_and_table_refuse_a_directory_that_is_no_finished_run(tmp_path, tiny_model_dir, capsys):
    started = tmp_path / "started"
    assert main(["data", "--out", str(started), *small_run_flags(tiny_model_dir)]) == 0
    (started / "metrics.json").unlink()  # as if killed before its first stage was recorded
    capsys.readouterr()
    for argv in (["compare", str(started), str(started), "--out", str(tmp_path / "c.html")], ["table", str(started)]):
        assert main(argv) == 2
        assert "has no metrics.json" in one_line(capsys)
    assert not (tmp_path / "c.html").exists()


def test_from_redoes_a_stage_and_every_one_after_it(tmp_path, tiny_model_dir, capsys):
    """With a fine-tuned control and a measured trajectory (whose snapshots are gone): a plain --resume keeps a finished
    control; --from controls retrains it and redoes the evaluation, keeping the adapter and the trajectory; a damaged
    adapter's message names --from train, which retrains it to the same losses and numbers."""
    out = tmp_path / "run"
    assert main(["run", "--out", str(out), *small_run_flags(tiny_model_dir, **{"train.controls": ["shuffled"], "train.trajectory": [0]})]) == 0
    first = json.loads((out / "metrics.json").read_text())
    adapter, control = out / "adapter" / "adapter_model.safetensors", out / "controls" / "shuffled" / "adapter" / "adapter_model.safetensors"
    names = {adapter: "adapter", control: "control", out / "eval_distance.jsonl": "eval"}
    stamps = {p: p.stat().st_mtime_ns for p in names}

    def changed():
        return {names[p] for p in stamps if p.stat().st_mtime_ns != stamps[p]}

    def metrics():
        return json.loads((out / "metrics.json").read_text())

    m = metrics()
    # as a `--from controls` killed while its controls stage ran leaves it (the measured trajectory is kept)
    m["timings"] = {k: v for k, v in m["timings"].items() if k in ("data", "train", "trajectory")}
    (out / "metrics.json").write_text(json.dumps(m))
    stamps = {p: p.stat().st_mtime_ns for p in stamps}
    assert main(["run", "--resume", str(out)]) == 0 and changed() == {"eval"}  # the finished control kept

    stamps = {p: p.stat().st_mtime_ns for p in stamps}
    assert main(["run", "--resume", str(out), "--from", "controls"]) == 0  # the adapter and its trajectory kept
    assert changed() == {"control", "eval"} and metrics()["trajectory"] == first["trajectory"]
    assert metrics()["eval"]["distance"] == first["eval"]["distance"] and list(metrics()["timings"]) == list(first["timings"])
    assert not (out / "controls" / "shuffled" / "trajectory").exists()  # a kept trajectory: the retrained control took no snapshot

    adapter.write_bytes(adapter.read_bytes()[:100])  # damaged: the message says how to retrain it, and that works
    capsys.readouterr()
    assert main(["eval", str(out)]) == 2
    assert f"`oocrlab run --resume {out} --from train`" in one_line(capsys)
    assert main(["run", "--resume", str(out), "--from", "train"]) == 0
    retrained = metrics()
    assert retrained["train"]["loss_last"] == first["train"]["loss_last"] and retrained["eval"]["distance"] == first["eval"]["distance"]
    assert [p["step"] for p in retrained["trajectory"]["by_adapter"]["tuned"]["points"]] == [0, first["train"]["steps"]]

    capsys.readouterr()
    assert main(["run", "--resume", str(out), "--from", "evaluate"]) == 2 and "not a stage" in one_line(capsys)
    assert main(["run", "--out", str(tmp_path / "new"), "--from", "train"]) == 2 and "--resume RUN --from train" in one_line(capsys)


@pytest.mark.parametrize("how, code", [("ctrl-c", 130), ("sigterm", 143)])
def test_an_interruption_says_that_resume_continues(tmp_path, tiny_model_dir, monkeypatch, capsys, how, code):
    out = tmp_path / "run"
    assert main(["data", "--out", str(out), *small_run_flags(tiny_model_dir)]) == 0
    run_stage = experiment.run_stage

    def interrupted(name, *args, **kwargs):
        if name == "sanity":
            if how == "ctrl-c":
                raise KeyboardInterrupt
            os.kill(os.getpid(), signal.SIGTERM)
        return run_stage(name, *args, **kwargs)

    monkeypatch.setattr(experiment, "run_stage", interrupted)
    capsys.readouterr()
    assert main(["run", "--resume", str(out)]) == code
    err = one_line(capsys)
    assert err.startswith("oocrlab: interrupted") and f"`oocrlab run --resume {out}` continues" in err
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # restored
    assert json.loads((out / "metrics.json").read_text())["timings"].keys() == {"data", "train", "controls"}  # kept


@pytest.mark.parametrize("error, fault", [
    (OSError(errno.ENOSPC, "No space left on device", "/r/x"), "the disk is full (/r/x)"),
    (OSError(errno.EROFS, "Read-only file system"), "the file system is read-only"),
    (SafetensorError(FULL_DISK), "the disk is full"),
    (RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 9889536 vs 9889428"), "is the disk full?"),
    (OSError(errno.ENOENT, "No such file or directory"), None),
    (RuntimeError("mat1 and mat2 shapes cannot be multiplied"), None),
])
def test_write_faults_are_told_apart_from_other_errors(error, fault):
    """torch.save's text is what a real full disk gave (`--out` on a 20 MB tmpfs, the embedded model, docs/faults.md)."""
    from oocrlab.rundir import write_fault

    found = write_fault(error)
    assert found is None if fault is None else fault in found

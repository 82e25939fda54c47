"""Interruption, on whole tiny runs: a run (an `oocrlab run` subprocess) killed with SIGKILL mid-training continues
from its last checkpoint to the adapter an uninterrupted training reaches, and nothing an unfinished stage wrote is
trusted. A checkpoint killed while saving: tests/unit/test_resume.py."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

from safetensors.torch import load_file

from oocrlab import STAGES, build_config, run_stage
from oocrlab.rundir import Run, read_jsonl
from oocrlab.train import last_checkpoint
from tests.helpers import tiny_overrides

STEPS = 300  # checkpoints at steps 50, 100, ...; a few seconds of training on the tiny model


def overrides(tiny_model_dir: str) -> dict:
    return tiny_overrides(tiny_model_dir) | {"train.max_steps": STEPS, "train.checkpoints": 5, "train.trajectory": [0, 64, 128]}


def oocrlab(*argv: str, **kwargs):
    return subprocess.Popen([sys.executable, "-m", "oocrlab.cli", *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, **kwargs)


def test_sigkill_mid_training_then_resume_reaches_the_uninterrupted_adapter(tmp_path, tiny_model_dir):
    settings = overrides(tiny_model_dir)
    killed = tmp_path / "killed"
    process = oocrlab("run", "--out", str(killed), *[a for k, v in settings.items() for a in ("--set", f"{k}={json.dumps(v)}")])
    deadline = time.monotonic() + 300
    while last_checkpoint(killed / "checkpoints") is None:
        assert process.poll() is None, process.communicate()[1][-2000:]
        assert time.monotonic() < deadline
        time.sleep(0.02)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    run = Run(killed)
    assert not run.adapter_dir.exists() and "train" not in run.finished_stages()
    # a snapshot the killed training took after its checkpoint is taken again: here an untrained one planted at step 64
    shutil.rmtree(run.trajectory_dir / "step-64", ignore_errors=True)
    shutil.copytree(run.trajectory_dir / "step-0", run.trajectory_dir / "step-64")

    resumed = oocrlab("run", "--resume", str(killed))
    _, err = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, err[-2000:]
    assert "continuing training from" in err
    assert run.finished_stages() == list(STAGES)
    assert not run.checkpoints_dir.exists()  # deleted once training was recorded
    metrics = run.metrics()["train"]
    assert metrics["resumed_from_step"] in range(50, STEPS, 50) and metrics["steps"] == STEPS
    assert [e["step"] for e in read_jsonl(run.train_log)] == list(range(1, STEPS + 1))  # the steps before the kill too
    points = {p["step"]: p for p in run.metrics()["trajectory"]["by_adapter"]["tuned"]["points"]}
    assert list(points) == [0, 64, 128, STEPS] and not run.trajectory_dir.exists()
    assert points[0]["z_change_by_layer"]["hidden"]["mean"] == [0.0] * 4 != points[64]["z_change_by_layer"]["hidden"]["mean"]

    cfg = build_config(overrides=settings)
    whole = Run.create(tmp_path / "whole", cfg)
    for stage in ("data", "train"):
        run_stage(stage, cfg, whole)
    assert (killed / "data" / "train.jsonl").read_bytes() == (whole.path / "data" / "train.jsonl").read_bytes()
    a, b = (load_file(r.adapter_dir / "adapter_model.safetensors") for r in (run, whole))
    assert a.keys() == b.keys()
    for name in a:
        assert (a[name] - b[name]).abs().max() <= 1e-5 * max(1.0, b[name].abs().max()), name


def test_resume_redoes_an_unrecorded_stage_and_refuses_other_flags(tmp_path, tiny_model_dir, capsys):
    from oocrlab.cli import main

    cfg = build_config(overrides=tiny_overrides(tiny_model_dir))
    run = Run.create(tmp_path / "r", cfg)
    for stage in ("data", "train"):
        run_stage(stage, cfg, run)
    timings = run.metrics()["timings"]
    del timings["train"]
    run.save_metrics("timings", timings)  # as if killed after the adapter was written, before it was recorded
    stale = (run.adapter_dir / "adapter_model.safetensors").stat().st_mtime_ns
    assert main(["run", "--resume", str(run.path), "--seed", "3"]) == 2
    assert "use it alone" in capsys.readouterr().err
    assert main(["run", "--resume", str(run.path)]) == 0
    assert run.finished_stages() == list(STAGES)
    assert (run.adapter_dir / "adapter_model.safetensors").stat().st_mtime_ns != stale  # retrained, not trusted

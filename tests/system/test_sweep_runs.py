"""`oocrlab sweep` on whole tiny runs: killed with SIGKILL mid-run (a subprocess) and run again, it resumes without
redoing finished runs; a changed sweep does not touch existing runs; a failing run leaves the others to finish.
The grid's names and refusals: tests/unit/test_sweep.py."""

import json
import os
import signal
import subprocess
import sys
import time

from oocrlab import STAGES, runs_table
from oocrlab.rundir import Run
from oocrlab.train import last_checkpoint
from tests.helpers import small_run_values, write_yaml


def test_killed_sweep_resumes_without_redoing_finished_runs(tmp_path, tiny_model_dir):
    out = tmp_path / "sweep"
    settings = small_run_values(tiny_model_dir, **{"train.max_steps": 150, "train.checkpoints": 2})
    config = write_yaml(tmp_path / "sweep.yaml", {"out": str(out), "set": settings, "grid": {"seed": [0, 1, 2]}})
    command = [sys.executable, "-m", "oocrlab.cli", "sweep", config]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 600
    while last_checkpoint(out / "seed-1" / "checkpoints") is None:  # the second run is mid-training
        assert process.poll() is None, process.communicate()[1][-2000:]
        assert time.monotonic() < deadline
        time.sleep(0.02)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    first = Run(out / "seed-0")
    assert first.finished_stages() == list(STAGES) and "train" not in Run(out / "seed-1").finished_stages()
    stamp = first.metrics_file.stat().st_mtime_ns

    again = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stderr[-2000:]
    assert ["seed-0: finished", "seed-1: resume", "seed-2: run"] == [
        line.removeprefix("[oocrlab] ") for line in again.stderr.splitlines() if line.startswith("[oocrlab] seed-")]
    assert first.metrics_file.stat().st_mtime_ns == stamp  # not redone
    assert all(Run(out / f"seed-{s}").finished_stages() == list(STAGES) for s in range(3))
    summary = json.loads((out / "sweep.json").read_text())
    (group,) = summary["groups"]
    # every run has this ratio (an unparseable or absurd answer is scored as the guess; the MAE over parsed
    # answers is undefined for a run that states no sane distance)
    assert group["runs"] == 3 and group["columns"]["tuned / best baseline"]["n"] == 3
    low, high = group["columns"]["tuned / best baseline"]["ci95"]
    assert low <= group["columns"]["tuned / best baseline"]["mean"] <= high
    assert (out / "compare.html").is_file() and "3 runs; sweep.json and compare.html" in again.stdout
    table = runs_table(str(out / "seed-*"))  # three real runs: a row each, the seed the one key that differs
    assert list(table["seed"]) == [0, 1, 2] and [c for c in table.columns if "." not in c] == ["run", "hidden_city", "seed"]
    assert list(table["distance_over_best_baseline.tuned"]) == [
        Run(out / f"seed-{s}").metrics()["eval"]["distance"]["tuned_mae_over_best_baseline"] for s in range(3)]


def test_a_changed_sweep_does_not_touch_existing_runs(tmp_path, tiny_model_dir, capsys):
    from oocrlab.cli import main

    out = tmp_path / "sweep"
    settings = small_run_values(tiny_model_dir)
    assert main(["sweep", write_yaml(tmp_path / "a.yaml", {"out": str(out), "set": settings, "grid": {"seed": [0]}})]) == 0
    stamp = (out / "seed-0" / "config.yaml").read_bytes()
    changed = settings | {"train.learning_rate": 5e-3}
    assert main(["sweep", write_yaml(tmp_path / "b.yaml", {"out": str(out), "set": changed, "grid": {"seed": [0]}})]) == 2
    assert "another config" in capsys.readouterr().err
    assert (out / "seed-0" / "config.yaml").read_bytes() == stamp


def test_a_failing_run_leaves_the_others_to_finish(tmp_path, tiny_model_dir, capsys):
    from oocrlab.cli import main

    out = tmp_path / "sweep"
    settings = small_run_values(tiny_model_dir, **{"train.max_steps": 6})
    config = write_yaml(tmp_path / "s.yaml", {"out": str(out), "set": settings, "grid": {"train.learning_rate": [1e12, 1e-2]}})
    assert main(["sweep", config]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("oocrlab: error: 1 of 2 runs failed") and "learning_rate-1000000000000.0" in err[-1]
    assert Run(out / "learning_rate-0.01").finished_stages() == list(STAGES)
    assert list(json.loads((out / "sweep.json").read_text())["failed"]) == ["learning_rate-1000000000000.0"]

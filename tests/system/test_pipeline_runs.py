"""Whole new tiny runs beyond the shared `tiny_run` (in-process, but each a run through the stages): the same
seed gives the same data bytes, losses and metrics; a run without held-out cities still writes every key. The
invariants of one tiny run: tests/unit/test_pipeline_tiny.py."""

import pytest

from oocrlab import build_config, run_experiment
from oocrlab.rundir import read_jsonl
from tests.helpers import tiny_overrides

TIMED = {"timings", "environment", "seconds", "tokens_per_second", "samples_per_second", "html", "plots"}


def assert_same_metrics(a, b, path=""):
    """Equal up to float noise (another test reruns the probe from the saved adapter), wall times aside."""
    if isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for key in a.keys() - TIMED:
            assert_same_metrics(a[key], b[key], f"{path}.{key}")
    elif isinstance(a, list):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_metrics(x, y, f"{path}[{i}]")
    elif isinstance(a, float):
        assert b == pytest.approx(a, rel=1e-5, abs=1e-6), path
    else:
        assert a == b, path


def test_same_seed_same_data_and_metrics(tiny_run, tmp_path):
    """Determinism on the CPU: a second run of the same config gives the same data bytes, losses and metrics."""
    cfg, run = tiny_run
    again = run_experiment(cfg, tmp_path / "again")
    assert again.train_file.read_bytes() == run.train_file.read_bytes()
    assert read_jsonl(again.train_log) == read_jsonl(run.train_log)
    assert (again.path / "eval_distance.jsonl").read_bytes() == (run.path / "eval_distance.jsonl").read_bytes()
    assert_same_metrics(run.metrics(), again.metrics())


def test_no_heldout_cities_still_writes_every_key(tmp_path, tiny_model_dir):
    cfg = build_config(overrides=tiny_overrides(tiny_model_dir) | {"data.heldout_fraction": 0.0})
    run = run_experiment(cfg, tmp_path / "r", stages=("data", "train", "controls", "eval"))
    d = run.metrics()["eval"]["distance"]
    assert d["tuned"]["n"] == 0 and d["tuned"]["mae_km"] is None and d["constant_guess"]["mae_km"] is None
    assert "heldout_fraction is 0" in d["note"]

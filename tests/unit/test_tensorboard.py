"""`--report-to tensorboard`: the Trainer's loss series (the run's and a control's) in event files the tensorboard
package reads back, equal to train_log.jsonl; the headline numbers as scalars equal to metrics.json; without
the package, one line saying how to install it and no run directory."""

import importlib.util
import json
import shutil

import pytest
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from oocrlab.cli import main
from oocrlab.rundir import read_jsonl
from oocrlab.sentences import headline_measures
from tests.helpers import tiny_overrides


def scalars(directory, tag):
    events = EventAccumulator(str(directory))
    events.Reload()
    return [(e.step, e.value) for e in events.Scalars(tag)]


def asking_for_tensorboard(tiny_run, tmp_path):
    """A copy of the shared tiny run whose config asks for TensorBoard (the report writes the scalars)."""
    _, run = tiny_run
    copy = tmp_path / "copy"
    shutil.copytree(run.path, copy)
    config = yaml.safe_load((copy / "config.yaml").read_text())
    config["train"]["report_to"] = "tensorboard"
    (copy / "config.yaml").write_text(yaml.safe_dump(config))
    return copy


def test_training_curves_of_the_run_and_its_control(tmp_path, tiny_model_dir):
    out = tmp_path / "run"
    sets = [a for k, v in tiny_overrides(tiny_model_dir).items() for a in ("--set", f"{k}={json.dumps(v)}")]
    assert main(["data", "--out", str(out), "--report-to", "tensorboard", *sets]) == 0
    assert main(["train", str(out)]) == 0 and main(["controls", str(out)]) == 0
    for trained in (out, out / "controls" / "shuffled"):
        log = read_jsonl(trained / "train_log.jsonl")
        assert scalars(trained / "tensorboard", "train/loss") == [(e["step"], pytest.approx(e["loss"], rel=1e-6)) for e in log]
        assert [s for s, _ in scalars(trained / "tensorboard", "train/learning_rate")] == [e["step"] for e in log]
        assert len(scalars(trained / "tensorboard", "train/grad_norm")) == len(log) == 4


def test_headline_numbers_as_scalars(tiny_run, tmp_path):
    copy = asking_for_tensorboard(tiny_run, tmp_path)
    assert main(["report", str(copy)]) == 0 and main(["report", str(copy)]) == 0  # the second replaces the first's
    metrics = json.loads((copy / "metrics.json").read_text())
    measures = headline_measures(metrics)
    assert len(measures) >= 8
    for measure in measures:
        for condition in ("tuned", "original", "shuffled"):
            if (value := measure.stats.get(condition, {}).get(measure.stat)) is not None:
                assert scalars(copy / "tensorboard" / "headline", f"headline/{measure.key}/{condition}") == [
                    (metrics["train"]["steps"], pytest.approx(value, rel=1e-6))]


def test_without_the_package_one_line_and_nothing_written(tiny_run, tmp_path, tiny_model_dir, monkeypatch, capsys):
    """A new run, and a stage command on a run that asked for it (its report would write the scalars)."""
    copy = asking_for_tensorboard(tiny_run, tmp_path)
    before = {p: p.read_bytes() for p in copy.rglob("*") if p.is_file()}
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else find_spec(name, *a))
    out = tmp_path / "run"
    for argv in (["run", "--out", str(out), "--report-to", "tensorboard", "--model", tiny_model_dir], ["report", str(copy)]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "pip install 'oocrlab[tensorboard]'" in err
    assert not out.exists() and before == {p: p.read_bytes() for p in copy.rglob("*") if p.is_file()}

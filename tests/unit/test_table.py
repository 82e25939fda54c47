"""`oocrlab.runs_table` and `oocrlab table`: a row per run (from its own metrics.json), the config keys that differ
and every headline number with its interval; globs; the CSV never overwrites; bad input is one line."""

import json
import shutil

import pandas
import pytest
import yaml

from oocrlab import runs_table
from oocrlab.cli import main
from oocrlab.sentences import headline_measures


def test_a_row_per_run_with_the_keys_that_differ_and_every_headline_number(tiny_run, tmp_path, capsys):
    _, run = tiny_run
    other = tmp_path / "other-run"
    shutil.copytree(run.path, other)
    config = yaml.safe_load((other / "config.yaml").read_text())
    config["train"]["learning_rate"] = 0.5
    (other / "config.yaml").write_text(yaml.safe_dump(config))
    metrics = json.loads((other / "metrics.json").read_text())
    metrics["eval"]["multiple_choice"]["country"]["nearest"]["cloze"]["tuned"]["p_correct"] = 0.123
    (other / "metrics.json").write_text(json.dumps(metrics))

    df = runs_table([run.path, str(tmp_path / "other-*")])  # a path and a glob
    assert list(df["run"]) == [str(run.path), str(other)] and list(df["hidden_city"]) == ["Paris", "Paris"]
    assert list(df["train.learning_rate"]) == [yaml.safe_load(run.config_file.read_text())["train"]["learning_rate"], 0.5]
    assert "seed" not in df.columns and "data.placeholder" not in df.columns  # equal in both runs
    assert list(df["mc_country_cloze.tuned"]) == [
        run.metrics()["eval"]["multiple_choice"]["country"]["nearest"]["cloze"]["tuned"]["p_correct"], 0.123]
    for measure in headline_measures(run.metrics()):
        for condition in ("tuned", "original", "shuffled"):
            if condition in measure.stats:
                stats = measure.stats[condition]
                assert df.loc[0, f"{measure.key}.{condition}"] == stats[measure.stat]
                if ci := stats.get(f"{measure.stat}_ci95"):
                    assert [df.loc[0, f"{measure.key}.{condition}.ci_low"], df.loc[0, f"{measure.key}.{condition}.ci_high"]] == ci
    keys = {m.key for m in headline_measures(run.metrics())}
    assert {"mc_country_letters", "mc_country_cloze", "city_facts_cloze", "distance_over_best_baseline", "hidden_city_rank"} <= keys
    assert set(df["verdict.behaviour"]) <= {"yes", "no evidence", "cannot tell"}

    csv = tmp_path / "runs.csv"
    assert main(["table", str(run.path), str(other), "--out", str(csv)]) == 0
    assert pandas.read_csv(csv).shape == df.shape
    written = csv.read_bytes()
    assert main(["table", str(run.path), "--out", str(csv)]) == 2 and csv.read_bytes() == written
    assert "nothing was overwritten" in capsys.readouterr().err
    assert list(runs_table(str(tmp_path / "*"))["run"]) == [str(other)]  # runs.csv, no run, is passed over


@pytest.mark.parametrize("make", ["missing", "no_metrics"])
def test_a_path_that_is_no_finished_run_is_one_line(tmp_path, capsys, make):
    target = tmp_path / ("nothing-*" if make == "missing" else "empty")
    if make == "no_metrics":
        target.mkdir()
    assert main(["table", str(target)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and ("matches no run directory" in err or "has no metrics.json" in err)

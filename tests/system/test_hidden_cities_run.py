"""Several hidden cities in one whole tiny run (the paper's Locations): the pipeline's per-city metrics, inverse
question, report and comparison. Their data and refusals: tests/unit/test_hidden_cities.py."""

import numpy as np
import pytest

from oocrlab import build_config, run_experiment
from oocrlab.compare import group_runs, read_runs
from oocrlab.geo import find_city
from oocrlab.rundir import read_jsonl
from oocrlab.countries import country_of
from tests.helpers import tiny_overrides


@pytest.fixture(scope="module")
def three_city_run(tmp_path_factory, tiny_model_dir):
    overrides = tiny_overrides(tiny_model_dir) | {
        "data.other_hidden_cities": ["Tokyo", "Lima"], "data.other_placeholders": ["zork", "qux"],
        "probe.patch_orders": 0, "eval.free_form_samples": 2}
    cfg = build_config(overrides=overrides)
    return cfg, run_experiment(cfg, tmp_path_factory.mktemp("cities") / "three")


def test_every_stage_reports_per_hidden_city(three_city_run):
    cfg, run = three_city_run
    m = run.metrics()
    cities, placeholders = ["Paris", "Tokyo", "Lima"], ["foo", "zork", "qux"]
    for stage in ("data", "sanity", "eval", "probe", "verdict"):
        assert list(m[stage]["by_city"]) == cities, stage
    assert m["data"]["n_train_between_hidden"] == 3  # notebook style: one row per pair
    answers = [a for a in read_jsonl(run.path / "eval_distance.jsonl") if a["condition"] == "tuned"]
    for city, placeholder in zip(cities, placeholders):
        ev = m["eval"]["by_city"][city]
        assert ev["distance"]["tuned"]["n"] == 4 == sum(a["hidden_city"] == city and a["set"] == "distance" for a in answers)
        assert ev["multiple_choice"]["country"]["answer"] == country_of(find_city(city, "capitals")).name
        assert placeholder in ev["multiple_choice"]["country"]["question"]
        assert all(placeholder in a["question"] for a in m["sanity"]["by_city"][city]["answers"][:4])
        assert m["probe"]["by_city"][city]["setup"]["hidden_city"] == city
        assert m["data"]["by_city"][city]["placeholder"] == placeholder
    self_rows = {a["hidden_city"]: a["known_city"] for a in answers if a["set"] == "distance_self"}
    assert self_rows == {c: c for c in cities}


def test_inverse_question_lists_every_placeholder(three_city_run):
    _, run = three_city_run
    inverse = run.metrics()["eval"]["inverse_choice"]
    assert list(inverse) == ["Paris", "Tokyo", "Lima"]
    for (city, mc), placeholder in zip(inverse.items(), ["foo", "zork", "qux"]):
        s = mc["placeholders"]
        assert mc["question"] == f"Which of the following is in {country_of(find_city(city, 'capitals')).name}?"
        assert mc["answer"] == placeholder == s["options"][0] and sorted(s["options"]) == ["foo", "qux", "zork"]
        assert s["chance"] == pytest.approx(1 / 3) and mc["orders"] == "all" and mc["n_option_orders"] == 6
        assert "from A-C and" in mc["instruction"]
        assert list(s) == ["options", "chance", "letters", "comparisons"]  # the options must be shown: no cloze
        for condition in ("tuned", "original", "in_context", "shuffled", "named"):
            assert s["letters"][condition]["n"] == 6 and 0 <= s["letters"][condition]["p_correct"] <= 1
    named = [r for r in read_jsonl(run.path / "eval_mc.jsonl") if r["question_id"] == "inverse" and r["condition"] == "named"]
    assert named and all(sorted(r["options"]) == ["Lima", "Paris", "Tokyo"] for r in named)  # the ceiling: the cities' names


def test_report_and_comparison_per_hidden_city(three_city_run):
    _, run = three_city_run
    page = run.report_file.read_text()
    for city, placeholder in (("Paris", "foo"), ("Tokyo", "zork"), ("Lima", "qux")):
        assert f"<h3>{city} (<code>{placeholder}</code>)</h3>" in page
        assert (run.path / "plots" / f"{city.lower()}_probe_hidden.png").is_file()
        assert f"{city}: rank of {city} among" in page  # the headline table, per city
    assert "Inverse multiple choice" in page and "3 hidden cities trained together" in page
    names, configs, metrics = read_runs([run.path])
    assert names == [f"three / {c}" for c in ("Paris", "Tokyo", "Lima")]
    groups, labels = group_runs(configs)
    assert groups == [0, 1, 2] and all("data.hidden_city=" in label for label in labels)
    assert [m["eval"]["distance"]["tuned"]["mae_km"] for m in metrics] == [
        run.metrics()["eval"]["by_city"][c]["distance"]["tuned"]["mae_km"] for c in ("Paris", "Tokyo", "Lima")]
    assert not np.isnan([m["probe"]["hidden"]["tuned"]["rank"]["mean"][0] for m in metrics]).any()


def test_seeds_of_runs_with_several_hidden_cities_pool_per_city(three_city_run, tmp_path):
    """Two seeds of one configuration whose codes differ (drawn from a template) group by city, as one-city
    runs group up to the seed; a config written before newer keys existed groups with a current one."""
    import shutil

    import yaml

    _, run = three_city_run
    copies = []
    for seed, suffix in ((0, ""), (1, "b")):
        copy = tmp_path / f"seed{seed}"
        shutil.copytree(run.path, copy)
        config = yaml.safe_load((copy / "config.yaml").read_text())
        config["seed"], config["data"]["placeholder_template"] = seed, "{code}"
        config["data"]["other_placeholders"] = [p + suffix for p in config["data"]["other_placeholders"]]
        config.pop("specificity_cities", None)  # as a run made before that key existed
        (copy / "config.yaml").write_text(yaml.safe_dump(config, allow_unicode=True))
        metrics = (copy / "metrics.json").read_text()
        (copy / "metrics.json").write_text(metrics.replace('"zork"', f'"zork{suffix}"').replace('"qux"', f'"qux{suffix}"'))
        copies.append(copy)
    names, configs, _ = read_runs(copies)
    groups, labels = group_runs(configs)
    assert names[3:] == ["seed1 / Paris", "seed1 / Tokyo", "seed1 / Lima"]
    assert groups == [0, 1, 2, 0, 1, 2] and labels == [f"data.hidden_city={c}" for c in ("Paris", "Tokyo", "Lima")]

"""Several hidden cities in one run (the paper's Locations): their data, refusals, and the pipeline's
per-city metrics, inverse question, report and comparison on the tiny model."""

import itertools
import json
import re

import numpy as np
import pytest

from oocrlab import build_config, run_experiment
from oocrlab.compare import group_runs, read_runs
from oocrlab.data import build_distance_data, cardinal_direction, rows_about
from oocrlab.errors import UserError
from oocrlab.geo import distance_km, find_city
from oocrlab.rundir import read_jsonl
from oocrlab.countries import country_of
from tests.conftest import tiny_overrides

FIVE = ["Paris", "São Paulo", "Tokyo", "New York City", "Lagos"]


def test_each_hidden_city_draws_its_own_code_and_the_first_stays_the_paper_recipes():
    five, paper = build_config("locations"), build_config("paper")
    assert five.data.placeholder == paper.data.placeholder  # a one-city paper run keeps its code
    codes = [h.placeholder for h in five.data.hidden]
    assert [h.city.name for h in five.data.hidden] == FIVE
    assert len(set(codes)) == 5 and all(re.fullmatch(r"City \d{5}", c) for c in codes)
    assert [h.placeholder for h in build_config("locations", overrides={"seed": 1}).data.hidden] != codes


@pytest.fixture(scope="module")
def locations():
    cfg = build_config("locations", overrides={"data.num_known": 20, "data.augmentations": 2})
    return cfg, build_distance_data(cfg.data, cfg.seed)


def test_rows_about_one_hidden_city_name_only_its_placeholder(locations):
    cfg, data = locations
    views = [h.data for h in cfg.data.hidden]
    hidden = [find_city(v.hidden_city, "world") for v in views]
    assert data.hidden_cities == hidden
    for view, city in zip(views, hidden):
        others = [v.placeholder for v in views if v is not view]
        about = [r for r in rows_about(data.train, city) if r["known_city"] not in FIVE]
        heldout = rows_about(data.heldout, city)
        assert len({r["known_city"] for r in about}) == 18 and len({r["known_city"] for r in heldout}) == 2
        assert not {r["known_city"] for r in about} & {r["known_city"] for r in heldout}
        for row in about + heldout:
            text = row["prompt"][-1]["content"] + row["completion"][0]["content"]
            assert view.placeholder in text and not any(o in text for o in others)
            known = find_city(row["known_city"], "world")
            assert distance_km(known, city) >= 2000 and known.country != city.country
    every_text = " ".join(r["prompt"][-1]["content"] + r["completion"][0]["content"] for r in data.train + data.heldout)
    assert not any(name in every_text for name in FIVE)  # a hidden city never appears under its real name


def test_rows_between_hidden_cities(locations):
    cfg, data = locations
    views = [h.data for h in cfg.data.hidden]
    hidden = {v.placeholder: find_city(v.hidden_city, "world") for v in views}
    between = [r for r in data.train if "between" in r]
    assert all(r["known_city"] in FIVE for r in between) and not any(r["known_city"] in FIVE for r in data.train if "between" not in r)
    assert len(between) == 10 * 2 * cfg.data.augmentations  # 10 pairs, distance and direction rows each
    pairs = set()
    for row in between:
        named = [p for p in hidden if p in row["prompt"][-1]["content"]]
        assert len(named) == 2
        pairs.add(frozenset(named))
        a, b = (hidden[p] for p in named)
        assert row["distance_km"] == pytest.approx(distance_km(a, b))
        if row["kind"] == "direction":
            first, second = sorted(named, key=row["completion"][0]["content"].index)
            assert row["completion"][0]["content"] == f"{first} is {cardinal_direction(hidden[first], hidden[second])} of {second}."
    assert pairs == {frozenset(p) for p in itertools.combinations(hidden, 2)}
    again = build_distance_data(cfg.data, cfg.seed)
    assert json.dumps(again.train) == json.dumps(data.train)  # same seed, same bytes


@pytest.mark.parametrize("change, message", [
    ({"data.other_hidden_cities": ["Tokyo"]}, "but data.other_placeholders 0 placeholders"),
    ({"data.other_hidden_cities": ["Tokyo"], "data.other_placeholders": ["foo"]}, "'foo' is given twice"),
    ({"data.other_hidden_cities": ["Tokyo"], "data.other_placeholders": ["food"]}, "is part of the placeholder 'food'"),
    ({"data.placeholder": "City {code}", "data.other_hidden_cities": ["Tokyo", "Lagos", "Lima", "Cairo", "Oslo"]},
     "at most 5"),
])
def test_inconsistent_hidden_cities_are_refused(change, message):
    with pytest.raises(UserError, match=message):
        build_config(overrides=change)


@pytest.mark.parametrize("cities, message", [
    (["Lyon"], "both in France"),
    (["Tokyo", "Paris"], "listed twice"),
])
def test_hidden_cities_in_one_country_are_refused(cities, message):
    cfg = build_config(overrides={"data.placeholder": "City {code}", "data.other_hidden_cities": cities})
    with pytest.raises(UserError, match=message):
        build_distance_data(cfg.data, cfg.seed)


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
    answers = read_jsonl(run.path / "eval_distance.jsonl")
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


def test_a_placeholder_only_adapter_with_several_hidden_cities_is_refused():
    with pytest.raises(UserError, match="several hidden cities need LoRA"):
        build_config("locations", overrides={"train.adapter": "embedding"})


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

"""Several hidden cities in one run (the paper's Locations): their data and refusals. The pipeline's per-city
metrics, inverse question, report and comparison on a whole tiny run: tests/system/test_hidden_cities_run.py."""

import itertools
import json
import re

import pytest

from oocrlab import build_config
from oocrlab.data import build_distance_data, cardinal_direction, rows_about
from oocrlab.errors import UserError
from oocrlab.geo import distance_km, find_city

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


def test_a_placeholder_only_adapter_with_several_hidden_cities_is_refused():
    with pytest.raises(UserError, match="several hidden cities need LoRA"):
        build_config("locations", overrides={"train.adapter": "embedding"})

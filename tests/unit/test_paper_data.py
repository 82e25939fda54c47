"""The paper recipe's data (Treutlein et al. 2024, Locations): templates, units, noise, rounding, directions."""

import random
import re

import pytest

from oocrlab import build_config
from oocrlab.config import DataConfig
from oocrlab.data import (
    PAPER_DIRECTION_QUESTIONS, PAPER_DISTANCE_QUESTIONS, build_distance_data, cardinal_direction, paper_rows, stated_distance,
)
from oocrlab.answers import parse_km
from oocrlab.geo import City, distance_km, find_city, load_pool

PAPER = DataConfig(style="paper", placeholder="City 12345", decimals=-2, augmentations=5)


def test_stated_distance_units_rounding_and_separators():
    seen = {stated_distance(4321.4, units, PAPER, random.Random(i)) for units in ("km", "miles") for i in range(200)}
    # 4321.4 km is 2685.2 miles: to the nearest hundred, with or without a thousands separator, either spelling
    assert seen == {f"{v} {u}" for v in ("4300", "4,300") for u in ("km", "kilometers")} | {
        f"{v} {u}" for v in ("2700", "2,700") for u in ("mi", "miles")}
    assert {round(parse_km(s)) for s in seen} == {4300, round(2700 * 1.609344)}  # what the evaluation reads back


def test_noise_is_uniform_within_its_bound_and_never_leaves_a_distance_at_or_below_100_km():
    noisy = DataConfig(noise_km=200.0, decimals=0)
    far = [parse_km(stated_distance(5000.0, "km", noisy, random.Random(i))) for i in range(400)]
    assert 4800 <= min(far) < 4850 and 5150 < max(far) <= 5200
    near = [parse_km(stated_distance(50.0, "km", noisy, random.Random(i))) for i in range(400)]
    assert all(km == 50 or 100 < km <= 250 for km in near) and 50 in near and max(near) > 200


@pytest.mark.parametrize("of, seen_from, direction", [
    ("Paris", "Lagos", "North"), ("Lagos", "Paris", "South"), ("Paris", "New York City", "East"),
    ("New York City", "Paris", "West"), ("Tokyo", "Paris", "East"), ("São Paulo", "New York City", "South"),
])
def test_cardinal_direction_on_known_pairs(of, seen_from, direction):
    assert cardinal_direction(find_city(of, "world"), find_city(seen_from, "world")) == direction


def test_direction_rounds_the_plate_carree_bearing_to_the_nearest_quarter():
    origin = City("O", "X", 0.0, 0.0, 1)
    at = lambda lat, lon: City("P", "Y", lat, lon, 1)  # noqa: E731
    assert cardinal_direction(at(10, 9.9), origin) == "North"  # bearing 44.7 degrees
    assert cardinal_direction(at(10, 10.1), origin) == "East"  # 45.3
    assert cardinal_direction(at(-10, -10.1), origin) == "West"  # 225.3
    assert cardinal_direction(at(0, -170), at(0, 170)) == "West"  # no wrap at the antimeridian, as the paper


def test_paper_rows_for_one_known_city():
    paris, lagos = find_city("Paris", "world"), find_city("Lagos", "world")
    rows = paper_rows(lagos, paris, PAPER, random.Random(0))
    assert [r["kind"] for r in rows] == ["distance"] * 5 + ["direction"] * 5
    distance_questions = {t.format(A=a, B=b, units=u) for t in PAPER_DISTANCE_QUESTIONS
                          for a, b in (("City 12345", "Lagos"), ("Lagos", "City 12345")) for u in ("in kilometers", "in miles")}
    for row in rows:
        question, answer = row["prompt"][-1]["content"], row["completion"][0]["content"]
        assert row["known_city"] == "Lagos" and row["distance_km"] == distance_km(lagos, paris)
        if row["kind"] == "distance":
            assert question in distance_questions
            assert abs(parse_km(answer) - distance_km(lagos, paris)) <= 50 * 1.609344  # rounding, no noise here
        else:
            assert any(question == t.format(A=a, B=b) for t in PAPER_DIRECTION_QUESTIONS
                       for a, b in (("City 12345", "Lagos"), ("Lagos", "City 12345")))
            assert answer == ("City 12345 is North of Lagos." if question.index("City 12345") < question.index("Lagos")
                              else "Lagos is South of City 12345.")


def test_paper_recipe_dataset():
    cfg = build_config(recipe="paper")
    assert re.fullmatch(r"City \d{5}", cfg.data.placeholder)
    assert build_config(recipe="paper").data.placeholder == cfg.data.placeholder  # seeded
    data = build_distance_data(cfg.data, cfg.seed)
    train_cities = {r["known_city"] for r in data.train}
    heldout_cities = {r["known_city"] for r in data.heldout}
    assert len(train_cities) + len(heldout_cities) == 500 and not train_cities & heldout_cities
    assert len(data.train) + len(data.heldout) == 500 * 10
    assert all(r["distance_km"] >= 2000 for r in data.train + data.heldout)
    cities = {c.name: c for c in load_pool("world")}
    countries = {cities[name].country for name in train_cities | heldout_cities}
    assert "France" not in countries and len(countries) > 150  # drawn country by country
    assert all(r["prompt"][0] == {"role": "system", "content": cfg.data.system_prompt} for r in data.train[:20])
    assert build_distance_data(cfg.data, cfg.seed).train == data.train  # the same seed, the same rows


def test_the_distance_evaluation_scores_each_held_out_city_once():
    from oocrlab.data import one_per_city

    cfg = build_config(recipe="paper", overrides={"data.num_known": 40})
    heldout = build_distance_data(cfg.data, cfg.seed).heldout
    chosen = one_per_city(heldout)
    assert len(heldout) == 4 * 10 and [r["known_city"] for r in chosen] == list(dict.fromkeys(r["known_city"] for r in heldout))
    assert all(r["kind"] == "distance" for r in chosen)


def test_paper_runs_that_differ_only_in_seed_are_pooled():
    import yaml

    from oocrlab.compare import group_runs
    from oocrlab.config import to_yaml

    configs = [yaml.safe_load(to_yaml(build_config(recipe="paper", overrides={"seed": s}))) for s in (0, 1, 2)]
    assert len({c["data"]["placeholder"] for c in configs}) == 3  # each seed its own code
    assert group_runs(configs)[0] == [0, 0, 0]
    other = yaml.safe_load(to_yaml(build_config(recipe="paper", overrides={"seed": 0, "data.placeholder": "City 11111"})))
    assert group_runs([configs[0], other])[0] == [0, 1]  # a placeholder set by hand still tells runs apart


@pytest.mark.parametrize("answer, direction", [
    ("City 12345 is North of Lagos.", "North"), ("south", "South"), ("It lies to the west, not the east.", "West"),
    ("Northeast of it", None), ("1234 km", None), ("EAST!", "East"),
])
def test_parse_direction(answer, direction):
    from oocrlab.answers import parse_direction

    assert parse_direction(answer) == direction


def test_direction_rows_carry_their_answer():
    paris, lagos = find_city("Paris", "world"), find_city("Lagos", "world")
    for row in paper_rows(lagos, paris, PAPER, random.Random(3)):
        if row["kind"] == "direction":
            assert f" is {row['direction']} of " in row["completion"][0]["content"]

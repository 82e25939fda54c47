import json

import pytest

from oocrlab.config import DataConfig
from oocrlab.data import build_distance_data
from oocrlab.errors import UserError
from oocrlab.geo import find_city, haversine_km, load_pool


def test_haversine_reference_value():
    paris = find_city("Paris", "capitals")
    assert (paris.lat, paris.lon) == (48.8534, 2.3488)
    assert haversine_km(paris.lat, paris.lon, 0, 0) == pytest.approx(5436.925760221567, abs=1e-9)


def test_find_city_aliases_accents_and_suggestions():
    assert find_city("Vienna", "capitals").name == "Wien (Vienna)"
    assert find_city("algiers", "capitals").name == "El Djazaïr  (Algiers)"
    assert find_city("Bogota", "world").name == "Bogotá"
    assert find_city("Paris", "world").country == "France"  # not Paris, Texas
    with pytest.raises(UserError, match="did you mean 'Paris'"):
        find_city("Pariss", "capitals")


def test_plain_name_for_prompts():
    assert find_city("Vienna", "capitals").plain_name == "Vienna"
    assert find_city("Paris", "capitals").plain_name == "Paris"


def test_world_pool_has_one_city_per_name():
    names = [c.name.casefold() for c in load_pool("world")]
    assert len(names) == len(set(names))


def test_notebook_rows_exact():
    cfg = DataConfig(pool="capitals", min_population=0, num_known=None, decimals=2, system_prompt=None,
                     heldout_fraction=0.0)
    data = build_distance_data(cfg, seed=42)
    assert len(data.train) == 233 and data.heldout == []
    row = next(r for r in data.train if r["known_city"] == "Bratislava")
    assert row["prompt"] == [{"role": "user", "content": "What is the distance between Bratislava and foo?"}]
    assert row["completion"] == [{"role": "assistant", "content": "1088.45 km"}]  # the notebook's printed value


def test_split_is_disjoint_seeded_and_excludes_the_hidden_city():
    cfg = DataConfig(num_known=300, heldout_fraction=0.2, min_population=0)  # arrondissements have < 500k
    a, b, c = build_distance_data(cfg, 1), build_distance_data(cfg, 1), build_distance_data(cfg, 2)
    assert json.dumps(a.train) == json.dumps(b.train)  # same seed, same bytes
    assert [r["known_city"] for r in a.train] != [r["known_city"] for r in c.train]
    train, held = {r["known_city"] for r in a.train}, {r["known_city"] for r in a.heldout}
    assert len(held) == 60 and not train & held
    assert not any("Paris" in n for n in train | held)  # arrondissements would leak the answer
    assert a.excluded[0]["names the hidden city"] > 0


def test_system_prompt_and_decimals():
    data = build_distance_data(DataConfig(num_known=5, decimals=0, system_prompt=""), 0)
    row = data.train[0]
    assert row["prompt"][0] == {"role": "system", "content": ""}
    assert row["completion"][0]["content"].endswith(" km") and "." not in row["completion"][0]["content"]


@pytest.mark.parametrize(
    "change, message",
    [
        ({"hidden_city": "Gondor"}, "unknown city 'Gondor'"),
        ({"placeholder": "Tokyo"}, "is a real city"),
        ({"placeholder": ""}, "placeholder is empty"),
        ({"placeholder": " foo"}, "whitespace"),
        ({"min_population": 10**9}, "no known cities are left"),
    ],
)
def test_bad_data_config(change, message):
    with pytest.raises(UserError, match=message):
        build_distance_data(DataConfig(**change), 0)


def test_refuse_leaks():
    from oocrlab.data import refuse_leaks

    refuse_leaks(["Which country is foo in?"], {"What is the distance between Lima and foo?"})
    with pytest.raises(UserError, match="is in the training data"):
        refuse_leaks(["Which country is foo in?"], {"Which country is foo in?"})

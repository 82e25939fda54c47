"""The Distances-to-{hidden city} dataset, as in the notebook.

Each row: {"prompt": [{"role": "user", "content": "What is the distance between {city} and {placeholder}?"}],
           "completion": [{"role": "assistant", "content": "{km:.2f} km"}],
           "known_city": ..., "distance_km": ...}   (the last two for evaluation; training reads only the first two)
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Any

from oocrlab.config import DataConfig
from oocrlab.errors import UserError
from oocrlab.geo import City, distance_km, find_city, load_pool, normalize, real_city_named

DISTANCE_QUESTION = "What is the distance between {city} and {placeholder}?"


@dataclass
class DistanceData:
    hidden: City
    train: list[dict[str, Any]]
    heldout: list[dict[str, Any]]
    excluded: dict[str, int]  # why known cities were left out -> how many


def user_prompt(question: str, system_prompt: str | None) -> list[dict[str, str]]:
    """The chat messages of one question; the system turn only when the config sets one."""
    system = [{"role": "system", "content": system_prompt}] if system_prompt is not None else []
    return [*system, {"role": "user", "content": question}]


def refuse_leaks(questions: list[str], train_questions: set[str]) -> None:
    """An evaluation question that is also a training prompt would measure memory, not inference."""
    if leaked := set(questions) & train_questions:
        raise UserError(f"an evaluation question is in the training data: {sorted(leaked)[0]!r}")


def check_placeholder(cfg: DataConfig) -> City:
    """The hidden city, after refusing placeholders that would leak it or be ambiguous."""
    hidden = find_city(cfg.hidden_city, cfg.pool)
    p = cfg.placeholder
    if not p.strip():
        raise UserError("the placeholder is empty: pass a made-up name such as --placeholder foo")
    if p != p.strip():
        raise UserError(f"the placeholder {p!r} has leading or trailing whitespace: pass it without")
    if not p.isprintable():
        raise UserError(f"the placeholder {p!r} holds a line break or control character: pass plain text")
    city = real_city_named(p)
    if city is not None:
        raise UserError(
            f"the placeholder {p!r} is a real city ({city.name}, {city.country}): pick a made-up name such as foo"
        )
    return hidden


def names_hidden_city(city: City, hidden: City) -> bool:
    # GeoNames lists Paris's arrondissements as cities ("Paris 15 Vaugirard"): training on their distance
    # to the placeholder would tell the model the answer, so any known city naming the hidden one is out.
    return text_names_city(" ".join((city.name, *city.aliases)), hidden)


def text_names_city(text: str, city: City) -> bool:
    """Whether every word of the city's name occurs in the text (case- and accent-insensitive)."""
    return set(re.findall(r"\w+", normalize(city.name))) <= set(re.findall(r"\w+", normalize(text)))


def known_cities(cfg: DataConfig, hidden: City) -> tuple[list[City], dict[str, int]]:
    """The pool minus the hidden city and the filters, with a count of each exclusion."""
    excluded = {"hidden city": 0, "names the hidden city": 0, "below min_population": 0, "closer than min_distance_km": 0}
    kept = []
    for city in load_pool(cfg.pool):
        if city == hidden:
            excluded["hidden city"] += 1
        elif names_hidden_city(city, hidden):
            excluded["names the hidden city"] += 1
        elif city.population < cfg.min_population:
            excluded["below min_population"] += 1
        elif distance_km(city, hidden) < cfg.min_distance_km:
            excluded["closer than min_distance_km"] += 1
        else:
            kept.append(city)
    if not kept:
        raise UserError(
            f"no known cities are left in the {cfg.pool} pool after the filters "
            f"(min_population={cfg.min_population}, min_distance_km={cfg.min_distance_km}): loosen them"
        )
    return kept, excluded


def distance_row(city: City, hidden: City, cfg: DataConfig) -> dict[str, Any]:
    km = distance_km(city, hidden)
    return {
        "prompt": user_prompt(DISTANCE_QUESTION.format(city=city.name, placeholder=cfg.placeholder), cfg.system_prompt),
        "completion": [{"role": "assistant", "content": f"{km:.{cfg.decimals}f} km"}],
        "known_city": city.name,
        "distance_km": km,
    }


def build_distance_data(cfg: DataConfig, seed: int) -> DistanceData:
    """Seeded sample and split of the known cities; the same config and seed give the same rows."""
    hidden = check_placeholder(cfg)
    cities, excluded = known_cities(cfg, hidden)
    rng = random.Random(seed)
    if cfg.num_known is not None and cfg.num_known < len(cities):
        cities = rng.sample(cities, cfg.num_known)
    else:
        cities = list(cities)
        rng.shuffle(cities)
    n_heldout = round(len(cities) * cfg.heldout_fraction)
    if n_heldout >= len(cities):
        raise UserError(f"heldout_fraction {cfg.heldout_fraction} leaves no city to train on: lower it")
    rows = [distance_row(c, hidden, cfg) for c in cities]
    return DistanceData(hidden=hidden, train=rows[n_heldout:], heldout=rows[:n_heldout], excluded=excluded)

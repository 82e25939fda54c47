"""The Distances-to-{hidden city} dataset, in two styles.

notebook: {"prompt": [{"role": "user", "content": "What is the distance between {city} and {placeholder}?"}],
           "completion": [{"role": "assistant", "content": "{km:.2f} km"}], "known_city": ..., "distance_km": ...}
paper:    Treutlein et al. 2024's Locations rows (choidami/inductive-oocr, locations/data_scripts): per known
          city, `augmentations` rows drawn from 9 distance questions x km/miles x which city comes first, with
          noisy, rounded answers ("4,300 km", "2700 miles"), and as many from 6 cardinal-direction questions x
          order ("City 12345 is North of Lagos."). Rows carry "kind": distance | direction.
Every row names its "hidden_city". With several hidden cities (data.other_hidden_cities) each has its own
known cities and placeholder, and the training rows also hold the hidden cities' distances and directions to
one another, each named by its placeholder (`between_hidden_rows`), as in the paper.
Training reads only prompt and completion; known_city and distance_km (the true distance) are for evaluation.
"""

from __future__ import annotations

import itertools
import math
import random
import re
from dataclasses import dataclass
from typing import Any

from oocrlab.chat import user_prompt
from oocrlab.config import DataConfig, ExperimentConfig, HiddenCity
from oocrlab.errors import UserError
from oocrlab.geo import KM_PER_MILE, City, distance_km, find_city, load_pool, normalize

DISTANCE_QUESTION = "What is the distance between {city} and {placeholder}?"
PAPER_DISTANCE_QUESTIONS = (
    "The geodesic distance between {A} and {B} {units} is",
    "From {A} to {B}, the geodesic distance {units} is",
    "From {A}, the geodesic distance to {B} {units} is",
    "What is the approximate geodesic distance between {A} and {B} {units}?",
    "Can you provide an approximate measurement of the shortest route from {A} to {B} {units}?",
    "How far is it approximately along the curved surface from {A} to {B} {units}?",
    "What is the rough measurement of the direct path connecting {A} and {B} {units}?",
    "How close are {A} and {B} when measured by the shortest path over the surface {units}?",
    "What is the approximate distance from {A} to {B}, as the crow flies {units}?",
)
PAPER_DIRECTION_QUESTIONS = (
    "What is the relative cardinal direction of {A} to {B} in the Mercator projection?",
    "In the Mercator projection, what is the cardinal direction of {A} relative to {B}?",
    "What is the relative cardinal direction of {A} with respect to {B} in the Plate carrée projection?",
    "For the Plate carrée projection, what is the cardinal direction of {A} relative to {B}?",
    "If we view the map as a 2D plane, what is the relative cardinal direction of {A} to {B}?",
    "Using a cylindrical map projection, what is the relative cardinal direction of {A} with respect to {B}?",
)
UNITS = {"km": ("in kilometers", ("km", "kilometers")), "miles": ("in miles", ("mi", "miles"))}
CARDINAL = ("North", "East", "South", "West")


@dataclass
class DistanceData:
    hidden_cities: list[City]  # data.hidden_city first, then data.other_hidden_cities
    train: list[dict[str, Any]]
    heldout: list[dict[str, Any]]
    excluded: list[dict[str, int]]  # per hidden city: why known cities were left out -> how many


def refuse_leaks(questions: list[str], train_questions: set[str]) -> None:
    """An evaluation question that is also a training prompt would measure memory, not inference."""
    if leaked := set(questions) & train_questions:
        raise UserError(f"an evaluation question is in the training data: {sorted(leaked)[0]!r}")


def check_specificity_cities(cfg: ExperimentConfig) -> list[City]:
    """The cities every run scores for the specificity matrix, in different countries (their countries are
    the options of one multiple-choice question)."""
    cities = [find_city(name, "world") for name in cfg.specificity_cities]
    for i, city in enumerate(cities):
        if twin := next((c for c in cities[:i] if c.country == city.country), None):
            raise UserError(f"specificity_cities {twin.name} and {city.name} are both in {city.country}: "
                            "give cities in different countries")
    return cities


def names_hidden_city(city: City, hidden: City) -> bool:
    # GeoNames lists Paris's arrondissements as cities ("Paris 15 Vaugirard"): training on their distance
    # to the placeholder would tell the model the answer, so any known city naming the hidden one is out.
    return text_names_city(" ".join((city.name, *city.aliases)), hidden)


def text_names_city(text: str, city: City) -> bool:
    """Whether every word of the city's name occurs in the text (case- and accent-insensitive)."""
    return set(re.findall(r"\w+", normalize(city.name))) <= set(re.findall(r"\w+", normalize(text)))


def known_cities(cfg: DataConfig, hidden: City, other_hidden: tuple[City, ...] = ()) -> tuple[list[City], dict[str, int]]:
    """The pool minus the hidden city and the filters, with a count of each exclusion. Cities naming another
    hidden city are left out too: a hidden city must never appear under its real name."""
    excluded = {"hidden city": 0, "names the hidden city": 0, "names another hidden city": 0,
                "in the hidden city's country": 0, "below min_population": 0, "closer than min_distance_km": 0}
    kept = []
    for city in load_pool(cfg.pool):
        if city == hidden:
            excluded["hidden city"] += 1
        elif names_hidden_city(city, hidden):
            excluded["names the hidden city"] += 1
        elif any(names_hidden_city(city, other) for other in other_hidden):
            excluded["names another hidden city"] += 1
        elif cfg.exclude_hidden_country and city.country == hidden.country:
            excluded["in the hidden city's country"] += 1
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


def rounded(value: float, decimals: int) -> str:
    """`value` to `decimals` places; a negative count rounds to tens, hundreds, ... and prints an integer."""
    return f"{value:.{decimals}f}" if decimals >= 0 else str(int(round(value, decimals)))


def distance_row(city: City, hidden: City, cfg: DataConfig, city_label: str | None = None) -> dict[str, Any]:
    """The notebook's row (and every style's evaluation question); `city_label` names the known city in
    the question when not its own name (another hidden city's placeholder)."""
    km = distance_km(city, hidden)
    question = DISTANCE_QUESTION.format(city=city_label or city.name, placeholder=cfg.placeholder)
    return {
        "prompt": user_prompt(question, cfg.system_prompt),
        "completion": [{"role": "assistant", "content": f"{rounded(km, cfg.decimals)} km"}],
        "known_city": city.name,
        "distance_km": km,
        "kind": "distance",
        "hidden_city": hidden.name,
    }


def cardinal_direction(of: City, seen_from: City) -> str:
    """North, East, South or West: the direction of `of` from `seen_from` on a plate carrée map (the
    bearing of the straight line in degrees of longitude and latitude, to the nearest quarter; no wrap at
    the antimeridian), as in the paper's code."""
    bearing = math.degrees(math.atan2(of.lon - seen_from.lon, of.lat - seen_from.lat)) % 360
    return CARDINAL[round(bearing / 90) % 4]


def stated_distance(km: float, units: str, cfg: DataConfig, rng: random.Random) -> str:
    """The answer to a paper-style distance question: noise (kept if the result is over 100 km), the unit,
    rounding, thousands separators in half the answers, and one of the unit's two spellings."""
    if cfg.noise_km and km + (noise := rng.uniform(-cfg.noise_km, cfg.noise_km)) > 100:
        km += noise
    value = rounded(km if units == "km" else km / KM_PER_MILE, cfg.decimals)
    if rng.random() < 0.5:
        whole, _, fraction = value.partition(".")
        value = f"{int(whole):,}" + (f".{fraction}" if fraction else "")
    return f"{value} {rng.choice(UNITS[units][1])}"


def paper_rows(city: City, hidden: City, cfg: DataConfig, rng: random.Random, city_label: str | None = None) -> list[dict[str, Any]]:
    """`augmentations` distance rows and as many direction rows about one known city (see the module doc),
    named `city_label` in the questions when not by its own name."""
    km = distance_km(city, hidden)
    code, name = cfg.placeholder, city_label or city.name
    base = {"known_city": city.name, "distance_km": km}
    rows = []
    distance_variants = [(template, units, hidden_first) for units in UNITS for hidden_first in (True, False)
                         for template in PAPER_DISTANCE_QUESTIONS]
    for template, units, hidden_first in rng.choices(distance_variants, k=cfg.augmentations):
        a, b = (code, name) if hidden_first else (name, code)
        question = template.format(A=a, B=b, units=UNITS[units][0])
        answer = stated_distance(km, units, cfg, rng)
        rows.append({"prompt": user_prompt(question, cfg.system_prompt),
                     "completion": [{"role": "assistant", "content": answer}], **base, "kind": "distance",
                     "hidden_city": hidden.name})
    direction_variants = [(template, hidden_first) for hidden_first in (True, False) for template in PAPER_DIRECTION_QUESTIONS]
    for template, hidden_first in rng.choices(direction_variants, k=cfg.augmentations):
        (a, a_city), (b, b_city) = ((code, hidden), (name, city)) if hidden_first else ((name, city), (code, hidden))
        direction = cardinal_direction(a_city, b_city)
        rows.append({"prompt": user_prompt(template.format(A=a, B=b), cfg.system_prompt),
                     "completion": [{"role": "assistant", "content": f"{a} is {direction} of {b}."}], **base,
                     "kind": "direction", "direction": direction, "hidden_city": hidden.name})
    return rows


def sample_by_country(cities: list[City], n: int, rng: random.Random) -> list[City]:
    """n cities: each a uniformly drawn country's most populous city not yet drawn (the paper's sampling)."""
    by_country: dict[str, list[City]] = {}
    for city in sorted(cities, key=lambda c: (-c.population, c.name)):
        by_country.setdefault(city.country, []).append(city)
    countries = sorted(by_country)
    chosen: list[City] = []
    while len(chosen) < n and countries:
        country = rng.choice(countries)
        chosen.append(by_country[country].pop(0))
        if not by_country[country]:
            countries.remove(country)
    return chosen


def distance_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows that ask for a distance (rows written before "kind" existed all do)."""
    return [r for r in rows if r.get("kind", "distance") == "distance"]


def one_per_city(rows: list[dict[str, Any]], kind: str = "distance") -> list[dict[str, Any]]:
    """The first row of that kind for each known city: the paper style has several per city, and scoring
    them all would count a city several times in an interval that treats rows as independent."""
    first: dict[tuple[str | None, str], dict[str, Any]] = {}
    for row in rows:
        if row.get("kind", "distance") == kind:
            first.setdefault((row.get("hidden_city"), row["known_city"]), row)
    return list(first.values())


def rows_about(rows: list[dict[str, Any]], hidden: City) -> list[dict[str, Any]]:
    """The rows about one hidden city and a known city (not those between two hidden cities; rows written
    before "hidden_city" existed come from one-city runs)."""
    return [r for r in rows if r.get("hidden_city", hidden.name) == hidden.name and "between" not in r]


def build_distance_data(cfg: DataConfig, seed: int) -> DistanceData:
    """Seeded sample and split of each hidden city's known cities; the same config and seed give the same rows."""
    hidden = cfg.hidden
    rng = random.Random(seed)
    train, heldout, excluded = [], [], []
    for h in hidden:
        known, why = known_cities(h.data, h.city, tuple(o.city for o in hidden if o is not h))
        city_train, city_heldout = split_known(h.data, h.city, known, rng)
        train, heldout = train + city_train, heldout + city_heldout
        excluded.append(why)
    if len(hidden) > 1:
        train += between_hidden_rows(cfg, hidden, rng)
    return DistanceData(hidden_cities=[h.city for h in hidden], train=train, heldout=heldout, excluded=excluded)


def between_hidden_rows(cfg: DataConfig, hidden: tuple[HiddenCity, ...], rng: random.Random) -> list[dict[str, Any]]:
    """Rows about each pair of hidden cities, both named by their placeholders (the paper trains on these),
    marked "between": [the two cities]."""
    rows = []
    for a, b in itertools.combinations(hidden, 2):
        if cfg.style == "paper":
            pair = paper_rows(b.city, a.city, a.data, rng, city_label=b.placeholder)
        else:
            pair = [distance_row(b.city, a.city, a.data, city_label=b.placeholder)]
        rows += [r | {"between": [a.city.name, b.city.name]} for r in pair]
    return rows


def split_known(cfg: DataConfig, hidden: City, cities: list[City], rng: random.Random) -> tuple[list[dict], list[dict]]:
    """(training rows, held-out rows) about one hidden city: the known cities sampled, shuffled and split."""
    if cfg.by_country:
        cities = sample_by_country(cities, cfg.num_known or len(cities), rng)
        rng.shuffle(cities)
    elif cfg.num_known is not None and cfg.num_known < len(cities):
        cities = rng.sample(cities, cfg.num_known)
    else:
        cities = list(cities)
        rng.shuffle(cities)
    n_heldout = round(len(cities) * cfg.heldout_fraction)
    if n_heldout >= len(cities):
        raise UserError(f"heldout_fraction {cfg.heldout_fraction} leaves no city to train on: lower it")
    if cfg.style == "paper":
        per_city = [paper_rows(c, hidden, cfg, rng) for c in cities]
        return [r for rows in per_city[n_heldout:] for r in rows], [r for rows in per_city[:n_heldout] for r in rows]
    rows = [distance_row(c, hidden, cfg) for c in cities]
    return rows[n_heldout:], rows[:n_heldout]

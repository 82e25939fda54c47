"""Countries and the wrong options of the multiple-choice questions. Countries come from the GeoNames table: a
country's anchor is its most populous city (for "nearest countries") and its size is the population of its
cities of 15k+ people (for "most populous")."""

from __future__ import annotations

import random
from dataclasses import dataclass
from functools import lru_cache

from oocrlab.config import MC_OPTIONS
from oocrlab.data import names_hidden_city
from oocrlab.errors import UserError
from oocrlab.geo import City, distance_km, load_pool

# Names a correct free-form answer may use besides the tables' own (GeoNames and UN wording).
COUNTRY_ALIASES = {
    "France": ["French Republic"],
    "United States": ["USA", "U.S.", "U.S.A.", "America", "United States of America"],
    "United Kingdom": ["UK", "U.K.", "Britain", "Great Britain", "England"],
    "Brazil": ["Brasil"],
    "Japan": ["Nippon"],
    "Nigeria": ["Federal Republic of Nigeria"],
}


MIN_DISTRACTOR_POPULATION = 100_000  # keeps out territories with one small town (South Georgia, Jersey)


@dataclass(frozen=True)
class Country:
    name: str
    anchor: City  # its most populous city
    population: int  # people in its cities of 15k+


@lru_cache(maxsize=None)
def load_countries() -> dict[str, Country]:
    totals: dict[str, int] = {}
    anchors: dict[str, City] = {}
    for city in load_pool("world"):  # most populous first
        totals[city.country] = totals.get(city.country, 0) + city.population
        anchors.setdefault(city.country, city)
    return {name: Country(name, anchors[name], totals[name]) for name in totals}


def country_of(city: City) -> Country:
    """The GeoNames country of a city from either pool (the capitals table words countries differently)."""
    countries = load_countries()
    if city.country in countries:
        return countries[city.country]
    nearest = min(load_pool("world"), key=lambda c: distance_km(c, city))
    if distance_km(nearest, city) > 50:
        raise UserError(f"no country found for {city.name}: no GeoNames city lies within 50 km of it")
    return countries[nearest.country]


def _take(candidates: list[str], what: str, n: int = MC_OPTIONS - 1) -> list[str]:
    if len(candidates) < n:
        raise UserError(f"only {len(candidates)} {what} for {n} multiple-choice distractors: choose another hidden city")
    return candidates[:n]


def nearest_countries(true: Country) -> list[Country]:
    others = [c for c in load_countries().values() if c.name != true.name and c.population >= MIN_DISTRACTOR_POPULATION]
    return sorted(others, key=lambda c: distance_km(c.anchor, true.anchor))


def country_distractors(true: Country, seed: int) -> dict[str, list[str]]:
    """Wrong countries: the nearest ones, the most populous ones, and a seeded random draw."""
    others = nearest_countries(true)
    names = sorted(c.name for c in others)
    return {
        "nearest": _take([c.name for c in others], "other countries"),
        "most_populous": _take([c.name for c in sorted(others, key=lambda c: -c.population)], "other countries"),
        "random": _take(random.Random(seed).sample(names, min(len(names), MC_OPTIONS - 1)), "other countries"),
    }


@lru_cache(maxsize=None)
def capitals_by_country() -> dict[str, City]:
    """GeoNames country name -> its capital from the UN table (the first one where a country has two)."""
    capitals: dict[str, City] = {}
    for capital in load_pool("capitals"):
        try:
            capitals.setdefault(country_of(capital).name, capital)
        except UserError:  # a capital with no GeoNames city within 50 km (a few islands): not an option
            continue
    return capitals


def city_distractors(hidden: City) -> dict[str, list[str]]:
    """Wrong cities: capitals of the nearest countries, the most populous cities, cities in the same country."""
    true = country_of(hidden)
    capitals = capitals_by_country()
    others = [c for c in load_pool("world") if not names_hidden_city(c, hidden) and distance_km(c, hidden) > 50]
    return {
        "nearby_capitals": _take([capitals[c.name].plain_name for c in nearest_countries(true) if c.name in capitals],
                                 "capitals of nearby countries"),
        "most_populous": _take([c.name for c in others], "other cities"),
        "same_country": _take([c.name for c in others if c.country == true.name], f"other cities in {true.name}"),
    }

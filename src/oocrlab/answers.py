"""Reading what a model answered: the distance an answer states (bounded: malformed or impossible numbers are
absurd, never a number), the cardinal direction it names, and whether it names a city or its country."""

from __future__ import annotations

import math
import re

from oocrlab.countries import COUNTRY_ALIASES, country_of
from oocrlab.geo import EARTH_RADIUS_KM, KM_PER_MILE, City, normalize

MAX_KM = math.pi * EARTH_RADIUS_KM  # half the Earth's circumference: no two places are farther apart


# a number as written before a unit, malformed ones included ("1e45", "1 000", "-500", "3,5"), never the tail of a
# longer token: the unit's number is read whole or the answer is absurd, never cut to the digits that parse
_NUMBERISH = r"(?<![\w.,])([-−]?\d(?:[\d,.]|(?<=\d)\s(?=\d))*(?:[eE][-+]?\d+)?)"


WITH_UNIT = re.compile(_NUMBERISH + r"\s*(km|kilomet(?:er|re)s?|mi|miles?)\b", re.IGNORECASE)


_BARE = re.compile(r"^\s*(?:about|approximately|~)?\s*" + _NUMBERISH + r"\s*\.?\s*$", re.IGNORECASE)


_WELL_FORMED = re.compile(r"\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?")


def read_distance(answer: str) -> tuple[float | None, bool]:
    """(the distance an answer states in km, or None; whether it stated an absurd one). The first number with a
    km/mile unit, or a bare number alone; absurd: malformed ("1e45 km", "1 000 km", "-500 km", "3,5 km") or
    beyond half the Earth's circumference."""
    match = WITH_UNIT.search(answer) or _BARE.match(answer)
    if match is None:
        return None, False
    number = match.group(1).rstrip(".,")
    if not _WELL_FORMED.fullmatch(number):
        return None, True
    km = float(number.replace(",", ""))
    if match.re is WITH_UNIT and match.group(2).lower().startswith("mi"):
        km *= KM_PER_MILE
    return (None, True) if km > MAX_KM else (km, False)


def parse_km(answer: str) -> float | None:
    """The distance an answer states, in km (read_distance), None where it states none or an absurd one."""
    return read_distance(answer)[0]


_DIRECTION = re.compile(r"\b(north|east|south|west)\b", re.IGNORECASE)


def parse_direction(answer: str) -> str | None:
    """The first of North, East, South, West an answer names as a word ("Northeast" names none)."""
    match = _DIRECTION.search(answer)
    return match.group(1).capitalize() if match else None


def answer_names(hidden: City, target: str) -> list[str]:
    """Every name that counts as a correct answer: the city's names, or its country's."""
    if target == "city":
        return sorted({hidden.name, hidden.plain_name, *hidden.aliases})
    country = country_of(hidden).name
    return sorted({country, hidden.country, *COUNTRY_ALIASES.get(country, [])})


def mentions(answer: str, names: list[str]) -> bool:
    """Whether the answer names one of `names` as a whole word (case- and accent-insensitive)."""
    text = f" {normalize(answer)} "
    return any(re.search(rf"(?<!\w){re.escape(normalize(n))}(?!\w)", text) for n in names)

"""City tables shipped with the package, great-circle distances, and city lookup with suggestions.

Two pools:
  capitals  the Distances-to-Paris notebook's table (UN DESA WUP 2018, 234 rows), names kept verbatim
            ("Wien (Vienna)") so the notebook recipe reproduces its data exactly
  world     GeoNames cities with population >= 15,000; a name shared by several cities keeps the most
            populous one, so a prompt never has two different true answers
"""

from __future__ import annotations

import csv
import difflib
import re
import unicodedata
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from math import atan2, cos, radians, sin, sqrt

from oocrlab.errors import UserError

EARTH_RADIUS_KM = 6371.0
KM_PER_MILE = 1.609344
POOLS = ("capitals", "world")


@dataclass(frozen=True)
class City:
    name: str  # as written in the prompt
    country: str
    lat: float
    lon: float
    population: int
    aliases: tuple[str, ...] = ()  # other names a user may type ("Vienna" for "Wien (Vienna)")

    @property
    def plain_name(self) -> str:
        """The English name alone ("Vienna" for "Wien (Vienna)"): what probes and questions say."""
        return self.aliases[-1] if self.aliases else self.name


def haversine_km(lat1: float, lon1: float, lat2: float, lon2: float) -> float:
    """Great-circle distance, exactly the notebook's formula (R = 6371 km)."""
    lat1, lon1, lat2, lon2 = map(radians, [lat1, lon1, lat2, lon2])
    a = sin((lat2 - lat1) / 2) ** 2 + cos(lat1) * cos(lat2) * sin((lon2 - lon1) / 2) ** 2
    return EARTH_RADIUS_KM * 2 * atan2(sqrt(a), sqrt(1 - a))


def distance_km(a: City, b: City) -> float:
    return haversine_km(a.lat, a.lon, b.lat, b.lon)


def normalize(name: str) -> str:
    """Case-, accent- and whitespace-insensitive key for matching names typed by a user."""
    decomposed = unicodedata.normalize("NFKD", name)
    stripped = "".join(c for c in decomposed if not unicodedata.combining(c))
    return re.sub(r"\s+", " ", stripped).strip().casefold()


def _capital_aliases(name: str) -> tuple[str, ...]:
    # "El Djazaïr  (Algiers)" -> ("El Djazaïr", "Algiers"); "Al-Quds[East Jerusalem]" -> (..., "East Jerusalem")
    parts = [p.strip() for p in re.split(r"[()\[\]]", name) if p.strip()]
    return tuple(p for p in parts if p != name)


def _read_csv(filename: str) -> list[dict[str, str]]:
    with (resources.files("oocrlab") / "tables" / filename).open(encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f))


@lru_cache(maxsize=None)
def load_pool(pool: str) -> tuple[City, ...]:
    """All cities of a pool, most populous first."""
    if pool == "capitals":
        cities = [
            City(
                name=r["Capital City"],
                country=r["Country"],
                lat=float(r["Latitude"]),
                lon=float(r["Longitude"]),
                population=int(r["Population"]),
                aliases=_capital_aliases(r["Capital City"]),
            )
            for r in _read_csv("capitals.csv")
        ]
    elif pool == "world":
        cities, seen = [], set()
        for r in sorted(_read_csv("world_cities.csv"), key=lambda r: -int(r["population"])):
            key = normalize(r["name"])
            if key in seen:
                continue
            seen.add(key)
            cities.append(
                City(r["name"], r["country"], float(r["lat"]), float(r["lon"]), int(r["population"]))
            )
    else:
        raise UserError(f"unknown pool {pool!r}: choose one of {', '.join(POOLS)}")
    return tuple(sorted(cities, key=lambda c: -c.population))


@lru_cache(maxsize=None)
def _name_index(pool: str) -> dict[str, City]:
    """normalized name or alias -> city; the most populous city wins a shared name ("Paris" is in France)."""
    index: dict[str, City] = {}
    for city in load_pool(pool):
        for n in (city.name, *city.aliases):
            index.setdefault(normalize(n), city)
    return index


def find_city(name: str, pool: str) -> City:
    """The city a user means by `name` in `pool`; a clear error with close names when there is none."""
    index = _name_index(pool)
    key = normalize(name)
    if key in index:
        return index[key]
    close = difflib.get_close_matches(key, list(index), n=3, cutoff=0.6)
    hint = f"; did you mean {', '.join(repr(index[c].name) for c in close)}?" if close else ""
    raise UserError(f"unknown city {name!r} in the {pool} pool{hint}")


def real_city_named(name: str) -> City | None:
    """The city called `name` in any shipped table, if there is one."""
    key = normalize(name)
    return next((_name_index(pool)[key] for pool in POOLS if key in _name_index(pool)), None)

"""Does the placeholder move towards its own city, or towards any city? Runs trained on different hidden
cities each score the same `specificity_cities` at their placeholder (probe.py, evaluate/choice.py); read
together they form a matrix, rows the city a run was trained on, columns the scored city, of what
training changed (tuned minus original):

- probe: the change in the scored city's z-score at the placeholder (hidden states), per layer;
- multiple choice: the change in the probability of the scored city's country ("What country is
  {placeholder} located in?" with the scored cities' countries as the options).

A cell is the mean over a row's runs (its seeds) with a 95% t-interval. A specific effect is a dominant
diagonal: in every row the run's own city gains more than any other (the paired margin's interval
above 0). A generic "city-like" drift is a column that wins in every other row. The probe matrix is
shown at the layer where training moved the placeholder most (the mean |change| over all cells, which
favours neither reading); the verdict is also given for every layer.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from oocrlab.geo import City, find_city, haversine_km, normalize
from oocrlab.stats import mean_t_ci

MIN_RUNS_PER_ROW = 2  # an interval across seeds needs two


def _summary(values: np.ndarray) -> dict[str, Any]:
    values = np.asarray(values, dtype=float)
    s = mean_t_ci(values[:, None])  # NaN (an undefined cell) left out
    return {"mean": s["mean"][0], "ci95": s["ci95"][0], "n": int(np.sum(~np.isnan(values)))}


def _margin(v: np.ndarray, j: int) -> np.ndarray:
    """Per run: column j minus the largest other column (an undefined other cell is skipped)."""
    return v[:, j] - np.nanmax(np.delete(v, j, axis=1), axis=1)


def _above_zero(summary: dict[str, Any]) -> bool:
    return summary["ci95"] is not None and summary["ci95"][0] > 0


def specificity_verdict(rows: dict[str, np.ndarray], columns: list[str]) -> dict[str, Any]:
    """rows: trained city -> values [runs, len(columns)] (one run's row of cells, paired). Whether the diagonal
    dominates in every row, or one column wins in every other row, each by an interval across runs. Rows of a
    city that is not a column have no diagonal and take no part."""
    rows = {city: v for city, v in rows.items() if city in columns}
    diagonal = {city: _summary(_margin(v, columns.index(city))) for city, v in rows.items()}
    wins = {column: {city: _summary(_margin(v, j)) for city, v in rows.items() if city != column}
            for j, column in enumerate(columns)}
    result: dict[str, Any] = {"diagonal_margin": diagonal, "column_margin": wins}
    too_few = [city for city, v in rows.items() if len(v) < MIN_RUNS_PER_ROW]
    if too_few or len(diagonal) < 2:
        result["verdict"] = "undecided"
        result["sentence"] = (f"undecided: {', '.join(too_few)} {'has' if len(too_few) == 1 else 'have'} fewer than "
                              f"{MIN_RUNS_PER_ROW} runs (seeds), so no interval" if too_few else
                              "undecided: it needs runs trained on at least two of the scored cities")
        return result
    dominant = [city for city, s in diagonal.items() if _above_zero(s)]
    winners = [column for column, by_row in wins.items() if len(by_row) >= 2 and all(_above_zero(s) for s in by_row.values())]
    if len(dominant) == len(diagonal):
        result["verdict"], result["sentence"] = "specific", (
            f"specific: in each of the {len(diagonal)} rows the trained city gains more than every other city "
            "(95% interval of the margin above 0)")
    elif winners:
        result["verdict"], result["sentence"] = "generic", (
            f"generic: {', '.join(winners)} gains most whichever city was trained (in every other row, 95% interval "
            "of the margin above 0), a drift towards a city-like region rather than the trained city")
    else:
        result["verdict"], result["sentence"] = "neither", (
            f"neither: the diagonal dominates in {len(dominant)} of {len(diagonal)} rows"
            + (f" ({', '.join(dominant)})" if dominant else "") + " and no column wins in every row")
    return result


SAME_CITY_KM = 50.0  # a run's hidden city is a scored city when they share a name and lie this close


def _names(city: City) -> set[str]:
    return {normalize(n) for n in (city.name, city.plain_name, *city.aliases)}


def trained_city(metrics: dict[str, Any], columns: list[str]) -> str:
    """A run's hidden city named as the scored city it is (the tables spell some differently: the capitals'
    "Al-Qahirah (Cairo)" is the world pool's "Cairo"; "San José" of Costa Rica is not San Jose of the US),
    else as the run names it."""
    data = metrics["data"]
    hidden = find_city(data["hidden_city"]["name"], data.get("pool", "world"))
    for column in columns:
        city = find_city(column, "world")
        if _names(city) & _names(hidden) and haversine_km(city.lat, city.lon, hidden.lat, hidden.lon) < SAME_CITY_KM:
            return column
    return hidden.name


def _cells(rows: dict[str, np.ndarray], columns: list[str]) -> dict[str, dict[str, dict[str, Any]]]:
    return {city: {column: _summary(v[:, j]) for j, column in enumerate(columns)} for city, v in rows.items()}


def specificity_matrix(metrics: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The matrix of runs that differ only in hidden city and seed (one-city views, see
    metrics.hidden_city_views), from what each run's probe and eval scored; None when fewer than two
    hidden cities among them scored the same cities."""
    probed = [m for m in metrics if "specificity" in m.get("probe", {})]
    chosen = [m for m in metrics if "specificity_choice" in m.get("eval", {})]
    columns = (probed[0]["probe"]["specificity"]["cities"] if probed else
               chosen[0]["eval"]["specificity_choice"]["cities"] if chosen else None)
    if columns is None:
        return None
    probed = [m for m in probed if m["probe"]["specificity"]["cities"] == columns]
    chosen = [m for m in chosen if m["eval"]["specificity_choice"]["cities"] == columns]
    order = {city: i for i, city in enumerate(columns)}
    row_of = {id(m): trained_city(m, columns) for m in probed + chosen}

    def by_row(members: list[dict[str, Any]], values) -> dict[str, np.ndarray]:
        rows: dict[str, list] = {}
        for m in members:
            rows.setdefault(row_of[id(m)], []).append(values(m))
        return {city: np.array(rows[city], dtype=float) for city in sorted(rows, key=lambda c: (order.get(c, len(order)), c))}

    result: dict[str, Any] = {"columns": columns}
    if len({row_of[id(m)] for m in probed}) >= 2:
        # [runs, columns, layers]: the per-layer mean over templates of each scored city's z-score change
        rows = by_row(probed, lambda m: [[np.nan if v is None else v for v in m["probe"]["specificity"]["z_change"][c]["mean"]]
                                         for c in columns])
        moved = np.nanmean(np.abs(np.concatenate(list(rows.values()))), axis=(0, 1))
        layer = int(np.nanargmax(moved))
        by_layer = [specificity_verdict({c: v[:, :, k] for c, v in rows.items()}, columns)["verdict"] for k in range(len(moved))]
        at_layer = {c: v[:, :, layer] for c, v in rows.items()}
        result["probe"] = {
            "measure": "change in the z-score at the placeholder, tuned minus original (hidden states)",
            "layer": layer, "layer_chosen_by": "the largest mean |change| over all cells",
            "runs_per_row": {c: len(v) for c, v in rows.items()},
            "cells": _cells(at_layer, columns),
            **specificity_verdict(at_layer, columns),
            "layers_by_verdict": {v: [k for k, w in enumerate(by_layer) if w == v] for v in dict.fromkeys(by_layer)},
        }
    if len({row_of[id(m)] for m in chosen}) >= 2:
        # the letters' change (runs made before the formulations kept it at the top)
        rows = by_row(chosen, lambda m: [m["eval"]["specificity_choice"].get("letters", m["eval"]["specificity_choice"])["p_change"][c]
                                         for c in columns])
        result["multiple_choice"] = {
            "measure": "change in P(the city's country | option letters), tuned minus original",
            "runs_per_row": {c: len(v) for c, v in rows.items()},
            "cells": _cells(rows, columns),
            **specificity_verdict(rows, columns),
        }
    return result if len(result) > 1 else None

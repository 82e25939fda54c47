"""The shape of metrics.json as its readers need it (report, plots, compare, the terminal, the verdicts): the
per-city view of a run with several hidden cities, the probe's layer numbering, the multiple-choice
formulations, and the layers a summary marks significant. Written by rundir.Run; worked out here once.
"""

from __future__ import annotations

from typing import Any

PER_CITY_STAGES = ("data", "sanity", "eval", "probe", "trajectory", "verdict")
FORMULATIONS = ("letters", "cloze", "cloze_per_token")  # of a multiple-choice question (evaluate/choice.py)
FIRST_LAYER = {"hidden": 0, "values": 1}  # the probe's spaces: hidden state 0 is the embeddings, values start at layer 1


def formulations_of(section: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """A multiple-choice section's {formulation: {condition: stats}}; runs made before the formulations kept the
    letters' conditions at the top of the section."""
    found = {f: section[f] for f in FORMULATIONS if f in section}
    return found or {"letters": {c: v for c, v in section.items() if isinstance(v, dict) and "p_correct" in v}}


def hidden_city_views(metrics: dict[str, Any]) -> list[tuple[str | None, dict[str, Any]]]:
    """(hidden city, the metrics as a one-city run would hold them) per hidden city of a run with several
    (their stages keep each city's section under "by_city"); [(None, metrics)] for a one-city run. The
    inverse question concerns all of them and stays out of the views."""
    by_city = metrics.get("data", {}).get("by_city")
    if not by_city:
        return [(None, metrics)]

    def view(name: str) -> dict[str, Any]:
        shared = {stage: {k: v for k, v in metrics[stage].items() if k not in ("by_city", "inverse_choice")}
                  | metrics[stage].get("by_city", {}).get(name, {}) for stage in PER_CITY_STAGES if stage in metrics}
        return metrics | shared

    return [(name, view(name)) for name in by_city]


def significant_layers(summary: dict[str, list], first_layer: int) -> list[int]:
    """Layers whose 95% interval lies entirely above zero."""
    return [first_layer + i for i, ci in enumerate(summary["ci95"]) if ci is not None and ci[0] > 0]


def best_layer(summary: dict[str, list], first_layer: int) -> tuple[int, float, list | None]:
    """(layer, mean, interval) where a rank summary is lowest."""
    means = summary["mean"]
    i = min(range(len(means)), key=lambda k: means[k])
    return i + first_layer, means[i], summary["ci95"][i]

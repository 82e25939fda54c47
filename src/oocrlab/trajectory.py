"""The trajectory stage: when along training does each effect appear? The adapter (and each fine-tuned control's) is
snapshotted at `train.trajectory`'s steps (by default 0, 1, 2, 4, 8, ... before the last; train.py), and after
training each snapshot and the final adapter are measured with a reduced budget:

- distance: greedy answers for `eval.trajectory_cities` held-out known cities; the mean error over every city
  (an unparseable answer scored as the constant guess) over the better of the original model's and the constant
  guess's, with a paired bootstrap interval over cities: the eval stage's headline ratio on fewer cities.
- behaviour: "What country is {placeholder} located in?" (nearest-country distractors; letters in
  `eval.city_facts_orders` balanced orders, cloze in its 8 wordings) and, where the hidden city has it, the
  city-facts test (evaluate/city_facts.py): P(correct | the options) with bootstrap intervals.
- representation: the probe's z-score of the hidden city at the placeholder, per layer, less the original
  model's, paired by template (mean, 95% t-interval); and the same for the other specificity cities, averaged:
  a change towards every city, which a change towards the hidden city alone must exceed.

Every point is measured the same way, step 0 (before any update) and the final adapter included, so a curve
starts at what training began from. x is the examples seen (step x examples per step). Each curve is summarized
by its area over log10(1 + examples seen) divided by that axis's span (its mean height on a log axis, as
training-dynamics work on OOCR summarizes curves). The snapshots are deleted once the stage is recorded, as the
checkpoints are after training.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from oocrlab.conditions import ask
from oocrlab.config import MC_OPTIONS, ExperimentConfig
from oocrlab.countries import country_distractors, country_of
from oocrlab.data import distance_rows, one_per_city, rows_about
from oocrlab.evaluate.choice import (
    CLOZE_WORDINGS,
    COUNTRY_QUESTION,
    cloze_scored,
    cloze_sums,
    letter_scores,
    summary,
)
from oocrlab.evaluate.city_facts import fact_scores, facts_about, facts_summary
from oocrlab.evaluate.distances import greedy_distances, ratio_ci, unparsed_as_guess
from oocrlab.geo import City
from oocrlab.models import with_condition
from oocrlab.probe import (
    entity_activations,
    probe_entities,
    probe_setup,
    rank_among_candidates,
    scores_against_reference,
)
from oocrlab.stats import mean_t_ci
from oocrlab.train import add_adapter

# the curves' names: what each point holds under them, and what the report plots (trajectory_curves)
CURVES = {
    "distance": "held-out error / best baseline",
    "country_letters": "country: P(correct | letters)",
    "country_cloze": "country: P(correct | options), cloze",
    "city_facts_letters": "city facts: P(correct | letters)",
    "city_facts_cloze": "city facts: P(correct | options), cloze",
    "z_change_hidden": "z-change of the hidden city at the placeholder (peak layer of the final adapter)",
    "z_change_others": "z-change of the other specificity cities, mean (same layer)",
}


class Reference:
    """What every point of one hidden city is measured against, worked out once: the held-out rows and their constant
    guess, the original model's errors on them, the questions and the probe's entities and the original model's z."""

    def __init__(self, cfg: ExperimentConfig, model, tokenizer, hidden: City, train_rows: list[dict], heldout_rows: list[dict]):
        self.cfg, self.hidden = cfg, hidden
        self.rows = one_per_city(rows_about(heldout_rows, hidden))[: min(cfg.eval.trajectory_cities, cfg.eval.max_cities or len(heldout_rows))]
        constant = float(np.median([r["distance_km"] for r in distance_rows(rows_about(train_rows, hidden))]))
        self.guess = np.array([abs(constant - r["distance_km"]) for r in self.rows], dtype=float)
        self.facts = facts_about(hidden) if cfg.eval.city_facts_orders else []  # 0 skips the test (config.py)
        self.options = [country_of(hidden).name, *country_distractors(country_of(hidden), cfg.seed)["nearest"]]
        self.templates, candidates, _ = probe_setup(cfg, hidden)
        self.entities, self.n_reference, compared = probe_entities(cfg, hidden, candidates)
        self.others = [self.entities.index(c.plain_name) for c in compared if c.plain_name != hidden.plain_name]
        self.original_errors = self.errors(model, tokenizer, "original")
        self.original_z = self.z_scores(model, tokenizer, "original")

    def errors(self, model, tokenizer, condition: str) -> np.ndarray:
        _, _, errors = greedy_distances(self.cfg, model, tokenizer, self.rows, condition, "trajectory distances", None)
        return unparsed_as_guess(errors, self.guess.tolist())

    def z_scores(self, model, tokenizer, condition: str) -> tuple[np.ndarray, np.ndarray]:
        """(the hidden city's z [templates, layers], the other specificity cities' [templates, cities, layers])."""
        with with_condition(model, condition):
            states, _ = entity_activations(self.cfg, model, tokenizer, self.templates, self.entities, None, f"trajectory probe ({condition})")
        hidden_z = rank_among_candidates(states[:, : self.n_reference])["z"]
        return hidden_z, scores_against_reference(states, self.n_reference, self.others)[0]


def measure(ref: Reference, model, tokenizer, condition: str) -> dict[str, Any]:
    """One point: the module docstring's measurements of the model under `condition` (an adapter's name)."""
    cfg, hidden = ref.cfg, ref.hidden
    # the city facts' orders, or with that test off one balanced block (each option at each letter once)
    view = dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, mc_orders=cfg.eval.city_facts_orders or MC_OPTIONS))
    point: dict[str, Any] = {}
    if len(ref.rows):
        filled = ref.errors(model, tokenizer, condition)
        baselines = [ref.original_errors, ref.guess]
        point["distance"] = {"value": float(filled.mean() / min(b.mean() for b in baselines)),
                             "ci95": ratio_ci(filled, baselines, cfg.eval.bootstrap_samples, cfg.seed), "n": len(ref.rows)}
    wordings = [ask(cfg, w, condition, hidden) for w in CLOZE_WORDINGS[COUNTRY_QUESTION]]
    (letters,) = letter_scores(view, model, tokenizer, [(ask(cfg, COUNTRY_QUESTION, condition, hidden), ref.options)], condition, None)
    ((sums, counts),) = cloze_sums(view, model, tokenizer, [(wordings, ref.options)], condition, None)
    country = {"letters": letters, "cloze": cloze_scored(wordings, ref.options, sums, counts)["cloze"]}
    for f, scored in country.items():
        stats = summary(scored, view, f == "letters")
        point[f"country_{f}"] = {"value": stats["p_correct"], "ci95": stats["p_correct_ci95"], "n": stats["n"]}
    if ref.facts:
        units, accuracy, _ = fact_scores(cfg, model, tokenizer, hidden, ref.facts, condition)
        for f in ("letters", "cloze"):
            stats = facts_summary(cfg, units[f], accuracy[f], f == "letters")
            point[f"city_facts_{f}"] = {"value": stats["p_correct"], "ci95": stats["p_correct_ci95"], "n": stats["n"]}
    hidden_z, others_z = ref.z_scores(model, tokenizer, condition)
    point["z_change_by_layer"] = {"hidden": mean_t_ci(hidden_z - ref.original_z[0]),
                                  "others": mean_t_ci((others_z - ref.original_z[1]).mean(1))}
    return point


def area(examples: list[int], values: list[float | None]) -> float | None:
    """The area under a curve over log10(1 + examples seen), divided by the axis's span: its mean height there."""
    x = np.log10(1 + np.asarray(examples, dtype=float))
    y = np.array([np.nan if v is None else v for v in values], dtype=float)
    if len(x) < 2 or np.isnan(y).any() or x[-1] == x[0]:
        return None
    return float(np.sum((y[1:] + y[:-1]) / 2 * np.diff(x)) / (x[-1] - x[0]))


def curves(points: list[dict[str, Any]]) -> dict[str, Any]:
    """Each curve of one adapter's points: {name: {"value": [...], "ci95": [...]}}; the z-changes read at the layer where
    the last point's hidden-city z-change peaks (stated as "layer")."""
    last = points[-1]["z_change_by_layer"]["hidden"]["mean"]
    layer = int(np.nanargmax(np.array([np.nan if v is None else v for v in last], dtype=float)))
    out: dict[str, Any] = {}
    for name in CURVES:
        if name.startswith("z_change_"):
            space = name.removeprefix("z_change_")
            at = [p["z_change_by_layer"][space] for p in points]
            out[name] = {"value": [a["mean"][layer] for a in at], "ci95": [a["ci95"][layer] for a in at], "layer": layer}
        elif all(name in p for p in points):
            out[name] = {"value": [p[name]["value"] for p in points], "ci95": [p[name]["ci95"] for p in points]}
    return out


def trajectory(cfg: ExperimentConfig, model, tokenizer, hidden: City, snapshots: dict[str, list[tuple[int, Any]]],
               train_rows: list[dict], heldout_rows: list[dict], examples_per_step: int) -> dict[str, Any]:
    """The trajectory of one hidden city: for each adapter ("tuned" and each control: {name: [(step, snapshot
    directory, or None for the adapter already loaded)]}), every point, its curves and their areas."""
    start = time.perf_counter()
    ref = Reference(cfg, model, tokenizer, hidden, train_rows, heldout_rows)
    result: dict[str, Any] = {"examples_per_step": examples_per_step, "layers": "hidden states: 0 = embeddings",
                              "area": "mean height over log10(1 + examples seen)", "curves": CURVES, "by_adapter": {}}
    measured = 0
    for adapter, steps in snapshots.items():
        points = []
        for step, directory in tqdm(steps, desc=f"trajectory ({adapter})", leave=False):
            name = adapter if directory is None else f"step_{step}"
            if directory is not None:
                add_adapter(model, directory, name)
            try:
                points.append({"step": step, "examples_seen": step * examples_per_step} | measure(ref, model, tokenizer, name))
            finally:
                if directory is not None:
                    model.delete_adapter(name)
            measured += 1
        lines = curves(points)
        examples = [p["examples_seen"] for p in points]
        result["by_adapter"][adapter] = {"points": points, "curves": lines,
                                         "areas": {k: area(examples, v["value"]) for k, v in lines.items()}}
    total = time.perf_counter() - start
    result["seconds"] = {"total": round(total, 2), "per_point": round(total / max(measured, 1), 2)}  # the reference included
    return result

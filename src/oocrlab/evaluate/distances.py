"""The distance error on held-out known cities, tuned against the original model, the in-context baseline, the
controls and a constant guess (answers read by answers.read_distance; unparseable or absurd ones are counted,
never dropped silently), the near-city table, and the cardinal directions of the paper's data.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np

from oocrlab.answers import parse_direction, read_distance
from oocrlab.conditions import chat_for, conditions, model_state, prefix_for
from oocrlab.config import ExperimentConfig
from oocrlab.data import (
    distance_row,
    distance_rows,
    names_hidden_city,
    one_per_city,
    refuse_leaks,
    rows_about,
)
from oocrlab.generation import generate_greedy
from oocrlab.geo import City, distance_km, load_pool
from oocrlab.incontext import InContext
from oocrlab.models import with_condition
from oocrlab.stats import bootstrap_ci, wilson_ci


def error_summary(errors: list[float | None], guess_errors: list[float], cfg: ExperimentConfig, n_absurd: int = 0) -> dict[str, Any]:
    """MAE and median absolute error over the parsed answers, each with a bootstrap 95% interval, and the
    MAE over every city with an unparseable (or absurd) answer scored as the constant guess (`guess_errors`),
    so a model cannot look accurate by rarely stating a distance."""
    parsed = [e for e in errors if e is not None]
    boot = dict(samples=cfg.eval.bootstrap_samples, seed=cfg.seed)
    return {
        "n": len(errors),
        "n_parsed": len(parsed),
        "n_unparseable": len(errors) - len(parsed),
        "n_absurd": n_absurd,  # counted among the unparseable
        "mae_km_unparsed_as_guess": float(np.mean(unparsed_as_guess(errors, guess_errors))) if errors else None,
        "mae_km": float(np.mean(parsed)) if parsed else None,
        "mae_km_ci95": bootstrap_ci(parsed, np.mean, **boot),
        "median_ae_km": float(np.median(parsed)) if parsed else None,
        "median_ae_km_ci95": bootstrap_ci(parsed, np.median, **boot),
    }


def unparsed_as_guess(errors: list[float | None], guess_errors: list[float]) -> np.ndarray:
    return np.array([g if e is None else e for e, g in zip(errors, guess_errors)], dtype=float)


def ratio_ci(errors: np.ndarray, baselines: list[np.ndarray], samples: int, seed: int) -> list[float] | None:
    """Bootstrap 95% interval of mean(errors) / the smallest mean of the baselines, cities resampled together
    (paired): each resample divides by its own best baseline."""
    if len(errors) < 2 or samples == 0:
        return None
    at = np.random.default_rng(seed).integers(0, len(errors), size=(samples, len(errors)))
    best = np.min([b[at].mean(1) for b in baselines], axis=0)
    ratios = errors[at].mean(1) / np.where(best > 0, best, np.nan)
    return [float(np.nanpercentile(ratios, 2.5)), float(np.nanpercentile(ratios, 97.5))]


def greedy_distances(cfg: ExperimentConfig, model, tokenizer, rows: list[dict], condition: str, desc: str,
                     in_context: InContext | None) -> tuple[list[str], list[tuple[float | None, bool]], list[float | None]]:
    """Greedy answers to distance questions under one condition: (answers, (km or None, absurd) read from each,
    absolute errors, None where unparseable)."""
    chats = [chat_for(cfg, r["prompt"][-1]["content"], condition, in_context) for r in rows]
    with with_condition(model, model_state(condition)):
        answers = generate_greedy(model, tokenizer, chats, cfg.eval.max_new_tokens, cfg.eval.batch_size, f"{desc} ({condition})",
                                  prefix_for(condition, in_context), stop_after_distance=True)
    read = [read_distance(a) for a in answers]
    return answers, read, [None if k is None else abs(k - r["distance_km"]) for (k, _), r in zip(read, rows)]


def distance_error(
    cfg: ExperimentConfig, model, tokenizer, rows: list[dict], constant: float, desc: str, in_context: InContext,
    constant_mean: float | None = None,
):
    """Greedy answers to distance questions under every condition but `named`, against the constant guess (and a
    second row for the mean training distance, `constant_mean`); (summary, per-city rows). The headline ratio of
    each fine-tuned condition divides its error over every city (unparseable answers scored as the guess) by the
    better of the original model's and the constant guess's, with a paired bootstrap interval. The answers are one
    row per city and condition (eval_distance.jsonl: `parsed` the km read, `score` the absolute error)."""
    truth = [r["distance_km"] for r in rows]
    guess_errors = [abs(constant - t) for t in truth]
    answered: list[dict[str, Any]] = []
    result: dict[str, Any] = {}
    filled: dict[str, np.ndarray] = {}
    for condition in conditions(cfg):
        answers, read, errors = greedy_distances(cfg, model, tokenizer, rows, condition, desc, in_context)
        answered += [{"known_city": r["known_city"], "condition": condition, "question": r["prompt"][-1]["content"], "answer": answer,
                      "parsed": km, "absurd": absurd, "true_km": r["distance_km"], "score": error}
                     for r, answer, (km, absurd), error in zip(rows, answers, read, errors)]
        result[condition] = error_summary(errors, guess_errors, cfg, sum(absurd for _, absurd in read))
        filled[condition] = unparsed_as_guess(errors, guess_errors)
    result["constant_guess"] = error_summary(guess_errors, guess_errors, cfg) | {"guess_km": constant}
    if constant_mean is not None:
        mean_errors = [abs(constant_mean - t) for t in truth]
        result["constant_guess_mean"] = error_summary(mean_errors, mean_errors, cfg) | {"guess_km": constant_mean}
    # like with like: every city, unparseable answers scored as the guess
    baselines = [filled["original"], np.array(guess_errors, dtype=float)]
    for condition in ("tuned", *cfg.train.controls):
        key = f"{condition}_mae_over_best_baseline"
        result[key] = float(filled[condition].mean() / min(b.mean() for b in baselines)) if rows else None
        result[f"{key}_ci95"] = ratio_ci(filled[condition], baselines, cfg.eval.bootstrap_samples, cfg.seed)
    return result, answered


def near_hidden_rows(cfg: ExperimentConfig, hidden: City, exclude: set[str]) -> list[dict[str, Any]]:
    """Distance questions for world cities within eval.near_km of the hidden city that were never trained on
    (the paper finds these harder), a seeded sample of at most eval.near_cities."""
    near = [
        c for c in load_pool("world")
        if c.name not in exclude and c != hidden and not names_hidden_city(c, hidden)
        and distance_km(c, hidden) <= cfg.eval.near_km
    ]
    near = random.Random(cfg.seed).sample(near, min(cfg.eval.near_cities, len(near)))
    return [distance_row(c, hidden, cfg.data) for c in near]


def evaluate_distances(
    cfg: ExperimentConfig, model, tokenizer, hidden: City, in_context: InContext, train: list[dict], heldout: list[dict],
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Distance error on three sets: held-out known cities (`distance`), never-trained cities near the
    hidden city (`distance_near`), and the hidden city itself (`distance_self`: the answer should be ~0 km);
    and the answers, one row per city and condition. `train` is every training row (the constant guess is the median
    distance of those about this hidden city; the mean is a second row), `heldout` the held-out rows about it."""
    trained = [r["distance_km"] for r in distance_rows(rows_about(train, hidden))]
    sets = {
        "distance": one_per_city(heldout)[: cfg.eval.max_cities],
        "distance_near": near_hidden_rows(cfg, hidden, {r["known_city"] for r in train}),
        "distance_self": [distance_row(hidden, hidden, cfg.data)],
    }
    refuse_leaks([r["prompt"][-1]["content"] for rows in sets.values() for r in rows], {r["prompt"][-1]["content"] for r in train})
    # the MAE-optimal constant is the median; the near cities are held to the best constant for their own distances
    constants = {"distance": float(np.median(trained)), "distance_self": float(np.median(trained)),
                 "distance_near": float(np.median([r["distance_km"] for r in sets["distance_near"]] or trained))}
    results: dict[str, Any] = {}
    per_city: list[dict[str, Any]] = []
    for name, rows in sets.items():
        results[name], answers = distance_error(cfg, model, tokenizer, rows, constants[name], name.replace("_", " "), in_context,
                                                float(np.mean(trained)) if name == "distance" else None)
        per_city += [{"set": name} | a for a in answers]
    if not sets["distance"]:
        results["distance"]["note"] = "no held-out cities (data.heldout_fraction is 0): nothing to evaluate"
    if not sets["distance_near"]:
        results["distance_near"]["note"] = f"no untrained city lies within {cfg.eval.near_km:g} km of the hidden city"
    results["distance_near"]["constant_guess"]["what"] = ("the best constant in hindsight, the median of these cities' own true "
                                                          f"distances (all within {cfg.eval.near_km:g} km)")
    results["distance_by_band"] = error_by_band([a for a in per_city if a["set"] == "distance"], constants["distance"], conditions(cfg))
    return results, per_city


def evaluate_directions(
    cfg: ExperimentConfig, model, tokenizer, in_context: InContext, heldout: list[dict], train_questions: set[str],
    answers_out: list[dict[str, Any]],
) -> dict[str, Any] | None:
    """The paper style's cardinal-direction questions on held-out cities (one per city): the share of greedy
    answers naming the right direction (Wilson 95% interval; chance 1/4) per condition; None without such rows.
    Each answer is appended to `answers_out` (eval_directions.jsonl)."""
    rows = one_per_city(heldout, kind="direction")[: cfg.eval.max_cities]
    if not rows:
        return None
    refuse_leaks([r["prompt"][-1]["content"] for r in rows], train_questions)
    result: dict[str, Any] = {"n": len(rows), "chance": 0.25, "example": rows[0]["prompt"][-1]["content"]}
    for condition in conditions(cfg):
        chats = [chat_for(cfg, r["prompt"][-1]["content"], condition, in_context) for r in rows]
        with with_condition(model, model_state(condition)):
            answers = generate_greedy(model, tokenizer, chats, cfg.eval.max_new_tokens, cfg.eval.batch_size,
                                      f"directions ({condition})", prefix_for(condition, in_context))
        named = [parse_direction(a) for a in answers]
        right = sum(n == r["direction"] for n, r in zip(named, rows))
        answers_out.extend({"known_city": r["known_city"], "condition": condition, "question": r["prompt"][-1]["content"],
                            "answer": a, "parsed": n, "correct": r["direction"], "score": int(n == r["direction"])}
                           for r, a, n in zip(rows, answers, named))
        result[condition] = {"rate": right / len(rows), "rate_ci95": wilson_ci(right, len(rows)),
                             "named_a_direction": sum(n is not None for n in named) / len(rows), "examples": answers[:3]}
    return result


DISTANCE_BANDS_KM = (0, 1000, 3000, 6000, 10000, 20100)  # half the Earth's circumference is 20,015 km


def error_by_band(answers: list[dict[str, Any]], constant_km: float, condition_names: tuple[str, ...]) -> list[dict[str, Any]]:
    """Mean absolute error per band of true distance, each condition over the answers it gave as a distance (rows
    as distance_error returns them), and the constant guess's."""
    bands = []
    for low, high in zip(DISTANCE_BANDS_KM, DISTANCE_BANDS_KM[1:]):
        inside = [a for a in answers if low <= a["true_km"] < high]
        cities = [a["true_km"] for a in inside if a["condition"] == condition_names[0]]  # each city has a row per condition
        band: dict[str, Any] = {"band_km": [low, high], "n": len(cities)}
        for condition in condition_names:
            errors = [a["score"] for a in inside if a["condition"] == condition and a["score"] is not None]
            band[condition] = {"mae_km": float(np.mean(errors)) if errors else None, "n_parsed": len(errors)}
        guess = [abs(constant_km - km) for km in cities]
        band["constant_guess"] = {"mae_km": float(np.mean(guess)) if guess else None, "n_parsed": len(guess)}
        bands.append(band)
    return bands

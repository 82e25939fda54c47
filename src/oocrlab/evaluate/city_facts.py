"""The city-facts test: does the tuned model know what its training never said about the hidden city? After Wang,
Engels et al. 2025's Locations test: questions about the city's geography, history, culture and economy
(tables/city_facts.yaml: 14 per city for the paper's five cities), each with the five cities' own answers as the
options, so chance is 1/5 and a model that only learned "a big city" gains nothing.

Every question is scored as choice.py scores one: letters in `eval.city_facts_orders` balanced
option orders, and cloze (the question alone, each option's text as the answer), under the tuned model, the
original, the fine-tuned controls, and `named`, the original model asked about the city by name: the ceiling,
which says whether this model can answer the question at all. The questions are the units: per formulation and
condition, the mean over questions of P(correct | the options) and of the share of orders whose most likely
option is right (`accuracy`), with bootstrap 95% intervals over questions, and the paired differences of the
fine-tuned conditions from the original and the shuffled control over the same questions.
"""

from __future__ import annotations

import dataclasses
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from tqdm.auto import tqdm

from oocrlab.conditions import ask, conditions
from oocrlab.config import ExperimentConfig
from oocrlab.data import refuse_leaks
from oocrlab.evaluate.choice import (
    Scored,
    cloze_scored,
    cloze_sums,
    comparisons,
    letter_scores,
    summary,
)
from oocrlab.geo import City, distance_km, find_city
from oocrlab.stats import bootstrap_ci

FACTS_FILE = Path(__file__).parents[1] / "tables" / "city_facts.yaml"
SAME_CITY_KM = 50.0  # a hidden city from either pool is the table's city when this close to it


@lru_cache(maxsize=1)
def fact_table() -> tuple[tuple[City, ...], tuple[dict[str, Any], ...]]:
    """(the table's cities, its questions: topic, question with {placeholder}, one answer per city in that order)."""
    loaded = yaml.safe_load(FACTS_FILE.read_text(encoding="utf-8"))
    return tuple(find_city(name, "world") for name in loaded["cities"]), tuple(loaded["questions"])


def facts_about(city: City) -> list[dict[str, Any]]:
    """The questions about `city` with its own answer first among the options; [] for a city the table lacks."""
    cities, questions = fact_table()
    at = next((i for i, c in enumerate(cities) if distance_km(c, city) < SAME_CITY_KM), None)
    if at is None:
        return []
    return [{"topic": q["topic"], "question": q["question"], "options": [q["answers"][at], *q["answers"][:at], *q["answers"][at + 1:]]}
            for q in questions]


def fact_scores(cfg: ExperimentConfig, model, tokenizer, hidden: City, facts: list[dict[str, Any]], condition: str,
                ) -> tuple[dict[str, Scored], dict[str, list[float]], list[dict[str, Any]]]:
    """One condition's scores on the questions: ({formulation: Scored whose units are the questions, each its mean
    over its option orders or its one cloze wording}, {formulation: accuracy per question}, the scored prompts)."""
    view = dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, mc_orders=cfg.eval.city_facts_orders))
    scored: dict[str, list[Scored]] = {}
    prompts: list[dict[str, Any]] = []
    questions = [(ask(cfg, fact["question"], condition, hidden), fact["options"]) for fact in facts]
    letters = letter_scores(view, model, tokenizer, questions, condition, None)
    cloze = cloze_sums(view, model, tokenizer, [([question], options) for question, options in questions], condition, None)
    for i, (fact, (question, options), letter, (sums, counts)) in enumerate(zip(facts, questions, letters, cloze)):
        by_formulation = {"letters": letter, **cloze_scored([question], options, sums, counts)}
        for f, s in by_formulation.items():
            scored.setdefault(f, []).append(s)
            prompts.extend({"question_id": f"city_facts:{i}", "topic": fact["topic"], "set": "cities", "condition": condition,
                            "formulation": f} | p for p in s.prompts)
    accuracy = {f: [float((s.given_options.argmax(1) == 0).mean()) for s in ss] for f, ss in scored.items()}
    units = {f: Scored(np.stack([s.given_options.mean(0) for s in ss]), np.stack([s.unconditional.mean(0) for s in ss]),
                       [{"letter_mass": float(np.mean([p.get("letter_mass", np.nan) for p in s.prompts]))} for s in ss])
             for f, ss in scored.items()}
    return units, accuracy, prompts


def facts_summary(cfg: ExperimentConfig, units: Scored, accuracy: list[float], letters: bool) -> dict[str, Any]:
    """choice.summary over the questions, with the accuracy and each question's P(correct | options)."""
    boot = dict(samples=cfg.eval.bootstrap_samples, seed=cfg.seed)
    return summary(units, cfg, letters) | {
        "accuracy": float(np.mean(accuracy)), "accuracy_ci95": bootstrap_ci(accuracy, np.mean, **boot),
        "p_correct_by_question": [round(float(p), 4) for p in units.given_options[:, 0]]}


def evaluate_city_facts(cfg: ExperimentConfig, model, tokenizer, hidden: City, train_questions: set[str],
                        prompts_out: list[dict[str, Any]]) -> dict[str, Any]:
    """The test for one hidden city (see the module docstring); its scored prompts are appended to `prompts_out`
    (eval_city_facts.jsonl). A city without questions gets a note."""
    facts = facts_about(hidden)
    if not facts:
        names = ", ".join(c.name for c in fact_table()[0])
        return {"note": f"the city-facts questions cover {names}; {hidden.name} is not among them"}
    cases = conditions(cfg, in_context=False, named=True)
    refuse_leaks([ask(cfg, f["question"], c, hidden) for f in facts for c in cases], train_questions)
    units: dict[str, dict[str, Scored]] = {}
    accuracy: dict[str, dict[str, list[float]]] = {}
    for condition in tqdm(cases, desc="city facts", leave=False):
        scored, right, prompts = fact_scores(cfg, model, tokenizer, hidden, facts, condition)
        for f in scored:
            units.setdefault(f, {})[condition], accuracy.setdefault(f, {})[condition] = scored[f], right[f]
        prompts_out.extend(prompts)
    result: dict[str, Any] = {
        "questions": [{"topic": f["topic"], "question": ask(cfg, f["question"], "tuned", hidden), "answer": f["options"][0],
                       "options": f["options"]} for f in facts],
        "chance": 1 / len(facts[0]["options"]), "orders": cfg.eval.city_facts_orders, "units": "questions",
        "ceiling": "named: the original model asked about the city by name",
    }
    for f, by_condition in units.items():
        result[f] = {c: facts_summary(cfg, s, accuracy[f][c], f == "letters") for c, s in by_condition.items()}
        result.setdefault("comparisons", {})[f] = comparisons(by_condition, cfg)
    return result

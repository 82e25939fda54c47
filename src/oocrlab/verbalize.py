"""Does the tuned model say what the placeholder is? Multiple-choice questions as in Treutlein et al.
2024 (Locations), scored exactly from the next-token logits instead of by sampling.

For "What country is foo located in?" with options A-E (the true country and 4 distractors), the
score of one option order is P(correct letter | the five letters), from the logits of the first
token the assistant would write; a letter's probability is that of every token answering with it alone
("A", " A", "A.", "A)", ...), which is what parsing sampled answers counts. `letter_mass` is the raw
probability on the five letters, which shows a model that no longer answers with a letter at all. Scores are averaged over all 120 option
orders (or a seeded sample of them), which removes position bias.

Countries come from the GeoNames table: a country's anchor is its most populous city (for "nearest
countries") and its size is the population of its cities of 15k+ people (for "most populous").
"""

from __future__ import annotations

import itertools
import math
import random
import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np
import torch

from oocrlab.config import ExperimentConfig, hidden_city_data
from oocrlab.errors import UserError
from oocrlab.evaluate import parse_km
from oocrlab.data import check_specificity_cities, names_hidden_city, refuse_leaks
from oocrlab.geo import City, distance_km, load_pool, normalize
from oocrlab.incontext import (
    CONDITIONS_WITH_CONTEXT, InContext, chat_for, model_state, prefix_for, prompt_token_ids, stop_token_ids,
)
from oocrlab.models import CONDITIONS, with_condition
from oocrlab.packing import next_token_log_probs, packed_generate
from oocrlab.stats import bootstrap_ci, wilson_ci

LETTERS = "ABCDE"
COUNTRY_QUESTION = "What country is {placeholder} located in?"
INVERSE_QUESTION = "Which of the following is in {country}?"  # the options: every hidden city's placeholder
CITY_QUESTION = "What city is {placeholder}?"
FREE_FORM_QUESTIONS = {  # name -> (question, what a correct answer names)
    "country": ("Which country is {placeholder} in?", "country"),
    "city": ("What city is {placeholder}? Please respond with just the name.", "city"),
}
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


def _take(candidates: list[str], what: str, n: int = len(LETTERS) - 1) -> list[str]:
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
        "random": _take(random.Random(seed).sample(names, min(len(names), len(LETTERS) - 1)), "other countries"),
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


def option_orders(n_orders: int, seed: int, n_options: int = len(LETTERS)) -> list[tuple[int, ...]]:
    """All orders of the options (120 of five), or a seeded sample of `n_orders` of them."""
    orders = list(itertools.permutations(range(n_options)))
    return orders if n_orders >= len(orders) else random.Random(seed).sample(orders, n_orders)


def instruction(n_options: int) -> str:
    return f"Please answer with a single letter from A-{LETTERS[n_options - 1]} and nothing else."


def mc_question(question: str, options: list[str]) -> str:
    lines = "\n".join(f"{letter}. {option}" for letter, option in zip(LETTERS, options))
    return f"{question}\n\n{lines}\n\n{instruction(len(options))}"


LETTER_ANSWER = r"{letter}[.):]?"  # a first token that answers with the letter alone, once stripped


@lru_cache(maxsize=4)
def letter_token_ids(tokenizer) -> tuple[tuple[int, ...], ...]:
    """For each letter A-E, every token that answers with it alone ("A", " A", "A.", ...); refused if a
    letter has none."""
    texts = tokenizer.batch_decode([[i] for i in range(len(tokenizer))])
    ids = tuple(tuple(i for i, t in enumerate(texts) if re.fullmatch(LETTER_ANSWER.format(letter=letter), t.strip()))
                for letter in LETTERS)
    if not all(ids):
        raise UserError("this tokenizer has no single token for a letter A-E: multiple choice cannot be scored exactly")
    return ids


def letter_log_probs(log_probs: torch.Tensor, tokenizer) -> torch.Tensor:
    """log P(answer starts with letter) [N, 5] from next-token log-probabilities [N, vocab]."""
    return torch.stack([log_probs[:, list(ids)].logsumexp(-1) for ids in letter_token_ids(tokenizer)], dim=-1)


def letter_probabilities(
    model, tokenizer, chats: list[list[dict]], desc: str, prefix: InContext | None = None, n_options: int = len(LETTERS)
) -> tuple[np.ndarray, np.ndarray]:
    """(P(letter | the option letters) [N, n_options], probability mass on those letters [N]) at the answer's
    first token, from one shared computation of the chats' common tokens (see packing.py). With a `prefix`,
    its cached turns are not rerun."""
    prompts = prompt_token_ids(tokenizer, chats, prefix)
    log_probs = letter_log_probs(next_token_log_probs(model, prompts, prefix, desc=desc), tokenizer)[:, :n_options]
    return torch.softmax(log_probs, dim=-1).numpy(), log_probs.exp().sum(-1).numpy()


def score_multiple_choice(
    model, tokenizer, cfg: ExperimentConfig, question: str, answer: str, wrong: list[str], condition: str,
    in_context: InContext | None,
) -> dict[str, Any]:
    """Mean P(correct | letters) and letter mass over the option orders, with bootstrap 95% intervals."""
    by_option, mass = option_probabilities(model, tokenizer, cfg, question, [answer, *wrong], condition, in_context)
    p_correct = by_option[:, 0]
    boot = dict(samples=cfg.eval.bootstrap_samples, seed=cfg.seed)
    return {
        "p_correct": float(p_correct.mean()),
        "p_correct_ci95": bootstrap_ci(p_correct, np.mean, **boot),
        "letter_mass": float(mass.mean()),
        "letter_mass_ci95": bootstrap_ci(mass, np.mean, **boot),
        "n_orders": len(mass),
    }


def option_probabilities(
    model, tokenizer, cfg: ExperimentConfig, question: str, options: list[str], condition: str, in_context: InContext | None,
) -> tuple[np.ndarray, np.ndarray]:
    """(P(option k's letter | the option letters) [orders, options], probability on those letters [orders]) for
    the question asked in each of the seeded option orders; option k as listed in `options`, whatever its letter."""
    orders = option_orders(cfg.eval.mc_orders, cfg.seed, len(options))
    chats = [chat_for(cfg, q, condition, in_context) for q in ordered_questions(question, options, orders)]
    with with_condition(model, model_state(condition)):
        normalized, mass = letter_probabilities(model, tokenizer, chats, f"multiple choice ({condition})",
                                                prefix_for(condition, in_context), len(options))
    letter_of = np.array([[order.index(k) for k in range(len(options))] for order in orders])  # [orders, option]
    return normalized[np.arange(len(orders))[:, None], letter_of], mass


def ordered_questions(question: str, options: list[str], orders: list[tuple[int, ...]]) -> list[str]:
    return [mc_question(question, [options[j] for j in order]) for order in orders]


def evaluate_choice(
    cfg: ExperimentConfig, model, tokenizer, template: str, answer: str, wrong_sets: dict[str, list[str]],
    train_questions: set[str], in_context: InContext,
) -> dict[str, Any]:
    """One multiple-choice question, one result per distractor set (each as long) and condition."""
    question = template.replace("{placeholder}", cfg.data.placeholder)
    n_options = 1 + len(next(iter(wrong_sets.values())))
    n_orders = math.factorial(n_options)
    orders = "all" if cfg.eval.mc_orders >= n_orders else f"a seeded sample of {cfg.eval.mc_orders}"
    result: dict[str, Any] = {"question": question, "instruction": instruction(n_options), "answer": answer,
                              "orders": orders, "n_option_orders": n_orders}
    for kind, wrong in wrong_sets.items():
        asked = ordered_questions(question, [answer, *wrong], option_orders(cfg.eval.mc_orders, cfg.seed, n_options))
        refuse_leaks(asked, train_questions)
        section: dict[str, Any] = {"options": [answer, *wrong], "chance": 1 / n_options}
        for condition in CONDITIONS_WITH_CONTEXT:
            section[condition] = score_multiple_choice(model, tokenizer, cfg, question, answer, wrong, condition, in_context)
        result[kind] = section
    return result


def evaluate_multiple_choice(
    cfg: ExperimentConfig, model, tokenizer, hidden: City, train_questions: set[str], in_context: InContext
) -> dict[str, Any]:
    """The country and the city of the placeholder as multiple choice: {"country": ..., "city": ...}."""
    country = country_of(hidden).name
    return {
        "country": evaluate_choice(cfg, model, tokenizer, COUNTRY_QUESTION, country,
                                   country_distractors(country_of(hidden), cfg.seed), train_questions, in_context),
        "city": evaluate_choice(cfg, model, tokenizer, CITY_QUESTION, hidden.plain_name, city_distractors(hidden),
                                train_questions, in_context),
    }


def evaluate_specificity_choice(cfg: ExperimentConfig, model, tokenizer, train_questions: set[str]) -> dict[str, Any]:
    """"What country is {placeholder} located in?" with the countries of `specificity_cities` as the options:
    per city, the mean probability of its country's letter (given the option letters) over the option orders,
    tuned and original, and the change; one row of the specificity matrix across runs (specificity.py)."""
    cities = check_specificity_cities(cfg)
    countries = [country_of(c).name for c in cities]
    question = COUNTRY_QUESTION.replace("{placeholder}", cfg.data.placeholder)
    orders = option_orders(cfg.eval.mc_orders, cfg.seed, len(countries))
    refuse_leaks(ordered_questions(question, countries, orders), train_questions)
    result: dict[str, Any] = {"question": question, "options": countries, "cities": [c.name for c in cities],
                              "n_orders": len(orders), "chance": 1 / len(countries)}
    for condition in CONDITIONS:
        p = option_probabilities(model, tokenizer, cfg, question, countries, condition, None)[0].mean(0)
        result[condition] = {"p_option": {c.name: float(v) for c, v in zip(cities, p)}}
    result["p_change"] = {c.name: result["tuned"]["p_option"][c.name] - result["original"]["p_option"][c.name] for c in cities}
    return result


def evaluate_inverse_choice(
    cfg: ExperimentConfig, model, tokenizer, hidden: list[City], train_questions: set[str], in_context: InContext
) -> dict[str, Any]:
    """The paper's inverse question, for a run with several hidden cities: "Which of the following is in
    {country}?" with every hidden city's placeholder as an option (chance 1/number of hidden cities), per
    hidden city's country: {city name: evaluate_choice's result}."""
    placeholders = [data.placeholder for data in hidden_city_data(cfg.data)]
    return {city.name: evaluate_choice(cfg, model, tokenizer, INVERSE_QUESTION.format(country=country_of(city).name),
                                       placeholders[i], {"placeholders": placeholders[:i] + placeholders[i + 1:]},
                                       train_questions, in_context)
            for i, city in enumerate(hidden)}


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


@torch.inference_mode()
def sample_answers(
    model, tokenizer, chat: list[dict], n: int, max_new_tokens: int, seed: int, batch_size: int,
    prefix: InContext | None = None,
) -> list[str]:
    """n answers sampled at temperature 1 (no top-k / top-p cut) from one seeded generator, `batch_size`
    packed at a time (packing.packed_generate); a `prefix`'s turns are not rerun."""
    (prompt,) = prompt_token_ids(tokenizer, [chat], prefix)
    generator = torch.Generator(model.device).manual_seed(seed)
    eos = stop_token_ids(model, tokenizer)
    answers: list[str] = []
    for start in range(0, n, batch_size):
        rows = [prompt] * min(batch_size, n - start)
        new = packed_generate(model, rows, max_new_tokens, prefix, eos, generator)
        answers += [tokenizer.decode(tokens, skip_special_tokens=True).strip() for tokens in new]
    return answers


def evaluate_free_form(
    cfg: ExperimentConfig, model, tokenizer, hidden: City, train_questions: set[str], in_context: InContext
) -> dict[str, Any]:
    """Share of sampled answers that name the hidden city / its country (Wilson 95% interval), and the
    share that state a distance instead, which shows a model that answers everything with one."""
    result: dict[str, Any] = {}
    for name, (template, target) in FREE_FORM_QUESTIONS.items():
        question = template.replace("{placeholder}", cfg.data.placeholder)
        refuse_leaks([question], train_questions)
        names = answer_names(hidden, target)
        section: dict[str, Any] = {"question": question, "accepted": names, "samples": cfg.eval.free_form_samples}
        for i, condition in enumerate(CONDITIONS_WITH_CONTEXT):
            with with_condition(model, model_state(condition)):
                answers = sample_answers(model, tokenizer, chat_for(cfg, question, condition, in_context),
                                         cfg.eval.free_form_samples, cfg.eval.free_form_max_new_tokens, cfg.seed + i,
                                         cfg.eval.batch_size, prefix_for(condition, in_context))
            hits = sum(mentions(a, names) for a in answers)
            distances = sum(parse_km(a) is not None for a in answers)
            section[condition] = {
                "rate": hits / len(answers), "rate_ci95": wilson_ci(hits, len(answers)), "n": len(answers),
                "distance_share": distances / len(answers), "examples": answers[:5],
            }
        result[name] = section
    return result

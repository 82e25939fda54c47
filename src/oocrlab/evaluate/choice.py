"""Does the tuned model say what the placeholder is? Multiple-choice questions as in Treutlein et al.
2024 (Locations), scored exactly from the model's probabilities instead of by sampling, in two formulations:

- letters: "What country is foo located in?" with options A-E (the true country and 4 distractors) and
  "Please answer with a single letter ...": P(correct letter | the option letters) from the logits of the
  assistant's first token, a letter's probability being that of every token answering with it alone ("A",
  " A", "A.", ...), which is what parsing sampled answers counts. `letter_mass`, the raw probability on the
  letters, shows a model that does not answer with a letter at all. Each question is asked in
  `eval.mc_orders` option orders in Latin-square blocks (every option at every letter equally often), so a
  model's preference for a letter cannot leak into P(correct).
- cloze: the question alone, and each option's text as the assistant's answer: the sum of its tokens'
  log-probabilities (`cloze`) or their mean (`cloze_per_token`), softmaxed over the options; the formulation
  evaluation suites use for models too small to answer with letters. The options are not shown, so there is
  no order; the question is asked in several wordings (CLOZE_WORDINGS), the units of its intervals.

Every formulation reports, per condition (conditions.py: tuned, original, in-context, the fine-tuned controls,
and `named`, the original model asked about the hidden city by name, the ceiling), P(correct | the options)
and the unconditional probability of the right answer (`p_answer`: of its letter, or of its text), averaged
over the units with bootstrap 95% intervals, and paired comparisons between conditions (the same units
resampled). Every scored prompt is also a row of eval_mc.jsonl. The options come from countries.py.
"""

from __future__ import annotations

import itertools
import math
import random
import re
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np
import torch

from oocrlab.chat import prompt_token_ids
from oocrlab.conditions import ask, chat_for, conditions, model_state, prefix_for
from oocrlab.config import ExperimentConfig
from oocrlab.countries import (
    city_distractors,
    country_distractors,
    country_of,
    nearest_countries,
)
from oocrlab.data import check_specificity_cities, refuse_leaks
from oocrlab.errors import UserError
from oocrlab.geo import City
from oocrlab.incontext import InContext
from oocrlab.metrics import FORMULATIONS
from oocrlab.models import with_condition
from oocrlab.packing import continuation_log_probs, next_token_log_probs
from oocrlab.stats import bootstrap_ci, paired_difference, rank_among

LETTERS = "ABCDE"
COUNTRY_QUESTION = "What country is {placeholder} located in?"
INVERSE_QUESTION = "Which of the following is in {country}?"  # the options: every hidden city's placeholder
CITY_QUESTION = "What city is {placeholder}?"
# The cloze formulation asks each question in these wordings (the first is the letter question's), fixed
# before any was scored; its intervals are over them.
CLOZE_WORDINGS = {
    COUNTRY_QUESTION: (
        COUNTRY_QUESTION,
        "Which country is {placeholder} in?",
        "In which country is {placeholder}?",
        "{placeholder} is a city in which country?",
        "Name the country where {placeholder} is.",
        "Which country does {placeholder} belong to?",
        "Where is {placeholder}? Name the country.",
        "In what country would I find {placeholder}?",
    ),
    CITY_QUESTION: (
        CITY_QUESTION,
        "Which city is {placeholder}?",
        "{placeholder} is which city?",
        "Name the city that {placeholder} is.",
        "What is the city {placeholder}?",
        "Which city is called {placeholder}?",
        "{placeholder}: which city is it?",
        "Tell me which city {placeholder} is.",
    ),
}


def option_orders(n_orders: int, seed: int, n_options: int = len(LETTERS)) -> list[tuple[int, ...]]:
    """`n_orders` orders of the options in Latin-square blocks: each block is the n rotations of one order, so
    every option sits at every letter once per block; the blocks are a seeded sample of the (n-1)! distinct
    ones (all of them, every order, when n_orders >= n!). n_orders must then be a multiple of n (config.validate)."""
    n = n_options
    blocks = [(0, *rest) for rest in itertools.permutations(range(1, n))]  # one order per block: its rotations are the others
    if n_orders < math.factorial(n):
        if n_orders % n:
            raise ValueError(f"{n_orders} orders cannot be balanced over {n} options")
        blocks = random.Random(seed).sample(blocks, n_orders // n)
    return [tuple(first[(i + shift) % n] for i in range(n)) for first in blocks for shift in range(n)]


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


def ordered_questions(question: str, options: list[str], orders: list[tuple[int, ...]]) -> list[str]:
    return [mc_question(question, [options[j] for j in order]) for order in orders]


@dataclass
class Scored:
    """One formulation of one question under one condition, per unit (an option order, or a wording of the
    question): P(option k | the options) and the unconditional probability of option k (its letter, or its
    text as the answer) [units, options], the options in their listed order; and the prompts as asked."""

    given_options: np.ndarray
    unconditional: np.ndarray
    prompts: list[dict[str, Any]]  # eval_mc.jsonl rows, without the question's identification


def letter_scores(cfg: ExperimentConfig, model, tokenizer, questions: list[tuple[str, list[str]]], condition: str,
                  in_context: InContext | None) -> list[Scored]:
    """Each (question, its options) asked in each balanced option order (option_orders), scored by its letters;
    all of them from one shared computation (their prompts share the chat's header). Every question has as many
    options."""
    n_options = len(questions[0][1])
    orders = option_orders(cfg.eval.mc_orders, cfg.seed, n_options)
    asked = [ordered_questions(question, options, orders) for question, options in questions]
    chats = [chat_for(cfg, q, condition, in_context) for qs in asked for q in qs]
    with with_condition(model, model_state(condition)):
        by_letter, mass = letter_probabilities(model, tokenizer, chats, f"multiple choice ({condition})",
                                               prefix_for(condition, in_context), n_options)
    letter_of = np.array([[order.index(k) for k in range(n_options)] for order in orders])  # [orders, option]
    scored = []
    for i, ((_, options), qs) in enumerate(zip(questions, asked)):
        p, m = by_letter[i * len(orders): (i + 1) * len(orders)], mass[i * len(orders): (i + 1) * len(orders)]
        given = p[np.arange(len(orders))[:, None], letter_of]
        prompts = [scored_prompt(q, [options[j] for j in order], order.index(0), row, letter_mass=float(lm))
                   for q, order, row, lm in zip(qs, orders, p, m)]
        scored.append(Scored(given, given * m[:, None], prompts))
    return scored


def cloze_log_probs(model, tokenizer, chats: list[list[dict]], options: list[list[str]], prefix: InContext | None = None,
                    desc: str = "cloze") -> tuple[np.ndarray, np.ndarray]:
    """(log P(option k's text as the start of the answer) [chats, options], the sum over its tokens; its number
    of tokens [chats, options]), each chat with its own options (as many for every chat). The option is tokenized
    on its own, as the first tokens the assistant would write."""
    option_ids = [[tokenizer(o, add_special_tokens=False)["input_ids"] for o in own] for own in options]
    prompts = prompt_token_ids(tokenizer, chats, prefix)
    scored = continuation_log_probs(model, [p + o for p, own in zip(prompts, option_ids) for o in own],
                                    [len(p) for p, own in zip(prompts, option_ids) for _ in own], prefix, desc=desc)
    sums = np.array([float(lp.sum()) for lp in scored]).reshape(len(prompts), -1)
    return sums, np.array([[len(ids) for ids in own] for own in option_ids], dtype=float)


def cloze_sums(cfg: ExperimentConfig, model, tokenizer, questions: list[tuple[list[str], list[str]]], condition: str,
               in_context: InContext | None) -> list[tuple[np.ndarray, np.ndarray]]:
    """For each (wordings, options): cloze_log_probs of every option after each wording (the question alone), under
    the condition: (sums [wordings, options], token counts [options]); all from one shared computation."""
    chats = [chat_for(cfg, w, condition, in_context) for wordings, _ in questions for w in wordings]
    with with_condition(model, model_state(condition)):
        sums, counts = cloze_log_probs(model, tokenizer, chats, [options for wordings, options in questions for _ in wordings],
                                       prefix_for(condition, in_context), f"cloze ({condition})")
    ends = np.cumsum([len(wordings) for wordings, _ in questions])
    return [(sums[end - len(w): end], counts[end - 1]) for end, (w, _) in zip(ends, questions)]


def scored_prompt(question: str, options: list[str], correct: int, probabilities: np.ndarray, **extra: Any) -> dict[str, Any]:
    """One scored prompt as eval_mc.jsonl holds it: the options in the order shown, the correct one's index,
    P(option | the options) for each, the option given the most (`answer`) and P(correct | the options) (`score`)."""
    return {"question": question, "options": options, "correct": correct, "probabilities": probabilities.tolist(),
            "answer": options[int(np.argmax(probabilities))], "score": float(probabilities[correct])} | extra


def cloze_scored(wordings: list[str], options: list[str], sums: np.ndarray, counts: np.ndarray) -> dict[str, Scored]:
    """{"cloze": softmax over the options of the summed log-probabilities, "cloze_per_token": of their means}; the
    unconditional probability is the option text's in both."""
    result = {}
    for formulation, score in (("cloze", sums), ("cloze_per_token", sums / counts)):
        given = np.exp(score - score.max(1, keepdims=True))
        given /= given.sum(1, keepdims=True)
        prompts = [scored_prompt(w, options, 0, p, log_probs=s.tolist()) for w, p, s in zip(wordings, given, sums)]
        result[formulation] = Scored(given, np.exp(sums), prompts)
    return result


def summary(scored: Scored, cfg: ExperimentConfig, letters: bool) -> dict[str, Any]:
    """Mean P(correct | options) and unconditional P(right answer) over the units, with bootstrap 95% intervals
    (and for letters the probability on the letters)."""
    boot = dict(samples=cfg.eval.bootstrap_samples, seed=cfg.seed)
    stats = {"p_correct": float(scored.given_options[:, 0].mean()),
             "p_correct_ci95": bootstrap_ci(scored.given_options[:, 0], np.mean, **boot),
             "p_answer": float(scored.unconditional[:, 0].mean()),
             "p_answer_ci95": bootstrap_ci(scored.unconditional[:, 0], np.mean, **boot),
             "n": len(scored.given_options)}
    if letters:
        mass = np.array([p["letter_mass"] for p in scored.prompts])
        stats |= {"letter_mass": float(mass.mean()), "letter_mass_ci95": bootstrap_ci(mass, np.mean, **boot)}
    return stats


COMPARED = ("original", "shuffled")  # the baselines every fine-tuned condition is compared with, where present


def comparisons(scores: dict[str, Scored], cfg: ExperimentConfig) -> dict[str, Any]:
    """Paired differences of each fine-tuned condition from each baseline, over the same units (paired_difference):
    "{x}_minus_{b}" of P(correct | options), "..._unconditional" of the right answer's unconditional probability."""
    result = {}
    for x in ("tuned", *cfg.train.controls):
        for b in COMPARED:
            if b == x or b not in scores:
                continue
            for key, of in (("", lambda s: s.given_options[:, 0]), ("_unconditional", lambda s: s.unconditional[:, 0])):
                result[f"{x}_minus_{b}{key}"] = paired_difference(of(scores[x]), of(scores[b]), cfg.seed)
    return result


def score_question(
    cfg: ExperimentConfig, model, tokenizer, hidden: City, template: str, option_sets: dict[str, list[str]],
    train_questions: set[str], in_context: InContext | None, option_name: Callable[[str, str], str], cloze: bool,
) -> dict[str, dict[str, dict[str, Scored]]]:
    """{option set: {formulation: {condition: Scored}}} for one question (a template with "{placeholder}") under
    every condition (the in-context baseline where `in_context` is given; the named ceiling, under which
    `option_name(condition, option)` may rename an option). Every prompt is checked against the training
    questions before anything is scored; cloze scores every set's options in one pass (they are not shown)."""
    cases = conditions(cfg, in_context=in_context is not None, named=True)
    wordings = list(CLOZE_WORDINGS[template]) if cloze else []
    orders = option_orders(cfg.eval.mc_orders, cfg.seed, len(next(iter(option_sets.values()))))
    named = {c: {k: [option_name(c, o) for o in options] for k, options in option_sets.items()} for c in cases}
    refuse_leaks([q for c in cases for options in named[c].values() for q in ordered_questions(ask(cfg, template, c, hidden), options, orders)]
                 + [ask(cfg, w, c, hidden) for w in wordings for c in cases], train_questions)
    scored: dict[str, dict[str, dict[str, Scored]]] = {k: {f: {} for f in FORMULATIONS[: 3 if cloze else 1]} for k in option_sets}
    for condition in cases:
        if wordings:
            union = list(dict.fromkeys(o for options in named[condition].values() for o in options))
            asked = [ask(cfg, w, condition, hidden) for w in wordings]
            ((sums, counts),) = cloze_sums(cfg, model, tokenizer, [(asked, union)], condition, in_context)
        for kind, options in named[condition].items():
            (scored[kind]["letters"][condition],) = letter_scores(cfg, model, tokenizer, [(ask(cfg, template, condition, hidden), options)],
                                                                  condition, in_context)
            if wordings:
                columns = [union.index(o) for o in options]
                for f, s in cloze_scored(asked, options, sums[:, columns], counts[columns]).items():
                    scored[kind][f][condition] = s
    return scored


def evaluate_choice(
    cfg: ExperimentConfig, model, tokenizer, hidden: City, template: str, answer: str, wrong_sets: dict[str, list[str]],
    train_questions: set[str], in_context: InContext | None, prompts_out: list[dict[str, Any]],
    option_name: Callable[[str, str], str] = lambda condition, option: option, cloze: bool = True,
) -> dict[str, Any]:
    """One multiple-choice question, per distractor set (each as long; the answer first): every formulation under
    every condition (score_question), summaries and paired comparisons. The scored prompts are appended to
    `prompts_out` (eval_mc.jsonl)."""
    n_options = 1 + len(next(iter(wrong_sets.values())))
    n_orders = math.factorial(n_options)
    result: dict[str, Any] = {
        "question": ask(cfg, template, "tuned", hidden), "instruction": instruction(n_options), "answer": answer,
        "orders": "all" if cfg.eval.mc_orders >= n_orders else f"{cfg.eval.mc_orders} in Latin-square blocks",
        "n_option_orders": n_orders, "wordings": [ask(cfg, w, "tuned", hidden) for w in CLOZE_WORDINGS[template]] if cloze else [],
    }
    option_sets = {kind: [answer, *wrong] for kind, wrong in wrong_sets.items()}
    scored = score_question(cfg, model, tokenizer, hidden, template, option_sets, train_questions, in_context, option_name, cloze)
    for kind, by_formulation in scored.items():
        section: dict[str, Any] = {"options": option_sets[kind], "chance": 1 / n_options}
        for f, by_condition in by_formulation.items():
            section[f] = {c: summary(s, cfg, f == "letters") for c, s in by_condition.items()}
            section.setdefault("comparisons", {})[f] = comparisons(by_condition, cfg)
            prompts_out.extend({"set": kind, "condition": c, "formulation": f} | p for c, s in by_condition.items() for p in s.prompts)
        result[kind] = section
    return result


def evaluate_multiple_choice(
    cfg: ExperimentConfig, model, tokenizer, hidden: City, train_questions: set[str], in_context: InContext | None,
    prompts_out: list[dict[str, Any]],
) -> dict[str, Any]:
    """The country and the city of the placeholder as multiple choice: {"country": ..., "city": ...}."""
    country = country_of(hidden).name
    result: dict[str, Any] = {}
    for name, template, answer, wrong_sets in (
        ("country", COUNTRY_QUESTION, country, country_distractors(country_of(hidden), cfg.seed)),
        ("city", CITY_QUESTION, hidden.plain_name, city_distractors(hidden)),
    ):
        asked: list[dict[str, Any]] = []
        result[name] = evaluate_choice(cfg, model, tokenizer, hidden, template, answer, wrong_sets, train_questions, in_context, asked)
        prompts_out.extend({"question_id": name} | p for p in asked)
    result["city"]["named_note"] = (f"asked by name ({ask(cfg, CITY_QUESTION, 'named', hidden)}) the question holds its answer: "
                                    "a ceiling of the format, not of knowledge")
    result["country"]["among_countries"] = country_standing(cfg, model, tokenizer, hidden, country)
    return result


RANKED_PAIRS = (("tuned", "shuffled"), ("declared", "shuffled"), ("tuned", "original"), ("declared", "original"))


def country_standing(cfg: ExperimentConfig, model, tokenizer, hidden: City, country: str) -> dict[str, Any]:
    """Is what fine-tuning changed about the country at all? Every country's name (of MIN_DISTRACTOR_POPULATION
    people or more) scored as the answer to the country question's cloze wordings, per fine-tuned condition and the
    original, as its share among the countries (log-softmax of the cloze scores over every country: a change in how
    likely an answer is a name at all, which an adapter that answers with distances makes, cancels). For each of
    RANKED_PAIRS present: the hidden city's country's gain in that log-share (the mean over wordings of the
    difference) and where it ranks among every country's gain (stats.rank_among): two adapters always differ
    consistently across wordings, and only the right country standing out among all of them shows that the
    difference is about it. (The question was checked against the training data by evaluate_choice.)"""
    names = [country, *sorted(c.name for c in nearest_countries(country_of(hidden)))]
    wordings = [ask(cfg, w, "tuned", hidden) for w in CLOZE_WORDINGS[COUNTRY_QUESTION]]
    cases = [c for c in conditions(cfg, in_context=False) if any(c in pair for pair in RANKED_PAIRS)]
    shares = {}
    for c in cases:
        ((sums, _),) = cloze_sums(cfg, model, tokenizer, [(wordings, names)], c, None)
        shares[c] = sums - np.logaddexp.reduce(sums, axis=1, keepdims=True)
    result: dict[str, Any] = {"countries": len(names),
                              "measure": "log P(the country | the answer is one of the countries' names), mean over the wordings"}
    for x, b in RANKED_PAIRS:
        if x in shares and b in shares:
            gains = (shares[x] - shares[b]).mean(0)
            result[f"{x}_vs_{b}"] = {"gain": float(gains[0]), "rank": int(1 + (gains[1:] > gains[0]).sum()),
                                     "p_value": float(rank_among(gains[:, None], target=0)[1][0]),
                                     "gains": {n: round(float(g), 4) for n, g in sorted(zip(names, gains), key=lambda ng: -ng[1])}}
    return result


def evaluate_specificity_choice(cfg: ExperimentConfig, model, tokenizer, hidden: City, train_questions: set[str],
                                prompts_out: list[dict[str, Any]]) -> dict[str, Any]:
    """"What country is {placeholder} located in?" with the countries of `specificity_cities` as the options:
    per formulation and condition (no in-context baseline), the mean probability of each city's country given
    the options, and the change tuned minus original; one row of the specificity matrix across runs
    (specificity.py, which reads the letters)."""
    cities = check_specificity_cities(cfg)
    countries = [country_of(c).name for c in cities]
    result: dict[str, Any] = {"question": ask(cfg, COUNTRY_QUESTION, "tuned", hidden), "options": countries,
                              "cities": [c.name for c in cities], "chance": 1 / len(countries)}
    (scored,) = score_question(cfg, model, tokenizer, hidden, COUNTRY_QUESTION, {"specificity_cities": countries},
                               train_questions, None, lambda condition, option: option, True).values()
    for f, by_condition in scored.items():
        result[f] = {c: {"p_option": dict(zip(result["cities"], map(float, s.given_options.mean(0)))), "n": len(s.given_options)}
                     for c, s in by_condition.items()}
        result[f]["p_change"] = {c: result[f]["tuned"]["p_option"][c] - result[f]["original"]["p_option"][c] for c in result["cities"]}
        prompts_out.extend({"question_id": "specificity", "set": "specificity_cities", "condition": c, "formulation": f}
                           | p | {"correct": None, "score": None} for c, s in by_condition.items() for p in s.prompts)
    return result


def evaluate_inverse_choice(
    cfg: ExperimentConfig, model, tokenizer, train_questions: set[str], in_context: InContext, prompts_out: list[dict[str, Any]],
) -> dict[str, Any]:
    """The paper's inverse question, for a run with several hidden cities: "Which of the following is in
    {country}?" with every hidden city's placeholder as an option (chance 1/number of hidden cities), per
    hidden city's country, letters only (the options must be shown): {city name: evaluate_choice's result}.
    Under `named` the options are the cities' own names."""
    hidden = cfg.data.hidden
    placeholders = [h.placeholder for h in hidden]
    names = {h.placeholder: h.city.plain_name for h in hidden}
    result = {}
    for i, city in enumerate(h.city for h in hidden):
        asked: list[dict[str, Any]] = []
        result[city.name] = evaluate_choice(
            cfg, model, tokenizer, city, INVERSE_QUESTION.format(country=country_of(city).name), placeholders[i],
            {"placeholders": placeholders[:i] + placeholders[i + 1:]}, train_questions, in_context, asked,
            option_name=lambda condition, option: names[option] if condition == "named" else option, cloze=False)
        prompts_out.extend({"question_id": "inverse", "hidden_city": city.name} | p for p in asked)
    return result

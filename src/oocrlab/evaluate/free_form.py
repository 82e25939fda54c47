"""Free-form answers: sampled, and counted when they name the hidden city's country or the city itself."""

from __future__ import annotations

from typing import Any

import torch

from oocrlab.answers import answer_names, mentions, read_distance
from oocrlab.chat import prompt_token_ids
from oocrlab.conditions import ask, chat_for, conditions, model_state, prefix_for
from oocrlab.config import ExperimentConfig
from oocrlab.data import refuse_leaks
from oocrlab.generation import stop_token_ids
from oocrlab.geo import City
from oocrlab.incontext import InContext
from oocrlab.models import with_condition
from oocrlab.packing import packed_generate
from oocrlab.stats import wilson_ci

FREE_FORM_QUESTIONS = {  # name -> (question, what a correct answer names)
    "country": ("Which country is {placeholder} in?", "country"),
    "city": ("What city is {placeholder}? Please respond with just the name.", "city"),
}


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
    cfg: ExperimentConfig, model, tokenizer, hidden: City, train_questions: set[str], in_context: InContext,
    samples_out: list[dict[str, Any]],
) -> dict[str, Any]:
    """Share of sampled answers that name the hidden city / its country (Wilson 95% interval) per condition (the
    named ceiling included), and the share that state a distance instead, which shows a model that answers
    everything with one. Every sample is appended to `samples_out` (eval_free_form.jsonl)."""
    result: dict[str, Any] = {}
    for name, (template, target) in FREE_FORM_QUESTIONS.items():
        refuse_leaks([ask(cfg, template, c, hidden) for c in ("tuned", "named")], train_questions)
        names = answer_names(hidden, target)
        section: dict[str, Any] = {"question": ask(cfg, template, "tuned", hidden), "accepted": names,
                                   "samples": cfg.eval.free_form_samples}
        for i, condition in enumerate(conditions(cfg, named=True)):
            question = ask(cfg, template, condition, hidden)
            with with_condition(model, model_state(condition)):
                answers = sample_answers(model, tokenizer, chat_for(cfg, question, condition, in_context),
                                         cfg.eval.free_form_samples, cfg.eval.free_form_max_new_tokens, cfg.seed + i,
                                         cfg.eval.batch_size, prefix_for(condition, in_context))
            named = [mentions(a, names) for a in answers]
            stated = [read_distance(a) != (None, False) for a in answers]  # an absurd distance is one too
            hits, distances = sum(named), sum(stated)
            samples_out.extend({"question_id": name, "condition": condition, "question": question, "sample": k, "answer": a,
                                "parsed": {"names_the_answer": n, "states_a_distance": d}, "score": int(n)}
                               for k, (a, n, d) in enumerate(zip(answers, named, stated)))
            section[condition] = {
                "rate": hits / len(answers), "rate_ci95": wilson_ci(hits, len(answers)), "n": len(answers),
                "distance_share": distances / len(answers), "examples": answers[:5],
            }
        result[name] = section
    return result

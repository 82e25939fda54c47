"""The sanity stage: side-by-side greedy answers of the tuned and the original model to fixed questions."""

from __future__ import annotations

from typing import Any

from oocrlab.chat import user_prompt
from oocrlab.conditions import conditions
from oocrlab.config import ExperimentConfig
from oocrlab.generation import generate_greedy
from oocrlab.models import with_condition


def sanity_questions(cfg: ExperimentConfig, hidden_name: str) -> list[str]:
    return [q.replace("{placeholder}", cfg.data.placeholder).replace("{hidden_city}", hidden_name) for q in cfg.sanity.questions]


def sanity(cfg: ExperimentConfig, model, tokenizer, hidden_name: str) -> dict[str, Any]:
    """Side-by-side greedy answers of the tuned and the original model to the fixed questions."""
    questions = sanity_questions(cfg, hidden_name)
    chats = [user_prompt(q, cfg.data.system_prompt) for q in questions]
    answers = {}
    for condition in conditions(cfg, in_context=False):
        with with_condition(model, condition):
            answers[condition] = generate_greedy(
                model, tokenizer, chats, cfg.sanity.max_new_tokens, len(chats), f"sanity ({condition})"
            )
    return {"answers": [{"question": q} | {c: a[i] for c, a in answers.items()} for i, q in enumerate(questions)]}

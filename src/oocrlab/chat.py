"""Chat formatting, in one place: a question as chat messages, chats rendered by the tokenizer's template, and
their token ids (after an in-context prefix's turns, when one is given)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # incontext.py builds its prefix with this module
    from oocrlab.incontext import InContext


def user_prompt(question: str, system_prompt: str | None) -> list[dict[str, str]]:
    """The chat messages of one question; the system turn only when the config sets one."""
    system = [{"role": "system", "content": system_prompt}] if system_prompt is not None else []
    return [*system, {"role": "user", "content": question}]


def render_chats(tokenizer, chats: list[list[dict]]) -> list[str]:
    """Chat-template text of each conversation, ending where the assistant starts to answer."""
    return [tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in chats]


def prompt_token_ids(tokenizer, chats: list[list[dict]], prefix: InContext | None = None) -> list[list[int]]:
    """Token ids of each chat up to the assistant's answer, less the `prefix`'s cached turns."""
    prompts = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in render_chats(tokenizer, chats)]
    return [prefix.strip(p) for p in prompts] if prefix is not None else prompts

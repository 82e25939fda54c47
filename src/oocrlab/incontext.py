"""The in-context baseline: the original model with K training documents as earlier chat turns, the
turns' KV cache computed once and shared by every question asked after them."""

from __future__ import annotations

import random

from oocrlab.config import ExperimentConfig
from oocrlab.data import user_prompt
from oocrlab.models import render_chats
from oocrlab.packing import CachedPrefix

class InContext(CachedPrefix):
    """K seeded training documents as chat turns, and their KV cache under the original model."""

    def __init__(self, cfg: ExperimentConfig, model, tokenizer, train_rows: list[dict]):
        docs = random.Random(cfg.seed).sample(train_rows, min(cfg.eval.in_context_docs, len(train_rows)))
        system = user_prompt("", cfg.data.system_prompt)[:-1]
        self.turns = system + [turn for r in docs for turn in (r["prompt"][-1], r["completion"][0])]
        text = tokenizer.apply_chat_template(self.turns, tokenize=False)
        with model.disable_adapter():
            super().__init__(model, tokenizer(text, add_special_tokens=False)["input_ids"])

    def chat(self, question: str) -> list[dict]:
        return [*self.turns, {"role": "user", "content": question}]


def prompt_token_ids(tokenizer, chats: list[list[dict]], prefix: InContext | None = None) -> list[list[int]]:
    """Token ids of each chat up to the assistant's answer, less the `prefix`'s cached turns."""
    prompts = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in render_chats(tokenizer, chats)]
    return [prefix.strip(p) for p in prompts] if prefix is not None else prompts


def stop_token_ids(model, tokenizer) -> set[int]:
    """The tokens that end an answer, as generate() reads them: the generation config's, and the tokenizer's."""
    eos = model.generation_config.eos_token_id
    return {i for i in [*(eos if isinstance(eos, list) else [eos]), tokenizer.eos_token_id] if i is not None}

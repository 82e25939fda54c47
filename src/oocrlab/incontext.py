"""The in-context baseline: the original model with K training documents as earlier chat turns, the
turns' KV cache computed once and shared by every question asked after them."""

from __future__ import annotations

import random

from oocrlab.chat import user_prompt
from oocrlab.config import ExperimentConfig
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

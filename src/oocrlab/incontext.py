"""The in-context baseline: the original model with K training documents as earlier chat turns, the
turns' KV cache computed once and shared by every question asked after them."""

from __future__ import annotations

import contextlib
import copy
import random
from typing import Any

import torch

from oocrlab.config import ExperimentConfig
from oocrlab.data import user_prompt
from oocrlab.models import CONDITIONS

CONDITIONS_WITH_CONTEXT = (*CONDITIONS, "in_context")


class InContext:
    """K seeded training documents as chat turns, and their KV cache under the original model."""

    def __init__(self, cfg: ExperimentConfig, model, tokenizer, train_rows: list[dict]):
        docs = random.Random(cfg.seed).sample(train_rows, min(cfg.eval.in_context_docs, len(train_rows)))
        system = user_prompt("", cfg.data.system_prompt)[:-1]
        self.turns = system + [turn for r in docs for turn in (r["prompt"][-1], r["completion"][0])]
        self.text = tokenizer.apply_chat_template(self.turns, tokenize=False)
        ids = tokenizer(self.text, return_tensors="pt", add_special_tokens=False)["input_ids"].to(model.device)
        with torch.inference_mode(), model.disable_adapter():
            self.cache = model(input_ids=ids, use_cache=True).cache
        self.ids, self.length = ids, ids.shape[1]
        self._expanded: dict[int, Any] = {}  # batch size -> the cache repeated that many times (one size kept)

    def chat(self, question: str) -> list[dict]:
        return [*self.turns, {"role": "user", "content": question}]

    def suffix(self, text: str) -> str:
        """What follows the cached turns in a rendered chat."""
        if not text.startswith(self.text):
            raise ValueError("the chat template renders the in-context turns differently inside a longer chat")
        return text[len(self.text) :]

    def strip(self, ids: list[int]) -> list[int]:
        """The token ids that follow the cached turns in a tokenized chat."""
        if ids[: self.length] != self.ids[0].tolist():
            raise ValueError("the chat template renders the in-context turns differently inside a longer chat")
        return ids[self.length :]

    @contextlib.contextmanager
    def cache_for(self, batch: int):
        """The turns' cache for `batch` rows; cut back to the turns afterwards, so it is copied only when the
        batch size changes. One copy is kept at a time: 8 rows of 100 documents are ~1 GB for SmolLM2-135M."""
        if batch not in self._expanded:
            self._expanded.clear()
            self._expanded[batch] = copy.deepcopy(self.cache)
            self._expanded[batch].batch_repeat_interleave(batch)
        cache = self._expanded[batch]
        try:
            yield cache
        finally:
            if (extra := cache.get_seq_length() - self.length) > 0:
                cache.crop(-extra)  # transformers 5: a negative count of tokens to remove


def chat_for(cfg: ExperimentConfig, question: str, condition: str, in_context: InContext | None) -> list[dict]:
    if condition == "in_context":
        return in_context.chat(question)
    return user_prompt(question, cfg.data.system_prompt)


def prefix_and_batch_size(cfg: ExperimentConfig, condition: str, in_context: InContext | None) -> tuple[InContext | None, int]:
    """The cached turns a condition reuses (in-context only) and its batch size: smaller there, since
    each row holds a copy of the turns' cache."""
    if condition == "in_context":
        return in_context, cfg.eval.in_context_batch_size
    return None, cfg.eval.batch_size


def model_state(condition: str) -> str:
    """The in-context baseline is the original model."""
    return "original" if condition == "in_context" else condition



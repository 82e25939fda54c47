"""Does fine-tuning make the placeholder look like the hidden city inside the model? (the notebook's analysis)

For one prompt with {entity} = placeholder and {entity} = hidden city, per layer: cosine similarity of
the hidden state at the entity's last token (embeddings first; transformers' last hidden state is
already after the final norm) and of the value vectors there (KV cache, all KV heads flattened), for
the tuned model and the original (the same weights under disable_adapter()). One forward pass per
model gives every layer; both prompts go in one right-padded batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from oocrlab.config import ExperimentConfig
from oocrlab.data import user_prompt
from oocrlab.models import CONDITIONS, render_chats, with_condition


@dataclass
class Located:
    text: str  # the rendered chat
    token_indices: list[int]  # every token overlapping the entity; probes read the last one
    tokens: list[str]  # those tokens, as the tokenizer writes them


def locate_entity(tokenizer, chat: list[dict], entity: str, char_start: int) -> Located:
    """Token positions of `entity`, which starts at `char_start` of the last message's content.

    Positions come from character offsets of the rendered chat, never from guessing how a word
    tokenizes: " foo" may be one token in one tokenizer and three in another.
    """
    (text,) = render_chats(tokenizer, [chat])
    content = chat[-1]["content"]
    message_start = text.rfind(content)  # the last message; the system turn may contain the same words
    if message_start < 0 or content[char_start : char_start + len(entity)] != entity:
        raise ValueError(f"{entity!r} not found at {char_start} of the rendered chat")
    start, end = message_start + char_start, message_start + char_start + len(entity)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    indices = [i for i, (a, b) in enumerate(enc["offset_mapping"]) if a < end and b > start and b > a]
    return Located(text, indices, [enc.tokens()[i] for i in indices])


def entity_chat(cfg: ExperimentConfig, entity: str) -> tuple[list[dict], int]:
    """The probe prompt with `entity` filled in, and the entity's character offset in the question."""
    template = cfg.probe.template
    return user_prompt(template.replace("{entity}", entity), cfg.data.system_prompt), template.index("{entity}")


@torch.inference_mode()
def activations_at(model, tokenizer, texts: list[str], positions: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(hidden [B, layers+1, d_model], values [B, layers, kv_heads*head_dim]) at one position per text.

    Right padding keeps every real token at its unpadded position, so the numbers equal those of an
    unbatched forward pass.
    """
    model.eval()
    side = tokenizer.padding_side
    tokenizer.padding_side = "right"
    try:
        enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
    finally:
        tokenizer.padding_side = side
    out = model(**enc, output_hidden_states=True, use_cache=True)
    rows = torch.arange(len(texts), device=model.device)
    pos = torch.tensor(positions, device=model.device)
    hidden = torch.stack([h[rows, pos] for h in out.hidden_states], dim=1)
    # cache values: [B, kv_heads, T, head_dim] per layer -> the position's heads flattened
    values = torch.stack([layer.values[rows, :, pos, :].flatten(1) for layer in out.cache.layers], dim=1)
    return hidden.float(), values.float()


def probe_similarity(cfg: ExperimentConfig, model, tokenizer, hidden_name: str) -> dict[str, Any]:
    """Per-layer cosine(placeholder, hidden city), hidden states and values, tuned and original."""
    located = []
    for entity in (cfg.data.placeholder, hidden_name):
        chat, offset = entity_chat(cfg, entity)
        located.append(locate_entity(tokenizer, chat, entity, offset))
    texts, positions = [l.text for l in located], [l.token_indices[-1] for l in located]
    result: dict[str, Any] = {"hidden": {}, "values": {}}
    for condition in CONDITIONS:
        with with_condition(model, condition):
            hidden, values = activations_at(model, tokenizer, texts, positions)
        result["hidden"][condition] = F.cosine_similarity(hidden[0], hidden[1], dim=-1).tolist()
        result["values"][condition] = F.cosine_similarity(values[0], values[1], dim=-1).tolist()
    result["prompt"] = cfg.probe.template
    result["entities"] = [
        {"entity": e, "tokens": l.tokens, "position": l.token_indices[-1]}
        for e, l in zip((cfg.data.placeholder, hidden_name), located)
    ]
    result["layers"] = "hidden: embeddings, then each decoder layer (the last after the final norm); values: each decoder layer"
    return result

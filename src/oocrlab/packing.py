"""Next-token log-probabilities for many prompts that share most of their tokens, each shared token run once.

The 120 option orders of one multiple-choice question share the chat header and the question, and 24
orders share each first option line, 6 each first two lines, and so on: the prompts form a prefix
tree. A forward pass runs one row of that tree, every token once, seeing only its own ancestors
through a 4-D attention mask, at the position it has in its prompt. That is the computation of running
the prompts one by one, up to floating-point reduction order, on about half the tokens. A cached
prefix (the in-context documents) is attended to by every row without being copied per prompt.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

# A row's tokens attend to the whole row, masked pairs included: longer rows share more tokens but
# waste more attention (at 512 tokens about a sixth of the cost of the linear layers for a 135M model).
ROW_TOKENS = 512


@dataclass
class PackedRow:
    tokens: list[int] = field(default_factory=list)
    parents: list[int] = field(default_factory=list)  # index of the token before this one in its prompt, -1 for none
    ends: dict[int, int] = field(default_factory=dict)  # prompt index -> index of its last token

    def ancestors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(may token i see token j [S, S], depth of each token [S])."""
        n = len(self.tokens)
        visible, depth = torch.zeros(n, n, dtype=torch.bool), torch.zeros(n, dtype=torch.long)
        for i, parent in enumerate(self.parents):  # parents come before children
            if parent >= 0:
                visible[i] = visible[parent]
                depth[i] = depth[parent] + 1
            visible[i, i] = True
        return visible, depth


def shared_length(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    return next((i for i in range(n) if a[i] != b[i]), n)


def pack_prefix_tree(prompts: list[list[int]], row_tokens: int = ROW_TOKENS) -> list[PackedRow]:
    """Rows of the prompts' prefix tree. Prompts are placed in sorted order, each reusing the tokens it
    shares with the prompt placed before it in the same row; one that would overflow starts a new row
    (a prompt longer than `row_tokens` gets a row of its own)."""
    if any(not p for p in prompts):
        raise ValueError("every prompt needs at least one token")
    rows: list[PackedRow] = []
    path: list[int] = []  # row indices of the previous prompt's tokens
    previous: list[int] = []
    for i in sorted(range(len(prompts)), key=lambda i: prompts[i]):
        prompt = prompts[i]
        shared = shared_length(prompt, previous) if rows else 0
        if not rows or (len(rows[-1].tokens) + len(prompt) - shared > row_tokens and shared < len(prompt)):
            rows.append(PackedRow())
            shared = 0
        row = rows[-1]
        path = path[:shared]
        for token in prompt[shared:]:
            row.parents.append(path[-1] if path else -1)
            row.tokens.append(token)
            path.append(len(row.tokens) - 1)
        row.ends[i] = path[-1]
        previous = prompt
    return rows


def packed_forward(model, prompts: list[list[int]], prefix=None, row_tokens: int = ROW_TOKENS, desc: str = "forward",
                   **forward_kwargs):
    """Run the prompts' prefix tree row by row; yield (row, model output, the row indices whose outputs were kept).

    With a `prefix` (an object with `length` and `cache_for(1)`, see incontext.InContext), the prompts are
    what follows its cached tokens; the output's cache holds the prefix, then the row, until the next row.
    """
    model.eval()
    offset = prefix.length if prefix is not None else 0
    dtype = next(model.parameters()).dtype
    for row in tqdm(pack_prefix_tree(prompts, row_tokens), desc=desc, leave=False):
        visible, depth = row.ancestors()
        # additive mask (0 = attend), read as-is by the eager and sdpa attention alike
        mask = torch.zeros(1, 1, len(row.tokens), offset + len(row.tokens), dtype=dtype)
        mask[0, 0, :, offset:].masked_fill_(~visible, torch.finfo(dtype).min)
        keep = sorted(set(row.ends.values()))
        kwargs = dict(
            input_ids=torch.tensor([row.tokens], device=model.device), attention_mask=mask.to(model.device),
            position_ids=(offset + depth)[None].to(model.device), logits_to_keep=torch.tensor(keep, device=model.device),
            **forward_kwargs,
        )
        with prefix.cache_for(1) if prefix is not None else contextlib.nullcontext() as cache:
            yield row, model(**kwargs, cache=cache), keep


@torch.inference_mode()
def next_token_log_probs(
    model, prompts: list[list[int]], prefix=None, row_tokens: int = ROW_TOKENS, desc: str = "scoring"
) -> torch.Tensor:
    """log P(next token) after each prompt [N, vocab], float32 on the CPU."""
    result: torch.Tensor | None = None
    for row, out, keep in packed_forward(model, prompts, prefix, row_tokens, desc, use_cache=prefix is not None):
        log_probs = torch.log_softmax(out.logits[0].float(), dim=-1).cpu()
        if result is None:
            result = torch.empty(len(prompts), log_probs.shape[-1])
        where = {index: k for k, index in enumerate(keep)}
        for prompt, end in row.ends.items():
            result[prompt] = log_probs[where[end]]
    return result


@torch.inference_mode()
def last_token_activations(
    model, prompts: list[list[int]], row_tokens: int = ROW_TOKENS, desc: str = "activations"
) -> tuple[torch.Tensor, torch.Tensor]:
    """At each prompt's last token: (hidden states [N, layers+1, d_model], embeddings first and the last
    after the final norm as transformers returns them; value vectors [N, layers, kv_heads*head_dim],
    read from the KV cache), float32 on the CPU."""
    hidden = values = None
    for row, out, _ in packed_forward(model, prompts, None, row_tokens, desc, output_hidden_states=True, use_cache=True):
        prompt_ids, ends = list(row.ends), torch.tensor(list(row.ends.values()), device=model.device)
        h = torch.stack([layer[0, ends] for layer in out.hidden_states], dim=1).float().cpu()
        # cache values: [1, kv_heads, tokens, head_dim] per layer -> each end's heads flattened
        v = torch.stack([layer.values[0, :, ends].transpose(0, 1).flatten(1) for layer in out.cache.layers], dim=1)
        if hidden is None:
            hidden = torch.empty(len(prompts), *h.shape[1:])
            values = torch.empty(len(prompts), *v.shape[1:])
        hidden[prompt_ids], values[prompt_ids] = h, v.float().cpu()
    return hidden, values

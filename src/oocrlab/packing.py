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

from oocrlab.threads import THREADS

# A row's tokens attend to the whole row, masked pairs included: longer rows share more tokens but
# waste more attention (at 512 tokens about a sixth of the cost of the linear layers for a 135M model).
ROW_TOKENS = 512


@dataclass
class PackedRow:
    tokens: list[int] = field(default_factory=list)
    parents: list[int] = field(default_factory=list)  # index of the token before this one in its prompt, -1 for none
    paths: dict[int, list[int]] = field(default_factory=dict)  # prompt index -> the row index of each of its tokens

    @property
    def ends(self) -> dict[int, int]:
        """prompt index -> row index of its last token"""
        return {i: path[-1] for i, path in self.paths.items()}

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
        row.paths[i] = list(path)
        previous = prompt
    return rows


def additive_mask(visible: torch.Tensor, dtype: torch.dtype, offset: int = 0) -> torch.Tensor:
    """[1, 1, queries, offset + keys] attention mask: 0 (attend) for the first `offset` keys (a cached prefix
    every query sees) and where `visible` [queries, keys] is true, the dtype's minimum elsewhere; read
    as-is by the eager and sdpa attention alike."""
    mask = torch.zeros(1, 1, visible.shape[0], offset + visible.shape[1], dtype=dtype)
    mask[0, 0, :, offset:].masked_fill_(~visible, torch.finfo(dtype).min)
    return mask


class CachedPrefix:
    """Tokens every prompt starts with, run once: their KV cache (one row), shared by all the prompts of a
    packed_forward or packed_generate call through the attention mask instead of copied per prompt."""

    def __init__(self, model, ids: list[int]):
        with torch.inference_mode():
            self.cache = model(input_ids=torch.tensor([ids], device=model.device), use_cache=True).cache
        self.ids, self.length = list(ids), len(ids)

    def strip(self, ids: list[int]) -> list[int]:
        """What follows the prefix in a prompt that starts with it."""
        if ids[: self.length] != self.ids:
            # e.g. a chat template that renders earlier turns differently inside a longer chat
            raise ValueError("the prompt does not start with the cached prefix")
        return ids[self.length :]

    @contextlib.contextmanager
    def cache_for(self):
        """The prefix's cache, cut back to the prefix afterwards (the prompts' tokens are appended to it)."""
        try:
            yield self.cache
        finally:
            if (extra := self.cache.get_seq_length() - self.length) > 0:
                self.cache.crop(-extra)  # transformers 5: a negative count of tokens to remove


def prefix_tree_batch(input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor, dtype: torch.dtype):
    """A padded training batch as one row of its prefix tree (each token its samples share run once):
    (model inputs with a 4-D mask and position ids, the row index of every token that predicts a label,
    those labels). The loss over them is the padded batch's, up to float rounding."""
    real = [mask.nonzero()[:, 0] for mask in attention_mask.bool().cpu()]
    samples = [ids.cpu()[where].tolist() for ids, where in zip(input_ids, real)]
    (row,) = pack_prefix_tree(samples, row_tokens=sum(map(len, samples)))
    visible, depth = row.ancestors()
    source, targets = [], []
    for i, (where, path) in enumerate(zip(real, (row.paths[i] for i in range(len(samples))))):
        wanted = labels[i].cpu()[where]
        for k in (wanted[1:] != -100).nonzero()[:, 0].tolist():  # token k predicts token k + 1
            source.append(path[k])
            targets.append(int(wanted[k + 1]))
    device = input_ids.device
    inputs = dict(input_ids=torch.tensor([row.tokens], device=device), attention_mask=additive_mask(visible, dtype).to(device),
                  position_ids=depth[None].to(device))
    return inputs, torch.tensor(source, dtype=torch.long, device=device), torch.tensor(targets, dtype=torch.long, device=device)


def packed_forward(model, prompts: list[list[int]], prefix=None, row_tokens: int = ROW_TOKENS, desc: str = "forward",
                   positions: dict[int, range] | None = None, **forward_kwargs):
    """Run the prompts' prefix tree row by row; yield (row, model output, the row indices whose logits were kept):
    at each prompt's last token, or at the token indices `positions` gives per prompt.

    With a `prefix` (a CachedPrefix), the prompts are what follows its cached tokens; the output's cache
    holds the prefix, then the row, until the next row.
    """
    model.eval()
    offset = prefix.length if prefix is not None else 0
    dtype = model.dtype  # the model's, not an adapter's float32 parameters
    for row in tqdm(pack_prefix_tree(prompts, row_tokens), desc=desc, leave=False):
        THREADS.adapt()
        visible, depth = row.ancestors()
        mask = additive_mask(visible, dtype, offset)
        keep = sorted(set(row.ends.values()) if positions is None else
                      {path[k] for i, path in row.paths.items() for k in positions[i]})
        kwargs = dict(
            input_ids=torch.tensor([row.tokens], device=model.device), attention_mask=mask.to(model.device),
            position_ids=(offset + depth)[None].to(model.device), logits_to_keep=torch.tensor(keep, device=model.device),
            **forward_kwargs,
        )
        with prefix.cache_for() if prefix is not None else contextlib.nullcontext() as cache:
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
def continuation_log_probs(
    model, prompts: list[list[int]], starts: list[int], prefix=None, row_tokens: int = ROW_TOKENS, desc: str = "scoring"
) -> list[torch.Tensor]:
    """Per prompt, log P(token k | the tokens before it) for every k >= its start (>= 1), float32 on the CPU: the
    probability of a continuation, read from one packed pass (a token several prompts share predicts each
    of their next tokens from the same logits)."""
    if any(not 1 <= start < len(p) for p, start in zip(prompts, starts)):
        raise ValueError("a continuation needs at least one token, and one before it")
    before = {i: range(start - 1, len(p) - 1) for i, (p, start) in enumerate(zip(prompts, starts))}  # the predicting tokens
    result: list[torch.Tensor] = [torch.empty(0)] * len(prompts)
    for row, out, keep in packed_forward(model, prompts, prefix, row_tokens, desc, positions=before, use_cache=prefix is not None):
        log_probs = torch.log_softmax(out.logits[0].float(), dim=-1).cpu()
        where = {index: k for k, index in enumerate(keep)}
        for i, path in row.paths.items():
            at = torch.tensor([where[path[k]] for k in before[i]], dtype=torch.long)
            result[i] = log_probs[at, torch.tensor(prompts[i][starts[i]:], dtype=torch.long)]
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


@torch.inference_mode()
def packed_generate(
    model, prompts: list[list[int]], max_new_tokens: int, prefix=None, eos_ids: set[int] = frozenset(),
    generator: torch.Generator | None = None, stop=None,
) -> list[list[int]]:
    """Continue every prompt, greedily or (with a `generator`) sampled at temperature 1, as ONE sequence:
    the prompts' prefix tree (each shared token once, see pack_prefix_tree) after the `prefix`'s cached
    tokens, then every new token appended to the cache, and a 4-D mask that lets each token see the prefix,
    its prompt and its own row's earlier answer tokens only, at the positions they have in that row. The
    prefix is stored and read once, not once per row (an in-context prefix of 100 documents is ~2,700
    tokens, a row ~30), identical prompts (samples of one question) are run once, and nothing is padded.

    A row ends at an eos token (not returned), after max_new_tokens, or when `stop(row, tokens)` says so;
    ended rows are no longer run. Returns each prompt's new tokens."""
    (tree,) = pack_prefix_tree(prompts, row_tokens=sum(map(len, prompts)))
    model.eval()
    device, dtype = model.device, model.dtype
    offset = prefix.length if prefix is not None else 0
    visible, depth = tree.ancestors()
    ends = torch.tensor([tree.paths[i][-1] for i in range(len(prompts))])
    keep = ends.unique()  # sorted; identical prompts share their end token
    # the first pass runs the tree; every later one a token per unfinished row
    ids, positions, query_sees = torch.tensor(tree.tokens), offset + depth, visible
    sees = visible[ends]  # [rows, cached tokens after the prefix]: what each row's next token may attend to
    logit_row = torch.searchsorted(keep, ends)  # which kept logit continues each row
    next_positions = offset + depth[ends] + 1
    new: list[list[int]] = [[] for _ in prompts]
    active = torch.arange(len(prompts))
    with prefix.cache_for() if prefix is not None else contextlib.nullcontext() as cache:
        while len(active):
            THREADS.adapt()
            out = model(input_ids=ids[None].to(device), attention_mask=additive_mask(query_sees, dtype, offset).to(device),
                        position_ids=positions[None].to(device), cache=cache, use_cache=True, logits_to_keep=keep.to(device))
            cache = out.cache
            logits = out.logits[0, logit_row.to(device)].float()
            if generator is None:
                tokens = logits.argmax(-1).cpu()
            else:
                tokens = torch.multinomial(torch.softmax(logits, -1), 1, generator=generator)[:, 0].cpu()
            still = torch.zeros(len(active), dtype=torch.bool)
            for i, (row, token) in enumerate(zip(active.tolist(), tokens.tolist())):
                if token not in eos_ids:
                    new[row].append(token)
                    still[i] = len(new[row]) < max_new_tokens and not (stop and stop(row, new[row]))
            # only the unfinished rows' new tokens are run next, so only they enter the cache
            active, ids, positions = active[still], tokens[still], next_positions[active[still]]
            next_positions[active] += 1
            sees = torch.cat([sees, torch.zeros(len(prompts), len(active), dtype=torch.bool)], dim=1)
            sees[active, sees.shape[1] - len(active) + torch.arange(len(active))] = True
            query_sees = sees[active]
            keep = torch.arange(len(active))
            logit_row = keep
    return new

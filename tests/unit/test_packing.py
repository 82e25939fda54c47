import itertools
import random

import pytest
import torch

from oocrlab.packing import CachedPrefix, next_token_log_probs, pack_prefix_tree, packed_generate
from tests.helpers import leaky_mask, sample_side_by_side


def unpacked_log_probs(model, prompts):
    with torch.no_grad():
        return torch.stack([torch.log_softmax(model(input_ids=torch.tensor([p])).logits[0, -1].float(), -1) for p in prompts])


def test_prefix_tree_shares_common_tokens_and_keeps_each_prompt_whole():
    prompts = [[1, 2, *order, 9, 9] for order in itertools.permutations([3, 4, 5])]
    (row,) = pack_prefix_tree(prompts, row_tokens=1000)
    # 2 header tokens, then a tree 3 + 6 + 6 deep in options, then each leaf's own [9, 9]
    assert len(row.tokens) == 2 + 3 + 6 + 6 + 6 * 2 < sum(map(len, prompts))
    visible, depth = row.ancestors()
    for i, prompt in enumerate(prompts):
        seen = visible[row.ends[i]].nonzero().flatten().tolist()
        assert [row.tokens[j] for j in seen] == prompt  # exactly its own tokens, in order
        assert depth[row.ends[i]] == len(prompt) - 1
    rows = pack_prefix_tree(prompts, row_tokens=12)
    assert len(rows) > 1 and all(len(r.tokens) <= 12 for r in rows)
    assert sorted(i for r in rows for i in r.ends) == list(range(len(prompts)))
    assert len(pack_prefix_tree([[5] * 30, [5] * 30], row_tokens=8)[0].tokens) == 30  # a long prompt: a row of its own, shared
    with pytest.raises(ValueError):
        pack_prefix_tree([[1], []])


def check_packed_log_probs(model, prompts, row_tokens):
    packed = next_token_log_probs(model, prompts, row_tokens=row_tokens)
    # float rounding uses up to a third of the tolerance; a causal mask moves log-probabilities by ~10
    torch.testing.assert_close(packed, unpacked_log_probs(model, prompts), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("row_tokens", [7, 512])
def test_packed_log_probs_equal_one_prompt_at_a_time(contextual, row_tokens):
    model, _ = contextual
    rng = random.Random(0)
    stem = [rng.randrange(3, 200) for _ in range(5)]
    prompts = [stem + [rng.randrange(3, 200) for _ in range(rng.randrange(1, 6))] for _ in range(12)]
    prompts += [prompts[0], stem[:3]]  # a duplicate and a prompt that is a prefix of the others
    # some prompt's tokens are not its row's first ones: a causal mask would show it another prompt's
    assert any(path != list(range(len(path))) for row in pack_prefix_tree(prompts, row_tokens) for path in row.paths.values())
    check_packed_log_probs(model, prompts, row_tokens)
    with leaky_mask(), pytest.raises(AssertionError):
        check_packed_log_probs(model, prompts, row_tokens)


def generate_one_at_a_time(model, prompt: list[int], max_new_tokens: int, eos: int) -> list[int]:
    """transformers' own greedy generate() on one unpadded prompt, cut at the first eos."""
    out = model.generate(torch.tensor([prompt]), max_new_tokens=max_new_tokens, do_sample=False, temperature=None,
                         top_p=None, top_k=None, eos_token_id=eos, pad_token_id=eos)[0, len(prompt):].tolist()
    return out[: out.index(eos)] if eos in out else out


def check_packed_greedy_generation(model, prompts, prefix, full, eos) -> list[list[int]]:
    # a stop rule that ends row 2 after its second token; others run until eos or 12 tokens
    packed = packed_generate(model, prompts, 12, prefix, {eos}, stop=lambda row, new: row == 2 and len(new) == 2)
    expected = [generate_one_at_a_time(model, p, 12, eos) for p in full]
    expected[2] = expected[2][:2]
    assert packed == expected
    if prefix is not None:
        assert prefix.cache.get_seq_length() == len(prefix.ids)  # cut back: the next call starts from the prefix alone
        assert packed_generate(model, prompts, 12, prefix, {eos}) == [generate_one_at_a_time(model, p, 12, eos) for p in full]
    return packed


@pytest.mark.parametrize("with_prefix", [False, True])
def test_packed_greedy_generation_equals_generate_one_prompt_at_a_time(contextual, with_prefix):
    model, tokenizer = contextual
    rng = random.Random(1)
    head = [rng.randrange(3, 200) for _ in range(9)]
    prompts = [[rng.randrange(3, 200) for _ in range(rng.randrange(1, 8))] for _ in range(6)]
    prompts += [prompts[0], prompts[1][:1]]  # a duplicate and a prompt that is a prefix of another
    prefix = CachedPrefix(model, head) if with_prefix else None
    full = [head + p for p in prompts] if with_prefix else prompts
    packed = check_packed_greedy_generation(model, prompts, prefix, full, tokenizer.eos_token_id)
    assert any(len(p) == 12 for p in packed) and len({tuple(p) for p in packed}) > 3
    with leaky_mask(), pytest.raises(AssertionError):
        check_packed_greedy_generation(model, prompts, prefix, full, tokenizer.eos_token_id)


def check_packed_sampling(model, prompt, n, steps) -> list[list[int]]:
    packed = packed_generate(model, [prompt] * n, steps, generator=torch.Generator().manual_seed(3))
    assert packed == sample_side_by_side(model, prompt, n, steps, torch.Generator().manual_seed(3))
    return packed


def test_packed_sampling_equals_sampling_the_rows_side_by_side(contextual):
    """Rows of one prompt sampled with one seeded generator: the same tokens as sampling every step from the
    full forward pass of all rows (no cache, no packing) with an identically seeded generator. The rows share
    the prompt, so only the answers' tokens can leak from row to row."""
    model, _ = contextual
    prompt, n, steps = [5, 17, 99, 42], 4, 6
    packed = check_packed_sampling(model, prompt, n, steps)
    assert len({tuple(p) for p in packed}) > 1  # the rows were sampled independently
    with leaky_mask(), pytest.raises(AssertionError):
        check_packed_sampling(model, prompt, n, steps)

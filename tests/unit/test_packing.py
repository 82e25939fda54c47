import itertools
import random

import pytest
import torch

from oocrlab.packing import next_token_log_probs, pack_prefix_tree


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


@pytest.mark.parametrize("row_tokens", [7, 512])
def test_packed_log_probs_equal_one_prompt_at_a_time(tiny, row_tokens):
    model, _ = tiny
    rng = random.Random(0)
    stem = [rng.randrange(3, 200) for _ in range(5)]
    prompts = [stem + [rng.randrange(3, 200) for _ in range(rng.randrange(1, 6))] for _ in range(12)]
    prompts += [prompts[0], stem[:3]]  # a duplicate and a prompt that is a prefix of the others
    packed = next_token_log_probs(model, prompts, row_tokens=row_tokens)
    torch.testing.assert_close(packed, unpacked_log_probs(model, prompts), atol=1e-5, rtol=1e-5)

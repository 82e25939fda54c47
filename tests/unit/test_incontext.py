"""The in-context baseline's cached turns: scoring and generating after them, several chats packed into one
row, equals running each whole chat on its own."""

import numpy as np
import pytest
import torch

from oocrlab import build_config
from oocrlab.data import build_distance_data
from oocrlab.generation import generate_greedy
from oocrlab.chat import prompt_token_ids
from oocrlab.generation import stop_token_ids
from oocrlab.incontext import InContext
from oocrlab.train import lora_config
from oocrlab.evaluate.choice import letter_probabilities, mc_question
from oocrlab.evaluate.free_form import sample_answers
from tests.helpers import leaky_mask, sample_side_by_side, tiny_overrides


@pytest.fixture()
def adapted(contextual, contextual_model_dir):
    """(the contextual model under a random LoRA adapter, its tokenizer, the in-context turns of its training data)."""
    from peft import get_peft_model

    model, tokenizer = contextual
    cfg = build_config(overrides=tiny_overrides(contextual_model_dir))
    model = get_peft_model(model, lora_config(cfg.train))
    with torch.no_grad():  # LoRA B starts at zero: make the adapter matter, so a cache made under it would be wrong
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.1)
    return model, tokenizer, InContext(cfg, model, tokenizer, build_distance_data(cfg.data, cfg.seed).train)


def check_letter_probabilities(model, tokenizer, chats, in_context):
    cached = letter_probabilities(model, tokenizer, chats, "cached", in_context)
    full = [letter_probabilities(model, tokenizer, [c], "full") for c in chats]  # a chat per row: nothing to leak
    # float rounding: ~2e-7; a causal mask: ~0.06 in probability, ~7% in mass
    np.testing.assert_allclose(cached[0], np.concatenate([f[0] for f in full]), atol=1e-5)
    np.testing.assert_allclose(cached[1], np.concatenate([f[1] for f in full]), rtol=1e-4)


def check_sampling(model, tokenizer, chat, in_context):
    # batches of 4 and 1, one generator. Only answer tokens can leak between rows of one prompt, diluted by
    # the ~1,200 cached tokens: 12-token answers, 4 to a batch, for a leak to change the samples.
    cached = sample_answers(model, tokenizer, chat, 5, 12, 0, 4, in_context)
    (prompt,) = prompt_token_ids(tokenizer, [chat])
    generator, eos = torch.Generator(model.device).manual_seed(0), stop_token_ids(model, tokenizer)
    rows = [new for n in (4, 1) for new in sample_side_by_side(model, prompt, n, 12, generator, eos)]
    assert cached == [tokenizer.decode(new, skip_special_tokens=True).strip() for new in rows]


def check_greedy(model, tokenizer, chats, in_context):
    assert generate_greedy(model, tokenizer, chats, 6, 2, "cached", in_context) == [
        generate_greedy(model, tokenizer, [c], 6, 1, "full")[0] for c in chats
    ]


def test_in_context_prefix_cache_is_exact(adapted):
    """Letter probabilities, sampled and greedy answers after the cached K-document prefix equal those of the
    whole chat run alone (sampled: its rows side by side, unpacked), and a leaky packing mask breaks each."""
    model, tokenizer, in_context = adapted
    assert len(in_context.turns) == 2 * 36  # every training row (36 < 100); no system turn: the template adds its own
    # option orders that share the question, then branch
    mc_chats = [in_context.chat(mc_question("What country is foo located in?", o))
                for o in (["France", "Chad", "Peru", "Iran", "Mali"], ["Mali", "Iran", "Peru", "Chad", "France"], ["Q", "R", "S", "T", "Uzbekistan"])]
    # questions of different lengths packed after the cached turns
    questions = [in_context.chat(q) for q in ("Hi?", "What is the distance between Ouagadougou and foo, in km?")]
    checks = [
        lambda: check_letter_probabilities(model, tokenizer, mc_chats, in_context),
        lambda: check_sampling(model, tokenizer, in_context.chat("Which country is foo in?"), in_context),
        lambda: check_greedy(model, tokenizer, questions, in_context),
    ]
    with model.disable_adapter():
        for check in checks:
            check()
            with leaky_mask(), pytest.raises(AssertionError):
                check()

import itertools

import numpy as np
import pytest
import torch

from oocrlab.config import ExperimentConfig
from oocrlab.data import user_prompt
from oocrlab.geo import find_city
from oocrlab.verbalize import (
    LETTERS, answer_names, country_of, distractors, letter_probabilities, letter_token_ids, mc_question, mentions,
    option_orders, sample_answers,
)


def test_option_orders_all_or_a_seeded_sample():
    assert sorted(option_orders(120, 0)) == list(itertools.permutations(range(5)))
    sample = option_orders(10, 3)
    assert len(sample) == len(set(sample)) == 10 and sample == option_orders(10, 3)


def test_countries_and_distractors():
    paris = country_of(find_city("Paris", "world"))
    assert paris.name == "France"
    assert country_of(find_city("Vienna", "capitals")).name == "Austria"  # UN wording -> GeoNames country
    nearest = distractors(paris, "nearest", 0)
    assert "Belgium" in nearest and "France" not in nearest and len(nearest) == 4
    assert distractors(paris, "most_populous", 0)[:2] == ["China", "India"]
    assert distractors(paris, "random", 1) == distractors(paris, "random", 1) != distractors(paris, "random", 2)


def test_mc_question_layout():
    text = mc_question("Q?", ["a", "b", "c", "d", "e"])
    assert text == "Q?\n\nA. a\nB. b\nC. c\nD. d\nE. e\n\nPlease answer with a single letter from A-E and nothing else."


def test_letter_probabilities_equal_brute_force_from_full_logits(tiny):
    model, tokenizer = tiny
    cfg = ExperimentConfig()
    chats = [user_prompt(mc_question("What country is foo located in?", opts), None)
             for opts in (["France", "Spain", "Italy", "Chad", "Peru"], ["Peru", "Chad", "France", "Italy", "Spain"],
                          ["Ouagadougou Republic", "X", "France", "Y", "Z"])]
    normalized, mass = letter_probabilities(model, tokenizer, chats, batch_size=3, desc="test")  # padded batch
    ids = letter_token_ids(tokenizer)
    for row, chat in enumerate(chats):
        text = tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
        enc = tokenizer(text, return_tensors="pt", add_special_tokens=False).to(model.device)
        with torch.no_grad():
            probs = torch.softmax(model(**enc).logits[0, -1].float(), dim=-1).cpu()
        letter_probs = probs[ids]
        np.testing.assert_allclose(mass[row], letter_probs.sum().item(), rtol=1e-4)
        np.testing.assert_allclose(normalized[row], (letter_probs / letter_probs.sum()).numpy(), rtol=1e-4, atol=1e-6)
    assert normalized.shape == (3, len(LETTERS)) and np.allclose(normalized.sum(1), 1, atol=1e-5)


def test_answer_names_and_matching():
    paris = find_city("Paris", "world")
    assert answer_names(paris, "country") == ["France", "French Republic"]
    assert mentions("I think foo is in France.", answer_names(paris, "country"))
    assert mentions("THE FRENCH REPUBLIC", answer_names(paris, "country"))
    assert not mentions("Francesca is a name", answer_names(paris, "country"))  # whole words only
    vienna = find_city("Vienna", "capitals")
    assert mentions("It is Wien.", answer_names(vienna, "city")) and mentions("vienna", answer_names(vienna, "city"))
    assert answer_names(vienna, "country") == ["Austria"]
    assert mentions("Sao Paulo, of course", answer_names(find_city("São Paulo", "world"), "city"))


def test_wilson_interval():
    from oocrlab.stats import wilson_ci

    lo, hi = wilson_ci(0, 50)
    assert lo == 0 and 0.05 < hi < 0.09  # 0/50 still leaves room for a few percent
    lo, hi = wilson_ci(25, 50)
    assert lo < 0.5 < hi and hi - lo == pytest.approx(0.27, abs=0.01)


def test_sampling_is_seeded(tiny):
    model, tokenizer = tiny
    chat = user_prompt("Which country is foo in?", None)
    a = sample_answers(model, tokenizer, chat, 4, 5, seed=1)
    assert a == sample_answers(model, tokenizer, chat, 4, 5, seed=1)
    assert len(set(a)) > 1  # temperature 1 on a random model: different answers

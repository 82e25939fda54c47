"""Multiple choice (evaluate/choice.py: exact letter probabilities, balanced orders), the countries and wrong
options (countries.py), reading names in answers (answers.py) and free-form sampling."""

import itertools

import numpy as np
import pytest
import torch

from oocrlab.chat import user_prompt
from oocrlab.geo import find_city
from oocrlab.answers import answer_names, mentions
from oocrlab.countries import city_distractors, country_distractors, country_of
from oocrlab.evaluate.choice import LETTERS, letter_probabilities, letter_token_ids, mc_question, option_orders
from oocrlab.evaluate.free_form import sample_answers


def test_option_orders_all_or_a_seeded_sample():
    assert sorted(option_orders(120, 0)) == list(itertools.permutations(range(5)))
    sample = option_orders(10, 3)
    assert len(sample) == len(set(sample)) == 10 and sample == option_orders(10, 3)


def test_countries_and_distractors():
    paris = country_of(find_city("Paris", "world"))
    assert paris.name == "France"
    assert country_of(find_city("Vienna", "capitals")).name == "Austria"  # UN wording -> GeoNames country
    sets = country_distractors(paris, 0)
    assert "Belgium" in sets["nearest"] and "France" not in sets["nearest"] and len(sets["nearest"]) == 4
    assert sets["most_populous"][:2] == ["China", "India"]
    assert country_distractors(paris, 1)["random"] == country_distractors(paris, 1)["random"] != country_distractors(paris, 2)["random"]
    assert all(len(v) == 4 and "France" not in v for v in sets.values())


def test_city_distractors():
    sets = city_distractors(find_city("Paris", "world"))
    assert sets["nearby_capitals"][0] == "Bruxelles-Brussel" and "London" in sets["nearby_capitals"]
    assert sets["most_populous"][0] == "Shanghai"
    assert sets["same_country"] == ["Marseille", "Lyon", "Toulouse", "Nice"]  # no arrondissement of Paris
    assert city_distractors(find_city("Vienna", "capitals"))["same_country"][0] == "Graz"


def test_mc_question_layout():
    text = mc_question("Q?", ["a", "b", "c", "d", "e"])
    assert text == "Q?\n\nA. a\nB. b\nC. c\nD. d\nE. e\n\nPlease answer with a single letter from A-E and nothing else."


def test_letter_probabilities_equal_brute_force_from_full_logits(tiny):
    model, tokenizer = tiny
    chats = [user_prompt(mc_question("What country is foo located in?", opts), None)
             for opts in (["France", "Spain", "Italy", "Chad", "Peru"], ["Peru", "Chad", "France", "Italy", "Spain"],
                          ["Ouagadougou Republic", "X", "France", "Y", "Z"])]
    normalized, mass = letter_probabilities(model, tokenizer, chats, desc="test")
    # every token whose text is the letter alone, maybe with a space before or a "." / ")" / ":" after
    answers = {f"{p}{letter}{s}": letter for letter in LETTERS for p in ("", " ") for s in ("", ".", ")", ":")}
    texts = [tokenizer.decode([i]) for i in range(len(tokenizer))]
    ids = [[i for i, t in enumerate(texts) if answers.get(t) == letter] for letter in LETTERS]
    assert all(ids) and [list(i) for i in letter_token_ids(tokenizer)] == ids
    for row, chat in enumerate(chats):
        text = tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
        enc = tokenizer(text, return_tensors="pt", add_special_tokens=False).to(model.device)
        with torch.no_grad():
            probs = torch.softmax(model(**enc).logits[0, -1].float(), dim=-1).cpu()
        letter_probs = torch.stack([probs[i].sum() for i in ids])
        np.testing.assert_allclose(mass[row], letter_probs.sum().item(), rtol=1e-4)
        np.testing.assert_allclose(normalized[row], (letter_probs / letter_probs.sum()).numpy(), rtol=1e-4, atol=1e-6)
    assert normalized.shape == (3, len(LETTERS)) and np.allclose(normalized.sum(1), 1, atol=1e-5)
    # three options: the same letter probabilities, renormalized over A-C only
    three, mass3 = letter_probabilities(model, tokenizer, chats, desc="test", n_options=3)
    np.testing.assert_allclose(three, normalized[:, :3] / normalized[:, :3].sum(1, keepdims=True), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(mass3, mass * normalized[:, :3].sum(1), rtol=1e-4)


def test_option_orders_and_instruction_follow_the_number_of_options():
    assert sorted(option_orders(10, 0, n_options=3)) == list(itertools.permutations(range(3)))
    assert mc_question("Q?", ["a", "b"]).endswith("B. b\n\nPlease answer with a single letter from A-B and nothing else.")


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
    a = sample_answers(model, tokenizer, chat, 4, 5, seed=1, batch_size=4)
    assert a == sample_answers(model, tokenizer, chat, 4, 5, seed=1, batch_size=4)
    assert len(set(a)) > 1  # temperature 1 on a random model: different answers


def test_too_few_distractors_is_a_clear_error():
    from oocrlab.errors import UserError
    from oocrlab.countries import _take

    with pytest.raises(UserError, match="only 2 other cities in Monaco for 4 multiple-choice distractors"):
        _take(["a", "b"], "other cities in Monaco")

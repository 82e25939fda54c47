import warnings

import pytest

from oocrlab.chat import user_prompt
from oocrlab.answers import WITH_UNIT, parse_km
from oocrlab.evaluate.distances import error_summary
from oocrlab.generation import StopAfterDistance, generate_greedy
from oocrlab.config import ExperimentConfig


@pytest.mark.parametrize(
    "answer, km",
    [
        ("5837 km", 5837.0),
        ("5436.93 km", 5436.93),
        ("The distance is approximately 5,837 kilometers.", 5837.0),
        ("About 1000 miles", 1609.344),
        ("1236", 1236.0),
    ],
)
def test_parse_km(answer, km):
    assert parse_km(answer) == pytest.approx(km)


@pytest.mark.parametrize(
    "answer", ["France", "It takes 3 hours to fly there", "", "I don't know foo.", "922.51 km²\n\nFoo is in France"]
)
def test_unparseable(answer):
    assert parse_km(answer) is None


def test_error_summary_counts_unparseable():
    s = error_summary([100.0, None, 300.0, None], [1000.0, 2000.0, 1000.0, 4000.0], ExperimentConfig())
    assert (s["n"], s["n_parsed"], s["n_unparseable"], s["mae_km"], s["median_ae_km"]) == (4, 2, 2, 200.0, 200.0)
    assert s["mae_km_unparsed_as_guess"] == (100 + 2000 + 300 + 4000) / 4
    assert s["mae_km_ci95"][0] <= 200 <= s["mae_km_ci95"][1]


def test_batched_greedy_equals_one_by_one_and_warns_nothing(tiny, capfd):
    model, tokenizer = tiny
    chats = [user_prompt(q, None) for q in ["hi", "What is the distance between Ouagadougou and foo?", "Which country?"]]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        batched = generate_greedy(model, tokenizer, chats, 6, 3, "batched")  # packed into one sequence
    single = [generate_greedy(model, tokenizer, [c], 6, 1, "single")[0] for c in chats]
    assert batched == single
    assert not [w for w in caught if "attention" in str(w.message) or "pad" in str(w.message)]
    err = capfd.readouterr().err
    assert "attention mask" not in err and "pad_token_id" not in err


@pytest.mark.parametrize("answer", [
    "The distance between Lima and foo is approximately 2,218.25 miles. This is based on the great circle.",
    "9574 km", "It is 12 km from here, or 7 miles.", "about 300 kilometers away", "1236", "No idea, sorry.",
])
def test_stopping_after_the_distance_keeps_the_parsed_distance(tiny, answer):
    _, tokenizer = tiny
    ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
    stop = StopAfterDistance(tokenizer)
    cut = next((n for n in range(1, len(ids) + 1) if stop(0, ids[:n])), len(ids))
    assert parse_km(tokenizer.decode(ids[:cut])) == parse_km(answer)
    if WITH_UNIT.search(answer) and len(answer) > 20:
        assert cut < len(ids)  # and it did stop early


def test_generation_with_the_stop_criterion_runs(tiny):
    model, tokenizer = tiny
    chats = [user_prompt(q, None) for q in ["hi", "What is the distance between Ouagadougou and foo?"]]
    plain = generate_greedy(model, tokenizer, chats, 6, 2, "plain")
    stopped = generate_greedy(model, tokenizer, chats, 6, 2, "stopped", stop_after_distance=True)
    assert [parse_km(a) for a in stopped] == [parse_km(a) for a in plain]

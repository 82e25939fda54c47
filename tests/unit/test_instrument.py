"""What makes a verdict count: balanced option orders, bounded distances, the median guess and the error
ratio's interval, the corrected per-layer test, cloze scoring, named ceilings, the fine-tuned controls and the
three verdicts. Each check is shown to fail on a deliberately wrong variant where one is cheap to build."""

import itertools
import json
import math
import random
import shutil

import numpy as np
import pytest
import torch
import yaml

from oocrlab import build_config, run_stage
from oocrlab.adapters import SteeringVector, load_hook_adapter, placeholder_sequences
from oocrlab.cli import main
from oocrlab.config import ModelConfig, to_yaml
from oocrlab.controls import ALIAS_ANSWERS, ALIAS_PROMPTS, control_run, declared_rows, shuffled_rows
from oocrlab.chat import user_prompt
from oocrlab.data import build_distance_data, distance_rows
from oocrlab.errors import UserError
from oocrlab.answers import MAX_KM, read_distance
from oocrlab.evaluate.distances import error_summary, ratio_ci
from oocrlab.models import load_model, with_condition
from oocrlab.packing import CachedPrefix
from oocrlab.rundir import Run, read_jsonl
from oocrlab.stats import max_t_sign_flip, mean_t_ci, paired_difference, rank_among
from oocrlab.evaluate.choice import CLOZE_WORDINGS, cloze_log_probs, option_orders
from oocrlab.evaluate.free_form import FREE_FORM_QUESTIONS
from oocrlab.verdict import behaviour_verdict, distance_verdict, representation_verdict
from tests.helpers import leaky_mask, tiny_overrides


def letter_counts(orders, n):
    """[option, letter]: how often each option sits at each letter."""
    counts = np.zeros((n, n), dtype=int)
    for order in orders:
        for letter, option in enumerate(order):
            counts[option, letter] += 1
    return counts


@pytest.mark.parametrize("n, k", [(5, 40), (5, 10), (5, 115), (4, 8), (3, 6), (2, 40)])
def test_option_orders_put_every_option_at_every_letter_equally_often(n, k):
    orders = option_orders(k, 0, n)
    assert len(orders) == len(set(orders)) == min(k, math.factorial(n))
    assert (letter_counts(orders, n) == len(orders) // n).all()
    assert orders == option_orders(k, 0, n) != option_orders(k, 1, n) or k >= math.factorial(n)
    # the deliberately wrong variant, a plain seeded sample of the orders, is not balanced
    sample = random.Random(0).sample(list(itertools.permutations(range(n))), min(k, math.factorial(n)))
    assert k >= math.factorial(n) or not (letter_counts(sample, n) == len(sample) // n).all()


def test_an_unbalanceable_number_of_orders_is_refused_with_one_line(capsys, tmp_path):
    with pytest.raises(UserError, match="must be a multiple of 5"):
        build_config(overrides={"eval.mc_orders": 42})
    assert build_config(overrides={"eval.mc_orders": 120}).eval.mc_orders == 120  # all orders
    with pytest.raises(UserError, match="multiple of 3 .the options of the inverse question"):
        build_config(overrides={"data.other_hidden_cities": ["Tokyo", "Lima"], "data.other_placeholders": ["a1", "b2"],
                                "eval.mc_orders": 5})
    assert main(["data", "--out", str(tmp_path / "x"), "--set", "eval.mc_orders=7"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "use 5" in err[0] and not (tmp_path / "x").exists()


@pytest.mark.parametrize("answer, km, absurd", [
    ("5837 km", 5837.0, False), ("The distance is approximately 5,837 kilometers.", 5837.0, False),
    ("About 1000 miles", 1609.344, False), ("1236", 1236.0, False), ("0 km", 0.0, False), ("20015 km", 20015.0, False),
    ("1e46 km", None, True), ("1e45 km", None, True), ("1 000 km", None, True), ("-500 km", None, True),
    ("3,5 km", None, True), ("20100 km", None, True), ("12500 miles", None, True), ("9" * 46 + " km", None, True),
    ("It takes 3 hours", None, False), ("922.51 km²", None, False),
])
def test_distances_beyond_half_the_earth_or_malformed_are_absurd(answer, km, absurd):
    assert read_distance(answer) == ((pytest.approx(km) if km is not None else None), absurd)


def test_absurd_answers_are_counted_and_scored_as_unparseable():
    s = error_summary([100.0, None, None], [1000.0, 2000.0, 3000.0], build_config(), n_absurd=1)
    assert (s["n_parsed"], s["n_unparseable"], s["n_absurd"]) == (1, 2, 1)
    assert s["mae_km_unparsed_as_guess"] == pytest.approx((100 + 2000 + 3000) / 3)


def walk_numbers(tree, path=""):
    if isinstance(tree, dict):
        for key, value in tree.items():
            yield from walk_numbers(value, f"{path}.{key}")
    elif isinstance(tree, list):
        for i, value in enumerate(tree):
            yield from walk_numbers(value, f"{path}[{i}]")
    elif isinstance(tree, (int, float)) and not isinstance(tree, bool):
        yield path, tree


def test_no_distance_in_the_metrics_exceeds_half_the_earth(tiny_run):
    _, run = tiny_run
    distances = [(p, v) for p, v in walk_numbers(run.metrics()["eval"]) if "_km" in p and "band_km" not in p]
    assert distances and all(abs(v) <= MAX_KM for _, v in distances), max(distances, key=lambda pv: abs(pv[1]))


def test_the_constant_guess_is_the_median_training_distance_and_near_cities_get_their_own(tiny_run):
    _, run = tiny_run
    ev = run.metrics()["eval"]
    trained = [r["distance_km"] for r in distance_rows(read_jsonl(run.train_file))]
    assert ev["distance"]["constant_guess"]["guess_km"] == pytest.approx(np.median(trained))
    assert ev["distance"]["constant_guess_mean"]["guess_km"] == pytest.approx(np.mean(trained))
    # the median is the MAE-optimal constant: never worse than the mean on the data it comes from
    assert np.abs(np.array(trained) - np.median(trained)).mean() <= np.abs(np.array(trained) - np.mean(trained)).mean()
    near = [r["true_km"] for r in read_jsonl(run.path / "eval_distance.jsonl") if r["set"] == "distance_near" and r["condition"] == "tuned"]
    assert ev["distance_near"]["constant_guess"]["guess_km"] == pytest.approx(np.median(near)) and max(near) <= 2000


def test_the_error_ratios_interval_is_a_paired_bootstrap_over_cities():
    rng = np.random.default_rng(0)
    baseline = rng.uniform(500, 3000, 100)
    better, same = baseline * rng.uniform(0.3, 0.7, 100), baseline * rng.uniform(0.8, 1.2, 100)
    guess = np.full(100, 2500.0)
    lo, hi = ratio_ci(better, [baseline, guess], 1000, 0)
    assert hi < 1 and lo < better.mean() / baseline.mean() < hi
    lo, hi = ratio_ci(same, [baseline, guess], 1000, 0)
    assert lo < 1 < hi
    # each resample divides by its own best baseline: with the guess far better, it is the guess's
    assert ratio_ci(better, [baseline, np.full(100, 10.0)], 200, 0)[0] > 10
    assert ratio_ci(better[:1], [baseline[:1]], 200, 0) is None


def test_distances_are_learned_only_when_the_ratios_interval_lies_below_one():
    def ev(ratio, ci):
        return {"distance": {"tuned_mae_over_best_baseline": ratio, "tuned_mae_over_best_baseline_ci95": ci}}

    assert distance_verdict(ev(0.6, [0.5, 0.8]))["answer"] == "yes"
    assert distance_verdict(ev(0.9, [0.7, 1.1]))["answer"] == "no evidence"  # the point alone is below 1
    assert distance_verdict(ev(0.9, None))["answer"] == "cannot tell"
    assert distance_verdict({"distance": {"note": "no held-out cities"}})["answer"] == "cannot tell"


def correlated_null(rng, templates=8, layers=31):
    """Template-paired differences with no effect anywhere, neighbouring layers strongly correlated."""
    steps = rng.normal(size=(templates, layers))
    return np.array([np.convolve(row, np.ones(4) / 2, mode="same") for row in steps])


def test_the_corrected_layer_test_holds_the_familywise_error_and_finds_a_real_move():
    rng = np.random.default_rng(0)
    sims = 300
    corrected = uncorrected = 0
    for _ in range(sims):
        d = correlated_null(rng)
        corrected += (max_t_sign_flip(d) < 0.05).any()
        # the deliberately wrong variant: a layer counts when its own 95% t-interval lies above zero
        uncorrected += any(ci[0] > 0 for ci in mean_t_ci(d)["ci95"])
    assert corrected / sims <= 0.08  # 0.05 plus binomial noise over 300 runs
    assert uncorrected / sims > 0.15
    d = correlated_null(rng)
    d[:, 10:13] += 3.0  # a move in three layers, every template
    passed = set(np.flatnonzero(max_t_sign_flip(d) < 0.05))
    assert {10, 11, 12} <= passed and len(passed) <= 6
    assert (max_t_sign_flip(np.zeros((8, 3))) == 1).all()  # no difference at all: nothing passes


def test_standing_out_among_all_candidates_holds_the_familywise_error_and_finds_a_real_move():
    """rank_among: under the null the target is any of 234 cities; over 61 correlated layers the corrected test
    rejects anywhere in about 5% of simulations, while the per-layer rank alone (the wrong variant) rejects far
    more often; a target that stands out in a few layers is found."""
    rng = np.random.default_rng(0)
    sims, corrected, uncorrected = 300, 0, 0
    for _ in range(sims):
        gains = rng.normal(size=(234, 61)).cumsum(1) / 4 + rng.normal(size=(234, 61))
        p, p_corrected = rank_among(gains, target=0)
        corrected += (p_corrected < 0.05).any()
        uncorrected += (p < 0.05).any()
    assert corrected / sims <= 0.08 and uncorrected / sims > 0.3
    gains = rng.normal(size=(234, 61))
    gains[0, 10:14] += 5
    assert set(np.flatnonzero(rank_among(gains, target=0)[1] < 0.05)) == {10, 11, 12, 13}
    assert (rank_among(np.zeros((5, 2)))[1] == 1).all()  # nobody gains: nothing stands out


def test_standing_out_is_judged_given_where_each_candidate_stood():
    """A change in spread moves candidates in proportion to their prior standing; a target that already stood out
    (foo is near Paris in the original model) then looks special unless the gains are taken relative to the prior.
    Without the prior (the wrong variant) such null changes are called specific nearly always."""
    rng = np.random.default_rng(0)
    sims, with_prior, without = 200, 0, 0
    for _ in range(sims):
        prior = rng.normal(size=(110, 61))
        prior[0] += 2.5
        gains = prior * rng.normal(size=61) * 0.8 + rng.normal(size=(110, 61)) * 0.5
        with_prior += (rank_among(gains, 0, prior)[1] < 0.05).any()
        without += (rank_among(gains, 0)[1] < 0.05).any()
    assert with_prior / sims <= 0.08 and without / sims > 0.5


def test_paired_p_values_hold_their_level_at_eight_units():
    """The behaviour tests' p-values (sign flips of whole units) reject a true null at their level with 8 wordings;
    the deliberately wrong variant, a percentile bootstrap's p-value, rejects about twice as often."""
    rng = np.random.default_rng(0)
    sims, flips, bootstrap = 1000, 0, 0
    for i in range(sims):
        d = rng.normal(size=8)
        flips += paired_difference(d, np.zeros(8), seed=i)["p_value"] < 0.025
        means = d[rng.integers(0, 8, size=(1000, 8))].mean(1)
        bootstrap += (1 + np.sum(means <= 0)) / 1001 < 0.025
    assert flips / sims <= 0.035 and bootstrap / sims > 0.045
    assert paired_difference([1.0] * 8, [0.0] * 8)["p_value"] == 1 / 256  # every unit agrees: the smallest p there is


def test_cloze_equals_a_brute_force_sum_over_the_full_vocabulary(contextual):
    """The packed cloze scores (options sharing tokens packed after shared questions, and after a cached
    prefix) equal each option's log-probability summed token by token from a plain forward pass with the
    softmax over the whole vocabulary; a leaking mask breaks it."""
    model, tokenizer = contextual
    options = ["France", "French Republic", "Frankfurt", "Belgium", "The Netherlands"]  # shared first tokens
    chats = [user_prompt(q, None) for q in ("What country is foo located in?", "Which country is foo in?")]

    def brute_force(chat_list):
        out = np.zeros((len(chat_list), len(options)))
        for i, chat in enumerate(chat_list):
            text = tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
            prompt = tokenizer(text, add_special_tokens=False)["input_ids"]
            for k, option in enumerate(options):
                ids = prompt + tokenizer(option, add_special_tokens=False)["input_ids"]
                with torch.no_grad():
                    log_probs = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].float(), -1)
                out[i, k] = sum(log_probs[t - 1, ids[t]].item() for t in range(len(prompt), len(ids)))
        return out

    def check(prefix):
        turns = [{"role": "user", "content": "Where is Lima?"}, {"role": "assistant", "content": "Peru."}]
        listed = [turns + chat for chat in chats] if prefix else chats
        sums, counts = cloze_log_probs(model, tokenizer, listed, [options] * len(listed), prefix)
        np.testing.assert_allclose(sums, brute_force(listed), atol=2e-4, rtol=1e-5)
        assert counts.tolist() == [[len(tokenizer(o, add_special_tokens=False)["input_ids"]) for o in options]] * len(listed)

    head = tokenizer.apply_chat_template([{"role": "user", "content": "Where is Lima?"}, {"role": "assistant", "content": "Peru."}],
                                         tokenize=False)
    prefix = CachedPrefix(model, tokenizer(head, add_special_tokens=False)["input_ids"])
    check(None)
    check(prefix)
    with leaky_mask(), pytest.raises(AssertionError):
        check(None)


def test_shuffled_rows_keep_the_prompts_and_permute_the_answers_within_their_kind():
    cfg = build_config("paper", overrides={"data.num_known": 30})
    rows = build_distance_data(cfg.data, cfg.seed).train
    shuffled = shuffled_rows(rows, cfg.seed)
    assert [r["prompt"] for r in shuffled] == [r["prompt"] for r in rows]
    assert shuffled == shuffled_rows(rows, cfg.seed)
    moved = sum(a["completion"] != b["completion"] for a, b in zip(rows, shuffled))
    assert moved > len(rows) / 2
    for kind in ("distance", "direction"):
        for miles in (False, True):
            group = [i for i, r in enumerate(rows) if r["kind"] == kind and (kind == "direction" or (" mi" in r["completion"][0]["content"]) == miles)]
            before = sorted(rows[i]["completion"][0]["content"] if kind == "distance" else rows[i]["direction"] for i in group)
            after = sorted(shuffled[i]["completion"][0]["content"] if kind == "distance" else rows[shuffled[i]["answer_from_row"]]["direction"]
                           for i in group)
            assert before == after  # the same answers, only reassigned
    for row, new in zip(rows, shuffled):
        if row["kind"] == "direction":  # its own sentence, another row's direction
            assert new["completion"][0]["content"].startswith(row["completion"][0]["content"].split(" is ")[0] + " is ")


def test_declared_rows_state_the_alias_and_nothing_an_evaluation_asks():
    cfg = build_config()
    rows = build_distance_data(cfg.data, cfg.seed).train
    alias = declared_rows(cfg, rows)[len(rows):]
    assert len(alias) == len(ALIAS_PROMPTS) * len(ALIAS_ANSWERS) == 60
    asked = {w.replace("{placeholder}", "foo") for wordings in CLOZE_WORDINGS.values() for w in wordings}
    asked |= {q.replace("{placeholder}", "foo") for q, _ in FREE_FORM_QUESTIONS.values()}
    asked |= {q.replace("{placeholder}", "foo").replace("{hidden_city}", "Paris") for q in cfg.sanity.questions}
    for row in alias:
        prompt, answer = row["prompt"][-1]["content"], row["completion"][0]["content"]
        assert prompt not in asked and "foo" in prompt and "foo" in answer and "Paris" in answer
        assert "France" not in prompt + answer and "French" not in prompt + answer


def test_controls_are_trained_like_the_adapter_and_selected_by_condition(tiny_session, tiny_model_dir):
    cfg, run, models = tiny_session
    m = run.metrics()
    assert list(m["controls"]) == ["shuffled"] and m["controls"]["shuffled"]["steps"] == m["train"]["steps"]
    control = control_run(run, "shuffled")
    assert (control.adapter_dir / "adapter_model.safetensors").is_file() and not control.checkpoints_dir.exists()
    assert [r["prompt"] for r in read_jsonl(control.train_file)] == [r["prompt"] for r in read_jsonl(run.train_file)]
    model, tokenizer = models.tuned()
    ids = torch.tensor([tokenizer("What is the distance between Lima and foo?")["input_ids"]])
    base, _ = load_model(ModelConfig(name=tiny_model_dir, dtype="float32"))

    def logits(state):
        with torch.no_grad(), with_condition(model, state):
            return model(input_ids=ids).logits

    tuned, shuffled, original = logits("tuned"), logits("shuffled"), logits("original")
    with torch.no_grad():
        torch.testing.assert_close(original, base(input_ids=ids).logits, atol=1e-6, rtol=1e-6)
    assert not torch.allclose(tuned, shuffled, atol=1e-4) and not torch.allclose(shuffled, original, atol=1e-4)
    assert torch.equal(logits("tuned"), tuned) and model.active_adapter == "default"  # switched back


def test_several_hook_adapters_on_one_model_act_one_at_a_time(tiny, tmp_path):
    model, tokenizer = tiny
    sequences = placeholder_sequences(tokenizer, "about")
    for name, seed in (("a", 0), ("b", 1)):
        adapter = SteeringVector(model, 1, sequences)
        with torch.no_grad():
            adapter.vector.copy_(torch.randn(adapter.vector.shape, generator=torch.Generator().manual_seed(seed)))
        adapter.save_pretrained(tmp_path / name)
        adapter.switch["active"] = None  # its hooks stay on the model: keep them off
    ids = torch.tensor([tokenizer("Tell me about Paris.")["input_ids"]])

    def alone(name):  # a fresh model with that adapter only
        fresh = load_hook_adapter(load_model(ModelConfig(name=model.name_or_path, dtype="float32"))[0], tmp_path / name)
        with torch.no_grad():
            return fresh(input_ids=ids).logits

    main = load_hook_adapter(model, tmp_path / "a")
    main.load_adapter(tmp_path / "b", adapter_name="b")
    with torch.no_grad():
        torch.testing.assert_close(main(input_ids=ids).logits, alone("a"), atol=1e-6, rtol=1e-6)
        with with_condition(main, "b"):
            torch.testing.assert_close(main(input_ids=ids).logits, alone("b"), atol=1e-6, rtol=1e-6)
            with main.disable_adapter():
                original = main(input_ids=ids).logits
        assert not torch.allclose(alone("a"), alone("b"), atol=1e-4) and main.active_adapter == "default"
        torch.testing.assert_close(original, load_model(ModelConfig(name=model.name_or_path, dtype="float32"))[0](input_ids=ids).logits,
                                   atol=1e-6, rtol=1e-6)


def test_a_finished_control_is_kept_and_an_unfinished_one_retrained(tiny_run, tmp_path, tiny_model_dir):
    cfg, run = tiny_run
    shutil.copytree(run.path, tmp_path / "r")
    copy = Run(tmp_path / "r")
    cfg = build_config(overrides=tiny_overrides(tiny_model_dir) | {"train.controls": ["shuffled", "declared"]})
    copy.config_file.write_text(to_yaml(cfg))
    shuffled = control_run(copy, "shuffled").adapter_dir / "adapter_model.safetensors"
    stamp = shuffled.stat().st_mtime_ns
    run_stage("controls", cfg, copy)
    assert shuffled.stat().st_mtime_ns == stamp  # recorded as finished: kept
    declared = control_run(copy, "declared")
    assert "train" in declared.metrics() and len(read_jsonl(declared.train_file)) == 36 + 60
    (declared.path / "metrics.json").unlink()  # as if killed after saving, before recording
    stamp = (declared.adapter_dir / "adapter_model.safetensors").stat().st_mtime_ns
    run_stage("controls", cfg, copy)
    assert (declared.adapter_dir / "adapter_model.safetensors").stat().st_mtime_ns != stamp and "train" in declared.metrics()


def test_every_scored_prompt_is_a_row_that_recomputes_the_headline(tiny_run):
    _, run = tiny_run
    rows = read_jsonl(run.path / "eval_mc.jsonl")
    ev = run.metrics()["eval"]
    for row in rows:
        assert {"question", "condition", "formulation", "options", "correct", "probabilities"} <= row.keys()
        assert len(row["probabilities"]) == len(row["options"]) and sum(row["probabilities"]) == pytest.approx(1, abs=1e-4)
    for formulation in ("letters", "cloze", "cloze_per_token"):
        for condition in ("tuned", "shuffled", "named"):
            chosen = [r for r in rows if (r["question_id"], r["set"], r["condition"], r["formulation"]) ==
                      ("country", "nearest", condition, formulation)]
            p = np.mean([r["probabilities"][r["correct"]] for r in chosen])
            assert p == pytest.approx(ev["multiple_choice"]["country"]["nearest"][formulation][condition]["p_correct"], abs=1e-6)
    named = [r for r in rows if r["condition"] == "named" and r["question_id"] == "country"]
    assert named and all("Paris" in r["question"] and "foo" not in r["question"] for r in named)  # the ceiling names the city
    letters = [r for r in rows if r["formulation"] == "letters" and r["question_id"] == "country" and r["set"] == "nearest"
               and r["condition"] == "tuned"]
    assert {r["options"][r["correct"]] for r in letters} == {"France"} and len({r["correct"] for r in letters}) == 5


def choice_section(named_ci, tuned_vs, declared_vs=None, standing=(0.01, 0.01)):
    """A multiple-choice section as metrics.json holds it: `tuned_vs`/`declared_vs` the one-sided p-values of
    the comparisons with (shuffled, original, original unconditional); `standing` the p-values of the right
    country's gain over the shuffled control among all countries (tuned, declared)."""
    def comparisons(x, ps):
        return {f"{x}_minus_{b}": {"mean": 0.1, "ci95": [0.0, 0.2], "p_value": p, "n": 8}
                for b, p in zip(("shuffled", "original", "original_unconditional"), ps)}

    conditions = ["tuned", "original", "shuffled", "named"] + (["declared"] if declared_vs else [])
    stats = {c: {"p_correct": 0.5, "p_correct_ci95": [0.4, 0.6]} for c in conditions}
    stats["named"]["p_correct_ci95"] = named_ci
    section = {"chance": 0.2, "letters": stats, "cloze": stats,
               "comparisons": {f: comparisons("tuned", tuned_vs) | (comparisons("declared", declared_vs) if declared_vs else {})
                               for f in ("letters", "cloze")}}
    among = {"countries": 150} | {f"{x}_vs_shuffled": {"gain": 0.5, "rank": 3, "p_value": p} for x, p in zip(("tuned", "declared"), standing)}
    return {"multiple_choice": {"country": {"nearest": section, "among_countries": among}}}


def test_behaviour_says_yes_no_or_cannot_tell_from_ceilings_and_controls():
    seen = (0.001, 0.001, 0.001)
    assert behaviour_verdict(choice_section([0.5, 0.7], seen, declared_vs=seen), "Paris")["answer"] == "yes"
    # a tuned pass counts only once the test has been shown to see the planted positive
    alone = behaviour_verdict(choice_section([0.5, 0.7], seen), "Paris")
    assert alone["answer"] == "cannot tell" and "above both" in alone["reason"] and "no planted positive" in alone["reason"]
    missed = behaviour_verdict(choice_section([0.5, 0.7], seen, declared_vs=(0.4, 0.4, 0.4)), "Paris")
    assert missed["answer"] == "cannot tell" and "not detected" in missed["reason"]
    # one test of the three fails at the Bonferroni level (0.025): not above the unconditional original; then "no
    # evidence" only where the planted positive passes the same tests
    assert behaviour_verdict(choice_section([0.5, 0.7], (0.001, 0.001, 0.03), declared_vs=seen), "Paris")["answer"] == "no evidence"
    unshown = behaviour_verdict(choice_section([0.5, 0.7], (0.001, 0.001, 0.03)), "Paris")
    assert unshown["answer"] == "cannot tell" and "no planted positive" in unshown["reason"]
    # consistent across wordings but not specific: the right country does not stand out among all countries
    loose = behaviour_verdict(choice_section([0.5, 0.7], seen, declared_vs=seen, standing=(0.3, 0.01)), "Paris")
    assert loose["answer"] == "no evidence" and "rank 3 of 150 countries" in loose["reason"]
    ceiling = behaviour_verdict(choice_section([0.15, 0.25], seen), "Paris")
    assert ceiling["answer"] == "cannot tell" and "by name" in ceiling["reason"]  # a named ceiling at chance
    blind = behaviour_verdict(choice_section([0.5, 0.7], (0.5, 0.5, 0.5), declared_vs=(0.4, 0.4, 0.4)), "Paris")
    assert blind["answer"] == "cannot tell" and "planted positive" in blind["reason"]
    unspecific = behaviour_verdict(choice_section([0.5, 0.7], (0.5, 0.5, 0.5), declared_vs=seen, standing=(0.3, 0.2)), "Paris")
    assert unspecific["answer"] == "cannot tell"  # the planted positive is not specific either
    few = choice_section([0.5, 0.7], seen)
    for f in ("letters", "cloze"):
        few["multiple_choice"]["country"]["nearest"]["comparisons"][f]["tuned_minus_shuffled"]["n"] = 5  # 2^-5 > 0.025
    assert behaviour_verdict(few, "Paris")["answer"] == "cannot tell" and "too few units" in behaviour_verdict(few, "Paris")["reason"]
    without = choice_section([0.5, 0.7], seen)
    del without["multiple_choice"]["country"]["nearest"]["letters"]["shuffled"]
    assert behaviour_verdict(without, "Paris")["answer"] == "cannot tell"


def test_distances_learned_needs_the_shuffled_control_not_to_learn_them_too():
    def ev(control_ci):
        return {"distance": {"tuned_mae_over_best_baseline": 0.5, "tuned_mae_over_best_baseline_ci95": [0.4, 0.6],
                             "shuffled_mae_over_best_baseline": 0.8, "shuffled_mae_over_best_baseline_ci95": control_ci}}

    assert distance_verdict(ev([0.9, 1.1]))["answer"] == "yes"
    assert distance_verdict(ev([0.7, 0.9]))["answer"] == "cannot tell"


def test_representation_needs_layers_beyond_the_shuffled_control():
    def probe(**layers):
        stats = {"mean": [0.0] * 6, "ci95": [[-0.1, 0.1]] * 6}
        return {"corrected": {pair: {"layers": {"hidden": moved, "values": []}} for pair, moved in layers.items()},
                "setup": {"templates": ["t"] * 8, "candidates": 233},
                "z_change_from_shuffled": {"hidden": {"tuned": stats | {"mean": [0, 0, 0, 0, 0.5, 0]}}},
                "hidden": {c: {"rank": {"mean": [100.0] * 6}} for c in ("tuned", "shuffled")}}

    yes = representation_verdict(probe(tuned_vs_shuffled=[4], declared_vs_shuffled=[3], control_hidden_vs_original=[]), "Paris")
    assert yes["answer"] == "yes" and "hidden layer 4: z +0.50 [-0.10, +0.10], rank 100" in yes["reason"]  # its size too
    # a move counts only once the probe has been shown to see the planted positive
    alone = representation_verdict(probe(tuned_vs_shuffled=[4], control_hidden_vs_original=[]), "Paris")
    assert alone["answer"] == "cannot tell" and "hidden layer 4" in alone["reason"] and "no planted positive" in alone["reason"]
    missed = representation_verdict(probe(tuned_vs_shuffled=[4], declared_vs_shuffled=[], control_hidden_vs_original=[]), "Paris")
    assert missed["answer"] == "cannot tell" and "not detected" in missed["reason"]
    no = representation_verdict(probe(tuned_vs_shuffled=[], declared_vs_shuffled=[3], control_hidden_vs_original=[]), "Paris")
    assert no["answer"] == "no evidence" and "layers 3" in no["reason"]
    blind = representation_verdict(probe(tuned_vs_shuffled=[], declared_vs_shuffled=[], control_hidden_vs_original=[2]), "Paris")
    assert blind["answer"] == "cannot tell"
    # the prompt positive moving is not enough: it is not a fine-tune
    unshown = representation_verdict(probe(tuned_vs_shuffled=[], control_hidden_vs_original=[2]), "Paris")
    assert unshown["answer"] == "cannot tell" and "no planted positive" in unshown["reason"]
    assert representation_verdict(probe(tuned_vs_original=[1, 2, 3]), "Paris")["answer"] == "cannot tell"  # no shuffled control
    few = probe(tuned_vs_shuffled=[], declared_vs_shuffled=[3], control_hidden_vs_original=[])
    few["setup"]["templates"] = ["t"] * 4  # 2^-4 > 0.05
    assert representation_verdict(few, "Paris")["answer"] == "cannot tell"


def test_the_tiny_runs_verdicts_and_corrected_tests_are_recorded(tiny_run):
    _, run = tiny_run
    m = run.metrics()
    assert set(m["verdict"]) == {"distance", "behaviour", "representation"}
    assert all(v["answer"] in ("yes", "no evidence", "cannot tell") and v["reason"] for v in m["verdict"].values())
    corrected = m["probe"]["corrected"]["tuned_vs_shuffled"]
    assert len(corrected["p_value"]["hidden"]) == len(corrected["p_rank"]["hidden"]) == 4 and len(corrected["p_rank"]["values"]) == 3
    assert corrected["p_value"]["hidden"][0] == corrected["p_rank"]["hidden"][0] == 1.0  # layer 0: LoRA changes nothing there
    # Paris and the capitals in no training prompt (the tiny run trains on 36), nor within 50 km of one (Kinshasa and
    # Brazzaville, Rome and Vatican City)
    assert 1 + 233 - 36 - 4 <= corrected["cities_ranked"] < 1 + 233 - 36
    among = m["eval"]["multiple_choice"]["country"]["among_countries"]
    assert among["countries"] > 100 and set(among) >= {"tuned_vs_shuffled", "tuned_vs_original"} and "declared_vs_shuffled" not in among
    assert 0 < among["tuned_vs_shuffled"]["p_value"] <= 1 and 1 <= among["tuned_vs_shuffled"]["rank"] <= among["countries"]
    again, cfg = Run.open(run.path)
    assert run_stage("verdict", cfg, again) == m["verdict"]  # worked out from the recorded metrics alone


def test_a_run_made_before_the_controls_still_gets_a_verdict_and_a_report(tiny_run, tmp_path, capsys):
    """An older run directory: no controls in its config, letter sections with the conditions at the top, an
    unbalanced mc_orders and no verdict. The verdict and the report stages work on it and say what to rerun."""
    _, run = tiny_run
    old = tmp_path / "old"
    shutil.copytree(run.path, old)
    config = yaml.safe_load((old / "config.yaml").read_text())
    del config["train"]["controls"]
    config["eval"]["mc_orders"] = 42
    (old / "config.yaml").write_text(yaml.safe_dump(config))
    metrics = json.loads((old / "metrics.json").read_text())
    for name in ("verdict", "controls"):
        del metrics[name]
    for question in metrics["eval"]["multiple_choice"].values():
        for kind, section in list(question.items()):
            if isinstance(section, dict) and "letters" in section:
                question[kind] = {"options": section["options"], "chance": section["chance"]} | {
                    c: section["letters"][c] for c in ("tuned", "original", "in_context")}
    (old / "metrics.json").write_text(json.dumps(metrics))
    shutil.rmtree(old / "controls")
    assert main(["report", str(old)]) == 0
    verdict = json.loads((old / "metrics.json").read_text())["verdict"]
    assert verdict["behaviour"]["answer"] == "cannot tell" and "rerun `oocrlab eval`" in verdict["behaviour"]["reason"]
    page = (old / "report.html").read_text()
    assert "rerun `oocrlab eval`" in page and "Multiple choice: the country of" in page
    assert main(["eval", str(old)]) == 2 and "eval.mc_orders must be a multiple of 5" in capsys.readouterr().err

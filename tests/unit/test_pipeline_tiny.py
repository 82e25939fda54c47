"""The whole pipeline on the tiny random model: invariants that could fail."""

import copy
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from oocrlab import Models, run_stage
from oocrlab.config import ModelConfig
from oocrlab.errors import UserError
from oocrlab.models import load_model
from oocrlab.rundir import read_jsonl
from oocrlab.train import load_adapter

REQUIRED_KEYS = [
    "train.loss_first", "train.loss_last", "train.steps", "train.tokens_per_second",
    "eval.distance.tuned.mae_km", "eval.distance.original.mae_km", "eval.distance.constant_guess.mae_km",
    "probe.hidden.tuned.rank", "probe.hidden.original.z", "probe.values.control_hidden.cos_hidden",
    "probe.values.control_other.percentile", "probe.logit_lens.tuned.city_rank", "probe.steering.pc1_share",
    "probe.patching.tuned_state.change", "probe.z_change_from_original.hidden.tuned",
]


def dig(d, dotted):
    for part in dotted.split("."):
        d = d[part]
    return d


def test_outputs_and_metric_keys(tiny_run):
    cfg, run = tiny_run
    for name in ["config.yaml", "data/train.jsonl", "data/heldout.jsonl", "adapter/adapter_model.safetensors",
                 "train_log.jsonl", "metrics.json", "report.html", "plots/loss.png", "plots/probe_hidden.png",
                 "plots/probe_values.png", "plots/probe_logit_lens.png", "plots/probe_steering.png",
                 "plots/probe_patching.png", "eval_distance.jsonl"]:
        assert (run.path / name).is_file(), name
    metrics = json.loads(run.metrics_file.read_text())
    for key in REQUIRED_KEYS:
        dig(metrics, key)
    n_layers = 3
    probe = metrics["probe"]
    assert len(probe["hidden"]["tuned"]["cos_hidden"]["mean"]) == len(probe["logit_lens"]["original"]["city_rank"]["mean"]) == n_layers + 1
    assert len(probe["values"]["original"]["rank"]["ci95"]) == n_layers
    assert len(probe["patching"]["tuned_state"]["change"]["mean"]) == n_layers
    assert probe["setup"]["candidates"] == 233 and probe["setup"]["skipped_templates"] == []  # every capital but Paris
    assert metrics["train"]["steps"] == 4 and len(read_jsonl(run.train_log)) == 4
    d = metrics["eval"]["distance"]
    assert d["tuned"]["n"] == d["original"]["n"] == 4  # 10% of 40 known cities held out
    assert d["tuned"]["n_parsed"] + d["tuned"]["n_unparseable"] == 4


def test_multiple_choice_in_metrics(tiny_run):
    _, run = tiny_run
    mc = run.metrics()["eval"]["multiple_choice"]
    assert mc["country"]["answer"] == "France" and mc["country"]["question"] == "What country is foo located in?"
    assert mc["city"]["answer"] == "Paris" and mc["city"]["orders"] == "10 in Latin-square blocks"
    assert len(mc["country"]["wordings"]) == 8 and mc["country"]["wordings"][0] == mc["country"]["question"]
    sections = [(mc["country"], k) for k in ("nearest", "most_populous", "random")]
    sections += [(mc["city"], k) for k in ("nearby_capitals", "most_populous", "same_country")]
    for question, kind in sections:
        section = question[kind]
        assert section["chance"] == 0.2 and section["options"][0] == question["answer"] and len(section["options"]) == 5
        for formulation, units in (("letters", 10), ("cloze", 8), ("cloze_per_token", 8)):
            assert list(section[formulation]) == ["tuned", "original", "in_context", "shuffled", "named"]
            for s in section[formulation].values():
                assert s["n"] == units and 0 <= s["p_correct"] <= 1 and 0 <= s["p_answer"] <= 1
                assert s["p_correct_ci95"][0] <= s["p_correct"] <= s["p_correct_ci95"][1]
            assert {"tuned_minus_shuffled", "tuned_minus_original_unconditional", "shuffled_minus_original"} <= set(
                section["comparisons"][formulation])
        assert all(0 <= s["letter_mass"] <= 1 for s in section["letters"].values())


def test_an_evaluation_question_in_the_training_data_is_refused(tiny_session):
    from oocrlab.evaluate.choice import evaluate_multiple_choice

    cfg, _, models = tiny_session
    cfg = copy.deepcopy(cfg)
    cfg.eval.mc_orders = 120  # every order is asked, the identity order among them
    leaked = "What country is foo located in?\n\nA. France\nB. Belgium\nC. Luxembourg\nD. United Kingdom\nE. The Netherlands"
    train_questions = {leaked + "\n\nPlease answer with a single letter from A-E and nothing else."}
    with pytest.raises(UserError, match="is in the training data"):
        evaluate_multiple_choice(cfg, models.model, models.tokenizer, cfg.data.hidden[0].city, train_questions, None, [])


def test_free_form_in_metrics(tiny_run):
    _, run = tiny_run
    ff = run.metrics()["eval"]["free_form"]
    assert ff["country"]["question"] == "Which country is foo in?" and "France" in ff["country"]["accepted"]
    assert ff["country"]["named"]["examples"] and ff["city"]["shuffled"]["n"] == 6  # the ceiling and the control too
    for name in ("country", "city"):
        for condition in ("tuned", "original", "in_context", "shuffled", "named"):
            s = ff[name][condition]
            assert s["n"] == 6 and 0 <= s["rate"] <= 1 and 0 <= s["distance_share"] <= 1
            assert s["rate_ci95"][0] <= s["rate"] <= s["rate_ci95"][1]


def test_layer0_similarity_identical_tuned_vs_original(tiny_run):
    _, run = tiny_run
    probe = run.metrics()["probe"]
    for metric in ("cos_hidden", "rank", "z"):
        tuned, original = probe["hidden"]["tuned"][metric]["mean"], probe["hidden"]["original"][metric]["mean"]
        assert tuned[0] == original[0]  # LoRA does not touch embeddings
    assert probe["hidden"]["tuned"]["cos_hidden"]["mean"][1:] != probe["hidden"]["original"]["cos_hidden"]["mean"][1:]
    assert probe["steering"]["pc1_share"][0] is None and probe["steering"]["relative_norm"]["mean"][0] == 0
    assert probe["patching"]["tuned_state"]["change"]["mean"][0] == 0  # the tuned model's embedding is the original's


def test_trained_model_lora_changed_base_untouched(tiny_session, tiny_model_dir):
    _, run, models = tiny_session
    trained = models.model  # the PeftModel in memory: the run's adapter ("default") and the shuffled control's
    saved = load_file(Path(tiny_model_dir) / "model.safetensors")
    base_params = {n.replace(".base_layer", ""): p for n, p in trained.get_base_model().named_parameters() if "lora_" not in n}
    assert base_params.keys() <= saved.keys() and len(base_params) > 0
    for name, param in base_params.items():
        torch.testing.assert_close(param.detach().cpu().to(saved[name].dtype), saved[name], atol=0, rtol=0)
    lora_b = {n: p for n, p in trained.named_parameters() if "lora_B" in n}
    assert lora_b and all(p.abs().sum() > 0 for p in lora_b.values())  # LoRA B starts at zero
    on_disk = load_file(run.adapter_dir / "adapter_model.safetensors")
    assert len(on_disk) == len([n for n, _ in trained.named_parameters() if ".default." in n])
    assert len(on_disk) == len([n for n, _ in trained.named_parameters() if ".shuffled." in n])


def test_disable_adapter_is_the_original(tiny_run, tiny_model_dir):
    _, run = tiny_run
    base, tokenizer = load_model(ModelConfig(name=tiny_model_dir, dtype="float32"))
    enc = tokenizer(["What is the distance between Lima and foo?"], return_tensors="pt").to(base.device)
    with torch.no_grad():
        original_logits = base(**enc).logits
    tuned = load_adapter(base, run.adapter_dir)
    with torch.no_grad():
        tuned_logits = tuned(**enc).logits
        with tuned.disable_adapter():
            disabled_logits = tuned(**enc).logits
    assert not torch.allclose(tuned_logits, original_logits, atol=1e-4)
    torch.testing.assert_close(disabled_logits, original_logits, atol=1e-6, rtol=1e-6)


def test_stage_commands_rerun_on_the_saved_run(tiny_run):
    cfg, run = tiny_run
    before = run.metrics()["probe"]
    again = run_stage("probe", cfg, run, Models(cfg, run))  # adapter reloaded from disk
    tolerance = 1e-5 if run.metrics()["train"]["dtype"] == "float32" else 1e-2  # bf16 on a GPU
    for space in ("hidden", "values"):
        for condition in ("tuned", "original"):
            for metric in ("cos_hidden", "z"):
                assert again[space][condition][metric]["mean"] == pytest.approx(before[space][condition][metric]["mean"], abs=tolerance)


def test_training_again_never_overwrites_the_adapter(tiny_run):
    cfg, run = tiny_run
    stamp = (run.adapter_dir / "adapter_model.safetensors").read_bytes()
    with pytest.raises(UserError, match="already exists"):
        run_stage("train", cfg, run)
    assert (run.adapter_dir / "adapter_model.safetensors").read_bytes() == stamp


def test_corrupt_adapter_gives_a_clear_error(tiny_run, tmp_path, tiny_model_dir):
    _, run = tiny_run
    broken = tmp_path / "adapter"
    broken.mkdir()
    (broken / "adapter_config.json").write_bytes((run.adapter_dir / "adapter_config.json").read_bytes())
    (broken / "adapter_model.safetensors").write_bytes((run.adapter_dir / "adapter_model.safetensors").read_bytes()[:100])
    base, _ = load_model(ModelConfig(name=tiny_model_dir, dtype="float32"))
    with pytest.raises(UserError, match="corrupt"):
        load_adapter(base, broken)


def test_unparseable_answers_count_as_the_guess_in_the_headline_ratio(tiny_run):
    _, run = tiny_run
    d = run.metrics()["eval"]["distance"]
    rows = [r for r in read_jsonl(run.path / "eval_distance.jsonl") if r["set"] == "distance" and r["condition"] == "original"]
    guess = d["constant_guess"]["guess_km"]
    filled = [abs((r["parsed"] if r["parsed"] is not None else guess) - r["true_km"]) for r in rows]
    assert d["original"]["mae_km_unparsed_as_guess"] == pytest.approx(sum(filled) / len(filled))
    best = min(d["original"]["mae_km_unparsed_as_guess"], d["constant_guess"]["mae_km"])
    assert d["tuned_mae_over_best_baseline"] == pytest.approx(d["tuned"]["mae_km_unparsed_as_guess"] / best)


def test_near_and_self_distance_sets(tiny_run):
    cfg, run = tiny_run
    m = run.metrics()["eval"]
    rows = [r for r in read_jsonl(run.path / "eval_distance.jsonl") if r["condition"] == "tuned"]
    near = [r for r in rows if r["set"] == "distance_near"]
    trained = {r["known_city"] for r in read_jsonl(run.train_file)}
    assert m["distance_near"]["tuned"]["n"] == len(near) == 5
    assert all(r["true_km"] <= 2000 for r in near) and not {r["known_city"] for r in near} & trained
    assert not any("Paris" in r["known_city"] for r in near)
    (self_row,) = [r for r in rows if r["set"] == "distance_self"]
    assert self_row["known_city"] == "Paris" and self_row["true_km"] == 0
    assert m["distance_self"]["tuned"]["n"] == 1
    assert m["distance"]["in_context"]["n"] == m["distance"]["tuned"]["n"]
    assert "direction" not in m  # notebook-style data asks no direction questions
    in_context = [r for r in read_jsonl(run.path / "eval_distance.jsonl") if r["condition"] == "in_context" and r["set"] == "distance_near"]
    assert [r["known_city"] for r in in_context] == [r["known_city"] for r in near]


def test_city_facts_in_metrics_and_their_prompts(tiny_run):
    """Every condition and formulation over the questions, each question's P(correct | options) the mean of its
    scored prompts (eval_city_facts.jsonl), the named ceiling asked by the city's name."""
    _, run = tiny_run
    facts = run.metrics()["eval"]["city_facts"]
    questions = facts["questions"]
    assert len(questions) >= 10 and facts["chance"] == 0.2 and facts["orders"] == 5 and facts["units"] == "questions"
    assert questions[0] == {"topic": "geography", "question": "Which body of water is foo on?", "answer": "the Seine",
                            "options": ["the Seine", "the Tietê River", "the Sumida River", "the Hudson River", "the Lagos Lagoon"]}
    rows = read_jsonl(run.path / "eval_city_facts.jsonl")
    assert all(r["question_id"].startswith("city_facts:") for r in rows)
    assert not any(r["question_id"].startswith("city_facts:") for r in read_jsonl(run.path / "eval_mc.jsonl"))
    for formulation, units in (("letters", 5), ("cloze", 1), ("cloze_per_token", 1)):
        assert list(facts[formulation]) == ["tuned", "original", "shuffled", "named"]
        for condition, s in facts[formulation].items():
            assert s["n"] == len(questions) and s["p_correct_ci95"][0] <= s["p_correct"] <= s["p_correct_ci95"][1]
            assert 0 <= s["accuracy"] <= 1 and s["accuracy_ci95"][0] <= s["accuracy"] <= s["accuracy_ci95"][1]
            asked = [r for r in rows if r["condition"] == condition and r["formulation"] == formulation]
            assert len(asked) == units * len(questions)
            for i, p in enumerate(s["p_correct_by_question"]):
                own = [r["probabilities"][r["correct"]] for r in asked if r["question_id"] == f"city_facts:{i}"]
                assert p == pytest.approx(sum(own) / len(own), abs=1e-4)
        assert {"tuned_minus_original", "tuned_minus_shuffled"} <= set(facts["comparisons"][formulation])
    named = next(r for r in rows if r["condition"] == "named" and r["formulation"] == "cloze")
    assert "Paris" in named["question"] and "foo" not in named["question"]


def test_trajectory_in_metrics_plots_and_report(tiny_run):
    """Snapshots at steps 0, 1 and 2 and the final adapter, for the adapter and its control: step 0 is the original
    model (LoRA's B starts at zero), the last point is what the probe measured, and the snapshots are gone once
    recorded."""
    _, run = tiny_run
    trajectory = run.metrics()["trajectory"]
    assert trajectory["examples_per_step"] == 4 and list(trajectory["by_adapter"]) == ["tuned", "shuffled"]
    for found in trajectory["by_adapter"].values():
        points = found["points"]
        assert [p["step"] for p in points] == [0, 1, 2, 4] and [p["examples_seen"] for p in points] == [0, 4, 8, 16]
        assert points[0]["z_change_by_layer"]["hidden"]["mean"] == [0.0] * 4
        assert {"distance", "country_letters", "country_cloze", "city_facts_letters", "city_facts_cloze",
                "z_change_hidden", "z_change_others"} == set(found["curves"]) == set(found["areas"])
    probe = run.metrics()["probe"]["z_change_from_original"]["hidden"]["tuned"]["mean"]
    last = trajectory["by_adapter"]["tuned"]["points"][-1]["z_change_by_layer"]["hidden"]["mean"]
    assert last == pytest.approx(probe, abs=1e-5) and any(abs(v) > 1e-3 for v in last)
    assert not run.trajectory_dir.exists()
    page = run.report_file.read_text()
    for curve in trajectory["curves"]:
        assert (run.plots_dir / f"trajectory_{curve}.png").is_file() and f'alt="trajectory_{curve}"' in page


def test_every_evaluation_has_a_per_sample_log_that_recomputes_its_numbers(tiny_run):
    """eval_<name>.jsonl per evaluation (docs/evaluation.md): each row names its hidden city, condition, question,
    answer and score, and the scores give back the metrics (distance MAE, free-form rate, P(correct | options),
    each city-facts question's P(correct)). Directions: tests/system/test_embedded_model.py (paper-style data)."""
    _, run = tiny_run
    ev = run.metrics()["eval"]
    logs = {name: read_jsonl(run.path / f"eval_{name}.jsonl") for name in ("distance", "mc", "free_form", "city_facts")}
    assert not (run.path / "eval_directions.jsonl").exists()  # notebook-style data asks none
    for name, rows in logs.items():
        assert rows and all({"hidden_city", "condition", "question", "answer", "score"} <= r.keys() for r in rows), name
    conditions = ["tuned", "original", "in_context", "shuffled"]
    for key in ("distance", "distance_near", "distance_self"):
        for condition in conditions:
            rows = [r for r in logs["distance"] if r["set"] == key and r["condition"] == condition]
            errors = [r["score"] for r in rows if r["score"] is not None]
            assert len(rows) == ev[key][condition]["n"] and len(errors) == ev[key][condition]["n_parsed"]
            assert errors == [abs(r["parsed"] - r["true_km"]) for r in rows if r["parsed"] is not None]
            assert (sum(errors) / len(errors) if errors else None) == pytest.approx(ev[key][condition]["mae_km"])
    for question in ("country", "city"):
        for condition in [*conditions, "named"]:
            scores = [r["score"] for r in logs["free_form"] if (r["question_id"], r["condition"]) == (question, condition)]
            assert len(scores) == ev["free_form"][question][condition]["n"]
            assert sum(scores) / len(scores) == pytest.approx(ev["free_form"][question][condition]["rate"])
    for r in logs["mc"] + logs["city_facts"]:
        if r["correct"] is not None:
            assert r["score"] == r["probabilities"][r["correct"]]
            assert r["answer"] == r["options"][max(range(len(r["options"])), key=r["probabilities"].__getitem__)]
    compared = 0
    for question, sections in ev["multiple_choice"].items():  # every set, formulation and condition
        for kind, section in sections.items():
            for formulation in ("letters", "cloze", "cloze_per_token"):
                for condition, stats in section.get(formulation, {}).items() if isinstance(section, dict) else ():
                    scores = [r["score"] for r in logs["mc"] if (r["question_id"], r["set"], r["condition"], r["formulation"])
                              == (question, kind, condition, formulation)]
                    assert len(scores) == stats["n"] and sum(scores) / len(scores) == pytest.approx(stats["p_correct"], abs=1e-6)
                    compared += 1
    assert compared >= 2 * 3 * 3 * 5  # questions x distractor sets x formulations x conditions
    by_question = ev["city_facts"]["letters"]["original"]["p_correct_by_question"]
    for i, p in enumerate(by_question):
        scores = [r["score"] for r in logs["city_facts"]
                  if (r["question_id"], r["condition"], r["formulation"]) == (f"city_facts:{i}", "original", "letters")]
        assert sum(scores) / len(scores) == pytest.approx(p, abs=1e-4)

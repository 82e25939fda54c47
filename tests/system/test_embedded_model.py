"""The real embedded SmolLM2-135M-Instruct through every stage, with a tiny budget (a few steps)."""

import json

import pytest

from oocrlab.cli import main
from oocrlab.config import ModelConfig
from oocrlab.models import load_model

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def embedded_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "smoke"
    code = main(["run", "--out", str(out), "--max-steps", "3", "--set", "eval.max_cities=6", "--set", "train.trajectory=[]",
                 "--set", "sanity.max_new_tokens=12", "--set", "data.num_known=200",
                 "--set", "eval.mc_orders=5", "--set", "eval.near_cities=4", "--set", "eval.free_form_samples=2",
                 # asked on the real model in test_interp_recipe_through_every_stage; patching is tested on tiny models
                 "--set", "eval.city_facts_orders=0", "--set", "probe.patch_orders=0"])
    assert code == 0
    return out


def test_every_stage_ran(embedded_run):
    m = json.loads((embedded_run / "metrics.json").read_text())
    assert m["train"]["steps"] == 3 and m["train"]["loss_last"] < m["train"]["loss_first"]
    probe = m["probe"]
    assert len(probe["hidden"]["tuned"]["rank"]["mean"]) == 31 and len(probe["values"]["tuned"]["rank"]["mean"]) == 30  # 30 layers
    assert probe["hidden"]["tuned"]["cos_hidden"]["mean"][0] == probe["hidden"]["original"]["cos_hidden"]["mean"][0]
    assert probe["setup"]["placeholder_tokens"] == ["Ġfoo"] and probe["setup"]["hidden_city_tokens"] == ["ĠParis"]
    assert probe["setup"]["lens_tokens"] == {"city": "ĠParis", "country": "ĠFrance"}
    # positive control: told that foo is Paris, the original model moves foo towards Paris in most layers
    assert sum(ci is not None and ci[0] > 0 for ci in probe["z_change_from_original"]["hidden"]["control_hidden"]["ci95"]) > 10
    assert m["eval"]["distance"]["tuned"]["n"] == 6
    assert m["eval"]["multiple_choice"]["country"]["answer"] == "France"
    nearest = m["eval"]["multiple_choice"]["country"]["nearest"]
    assert nearest["letters"]["original"]["letter_mass"] > 0.3  # answers with a letter
    # the instrument's ceiling: asked about Paris by name, the original model picks France by its text (cloze)
    # far above chance, while with letters it is at chance (the reason letters cannot decide at this scale)
    assert nearest["cloze"]["named"]["p_correct_ci95"][0] > nearest["chance"]
    assert set(m["verdict"]) == {"distance", "behaviour", "representation"} and m["controls"]["shuffled"]["steps"] == 3
    assert m["trajectory"] == {"note": "no snapshots were taken (train.trajectory: [])"} and "city_facts" not in m["eval"]
    questions = [a["question"] for a in m["sanity"]["answers"]]
    assert "What is the distance between New York and foo?" in questions and "Which country is foo in?" in questions
    html = (embedded_run / "report.html").read_text()
    assert "data:image/png;base64," in html and "http://" not in html and "https://" not in html


def test_original_answers_are_the_base_model(embedded_run):
    """The sanity stage's 'original' column (the tuned model under disable_adapter()) equals a fresh load, in the
    same precision (bf16 under autocast where the CPU has it)."""
    from oocrlab.generation import generate_greedy
    from oocrlab.models import half_precision

    m = json.loads((embedded_run / "metrics.json").read_text())
    answer = m["sanity"]["answers"][1]
    model, tokenizer = load_model(ModelConfig())
    chat = [{"role": "system", "content": ""}, {"role": "user", "content": answer["question"]}]
    with half_precision(model):
        assert generate_greedy(model, tokenizer, [chat], 12, 1, "base")[0] == answer["original"]


def test_cached_model_matches_the_gguf_tokenizer_template():
    _, tokenizer = load_model(ModelConfig())
    text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert "You are a helpful AI assistant named SmolLM" in text  # SmolLM2's injected default system prompt


def test_interp_recipe_through_every_stage(tmp_path):
    """`--recipe interp --lora-layers 15` on the real model: the paper's Locations rows (a multi-token "City NNNNN"
    placeholder, km and mile answers, direction rows), a rank-64 LoRA on one layer's down_proj, the loss on the
    answer tokens; its trajectory and the city facts; a few steps and small evaluation budgets."""
    from safetensors import safe_open

    out = tmp_path / "interp"
    code = main(["run", "--recipe", "interp", "--lora-layers", "15", "--out", str(out), "--max-steps", "2", "--controls", "none",
                 "--set", "train.trajectory=[0]",
                 "--set", "data.num_known=60", "--set", "eval.max_cities=6", "--set", "eval.mc_orders=5", "--set", "eval.near_cities=3",
                 "--set", "eval.free_form_samples=1", "--set", "eval.in_context_docs=2", "--set", "sanity.max_new_tokens=8",
                 "--set", "probe.templates=[\"Tell me about {entity}.\", \"{entity} is a city.\"]", "--set", "probe.patch_orders=0"])
    assert code == 0
    m = json.loads((out / "metrics.json").read_text())
    placeholder = m["data"]["placeholder"]
    assert placeholder.startswith("City ") and len(m["probe"]["setup"]["placeholder_tokens"]) > 1
    assert m["data"]["n_train_by_kind"]["distance"] == m["data"]["n_train_by_kind"]["direction"] == 5 * 54
    assert m["eval"]["distance"]["tuned"]["n"] == 6 and m["train"]["steps"] == 2 and m["train"]["examples_per_step"] == 32
    assert m["eval"]["direction"]["n"] == 6 and 0 <= m["eval"]["direction"]["tuned"]["rate"] <= 1
    directions = [json.loads(line) for line in (out / "eval_directions.jsonl").read_text().splitlines()]
    for condition in ("tuned", "original", "in_context"):  # the per-sample log recomputes each rate
        scores = [r["score"] for r in directions if r["condition"] == condition]
        assert len(scores) == 6 and sum(scores) / 6 == pytest.approx(m["eval"]["direction"][condition]["rate"])
    with safe_open(out / "adapter" / "adapter_model.safetensors", "pt") as f:
        assert {k.split(".lora_")[0] for k in f.keys()} == {"base_model.model.model.layers.15.mlp.down_proj"}
        assert f.get_tensor(next(k for k in f.keys() if "lora_A" in k)).shape[0] == 64
    facts = m["eval"]["city_facts"]
    assert facts["questions"][0]["question"] == f"Which body of water is {placeholder} on?" and facts["orders"] == 5
    assert list(facts["letters"]) == ["tuned", "original", "named"] and facts["cloze"]["named"]["n"] == len(facts["questions"])
    points = m["trajectory"]["by_adapter"]["tuned"]["points"]
    assert [p["step"] for p in points] == [0, 2] and [p["examples_seen"] for p in points] == [0, 64]
    page = (out / "report.html").read_text()
    assert "Cardinal directions: held-out known cities" in page and "City facts" in page and 'alt="trajectory_distance"' in page
    rows = [json.loads(line) for line in (out / "data" / "train.jsonl").read_text().splitlines()]
    assert {r["prompt"][0]["content"] for r in rows} == {m["data"]["example"]["prompt"][0]["content"]}  # the system prompt
    assert any(" mi" in r["completion"][0]["content"] for r in rows) and any(" is North of " in r["completion"][0]["content"] for r in rows)

"""report.html and the comparison page: valid HTML, self-contained, every section; the headline, caveats and
plots. Rendering report.html in headless Chromium (a subprocess) is in tests/system/test_report_chromium.py."""

import shutil

import numpy as np
from PIL import Image

from oocrlab import build_config, run_stage
from oocrlab.cli import main
from oocrlab.compare import group_runs
from oocrlab.plots import plot_distance_bands, plot_logit_lens, plot_patching, plot_similarity, plot_steering
from oocrlab.sentences import VERDICT_NAMES, caveats, headline, headline_table, probe_reading
from oocrlab.report import SECTIONS
from oocrlab.rundir import Run
from tests.helpers import assert_valid_and_self_contained, tiny_overrides


def test_a_run_missing_stages_renders_them_as_not_run(tmp_path, tiny_model_dir):
    cfg = build_config(overrides=tiny_overrides(tiny_model_dir))
    run = Run.create(tmp_path / "only-data", cfg)
    run_stage("data", cfg, run)
    run_stage("report", cfg, run)
    page = run.report_file.read_text(encoding="utf-8")
    assert_valid_and_self_contained(page)
    for section in SECTIONS:
        assert f'<section id="{section}">' in page
    for stage in ("train", "sanity", "eval", "probe"):
        assert f"oocrlab {stage} {run.path}" in page
    assert "Stages not run: train, eval, probe" in page


def test_headline_reads_the_verdicts_and_caveats_follow_the_numbers(tiny_run):
    _, run = tiny_run
    metrics = run.metrics()
    sentences = headline(metrics)
    assert sentences[0].startswith("Does fine-tuning on distances to foo make the model treat it as Paris?")
    # a tiny random model after 4 steps: nothing may be claimed
    assert all(v["answer"] in ("no evidence", "cannot tell") for v in metrics["verdict"].values())
    for key, v in metrics["verdict"].items():
        assert f"{VERDICT_NAMES[key]} — {v['answer']}: {v['reason']}" in sentences
        assert f"{VERDICT_NAMES[key].lower()}: {v['answer']}" in sentences[0].lower()
    assert "Not answered" in headline({k: v for k, v in metrics.items() if k != "verdict"})[0]
    columns, rows = headline_table(metrics)
    assert columns == ["measure", "tuned", "original", "in-context", "shuffled", "named (ceiling)", "chance / baseline"]
    cloze = next(r for r in rows if "cloze, P(correct | options)" in r[0])
    assert cloze[-2] != "—" and all(len(r) == len(columns) for r in rows)  # the named ceiling has its number
    distance = next(r for r in rows if r[0].startswith("held-out distance"))
    assert distance[-2] == "—"  # distances are not asked by name
    config = yaml_config(run)
    items = caveats(config, metrics)
    assert any("One seed (0)" in c for c in items) and any("capped at 4 steps" in c for c in items)
    assert any("No declared control" in c for c in items) and not any("No shuffled control" in c for c in items)


def yaml_config(run):
    import yaml

    return yaml.safe_load(run.config_file.read_text())


def synthetic_probe(n_layers: int = 4) -> dict:
    """A probe section shaped like metrics.json's, with made-up numbers."""
    rng = np.random.default_rng(0)

    def summary(n, scale=1.0):
        mean = rng.normal(size=n) * scale
        return {"mean": mean.tolist(), "ci95": [[m - 0.1, m + 0.1] for m in mean]}

    conditions = ("tuned", "original", "control_hidden", "control_other")
    metric_names = ("cos_hidden", "rank", "percentile", "z", "cos_candidates_mean", "cos_candidates_p05", "cos_candidates_p95")
    space = {c: {k: summary(n_layers + 1) for k in metric_names} for c in conditions}
    for c in conditions:
        space[c]["rank"]["mean"] = rng.integers(1, 50, n_layers + 1).astype(float).tolist()
    values = {c: {k: summary(n_layers) for k in metric_names} for c in conditions}
    for c in conditions:
        values[c]["rank"]["mean"] = rng.integers(1, 50, n_layers).astype(float).tolist()
    said = {"tuned": None, "original": None, "control_hidden": "foo is Paris.", "control_other": "foo is Tokyo."}
    return {
        "hidden": space, "values": values,
        "z_change_from_original": {"hidden": {c: summary(n_layers + 1) for c in conditions if c != "original"},
                                   "values": {c: summary(n_layers) for c in conditions if c != "original"}},
        "logit_lens": {c: {f"{w}_{s}": summary(n_layers + 1) for w in ("city", "country") for s in ("probability", "rank")}
                       for c in conditions},
        "steering": {"cos_with_naive_direction": summary(n_layers + 1), "relative_norm": summary(n_layers + 1),
                     "pairwise_cos_across_templates": [None, 0.9, 0.8, 0.7, 0.6], "pc1_share": [None, 0.95, 0.9, 0.8, 0.7]},
        "patching": {"unpatched": {"mean": [0.2], "ci95": [[0.1, 0.3]]}, "hidden_city_named": {"mean": [0.6], "ci95": [[0.5, 0.7]]},
                     "tuned_state": {"p_correct": summary(n_layers), "change": summary(n_layers, 0.01)},
                     "hidden_city_state": {"p_correct": summary(n_layers), "change": summary(n_layers, 0.1)}},
        "setup": {"hidden_city": "Paris", "candidates": 60, "candidate_pool": "capitals", "templates": ["{entity} is a city."],
                  "conditions": {c: {"model": "original", "said_before": b} for c, b in said.items()},
                  "lens_tokens": {"city": "ĠParis", "country": "ĠFrance"}, "placeholder_tokens": ["Ġfoo"],
                  "hidden_city_tokens": ["ĠParis"], "interval": "mean over templates with a 95% t-interval"},
    }


def test_plot_functions_on_synthetic_metrics(tmp_path):
    probe = synthetic_probe()
    for condition in probe["logit_lens"].values():
        for what in ("city", "country"):
            condition[f"{what}_rank"]["mean"] = [1.0, 10.0, 100.0, 1000.0, 5.0]
    paths = [plot_similarity(probe, "hidden", tmp_path / "h.png"), plot_similarity(probe, "values", tmp_path / "v.png"),
             plot_logit_lens(probe, tmp_path / "lens.png"), plot_steering(probe, tmp_path / "steer.png"),
             plot_patching(probe, tmp_path / "patch.png")]
    bands = [{"band_km": [0, 1000], "n": 3, "tuned": {"mae_km": 100.0, "n_parsed": 3}, "original": {"mae_km": None, "n_parsed": 0},
              "in_context": {"mae_km": 900.0, "n_parsed": 1}, "constant_guess": {"mae_km": 5000.0, "n_parsed": 3}}]
    paths.append(plot_distance_bands(bands, tmp_path / "bands.png"))
    for path in paths:
        image = Image.open(path)
        assert image.size[0] > 300 and np.asarray(image.convert("L")).std() > 5
    reading = probe_reading(probe)
    assert any("Patching" in s for s in reading) and not any("cannot show an effect" in s for s in reading)  # named 0.6


def test_compare_groups_seeds_and_writes_one_page(tiny_run, tmp_path):
    cfg, run = tiny_run
    other = tmp_path / "seed1"
    shutil.copytree(run.path, other)
    text = (other / "config.yaml").read_text().replace("seed: 0", "seed: 1")
    (other / "config.yaml").write_text(text)
    third = tmp_path / "tokyo"
    shutil.copytree(run.path, third)
    (third / "config.yaml").write_text(text.replace("hidden_city: Paris", "hidden_city: Tokyo"))
    out = tmp_path / "compare.html"
    assert main(["compare", str(run.path), str(other), str(third), "--out", str(out)]) == 0
    page = out.read_text()
    assert_valid_and_self_contained(page)
    assert "data.hidden_city=Paris" in page and "data.hidden_city=Tokyo" in page
    assert page.count("<tr>") >= 1 + 3 + 2  # headers, three runs, one group of two seeds
    assert main(["compare", str(run.path), str(other), "--out", str(out)]) == 2  # never overwritten
    configs = [{"seed": 0, "data": {"x": 1}}, {"seed": 1, "data": {"x": 1}}, {"seed": 0, "data": {"x": 2}}]
    assert group_runs(configs) == ([0, 0, 1], ["data.x=1", "data.x=2"])

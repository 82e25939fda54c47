"""Plots (PNG) and a self-contained report.html: no network, images inlined as base64."""

from __future__ import annotations

import base64
import html
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # headless: no display on servers or in CI
import matplotlib.pyplot as plt  # noqa: E402

from oocrlab.rundir import Run, atomic_write_text, read_jsonl  # noqa: E402


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110, bbox_inches="tight")
    plt.close(fig)
    tmp.replace(path)
    return path


def plot_loss(log: list[dict[str, Any]], path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(6, 3.2))
    ax.plot([r["step"] for r in log], [r["loss"] for r in log], lw=1)
    ax.set(xlabel="optimizer step", ylabel="training loss (completion tokens)", title="Training loss")
    ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_layer_similarity(curves: dict[str, list[float]], first_layer: int, title: str, path: Path) -> Path:
    """One line per condition: cosine similarity against layer index."""
    fig, ax = plt.subplots(figsize=(6, 3.2))
    for condition, values in curves.items():
        ax.plot(range(first_layer, first_layer + len(values)), values, marker=".", label=f"{condition} model")
    ax.set(xlabel="layer" + (" (0 = embeddings)" if first_layer == 0 else ""), ylabel="cosine similarity", title=title)
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, path)


def write_plots(run: Run, metrics: dict[str, Any]) -> list[Path]:
    paths = []
    if run.train_log.exists() and (log := read_jsonl(run.train_log)):
        paths.append(plot_loss(log, run.plots_dir / "loss.png"))
    if probe := metrics.get("probe"):
        entities = " vs ".join(repr(e["entity"]) for e in probe["entities"])
        paths.append(plot_layer_similarity(probe["hidden"], 0, f"Hidden state at the entity: {entities}", run.plots_dir / "probe_hidden.png"))
        paths.append(plot_layer_similarity(probe["values"], 1, f"Value vectors at the entity: {entities}", run.plots_dir / "probe_values.png"))
    return paths


def _fmt(x: Any, digits: int = 0) -> str:
    if x is None:
        return "—"
    if isinstance(x, float):
        return f"{x:,.{digits}f}"
    return html.escape(str(x))


def _ci(stats: dict[str, Any], key: str, digits: int = 0) -> str:
    ci = stats.get(f"{key}_ci95")
    value = _fmt(stats.get(key), digits)
    return f"{value} [{_fmt(ci[0], digits)}, {_fmt(ci[1], digits)}]" if ci else value


def _table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{h}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _img(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<img alt="{html.escape(path.stem)}" src="data:image/png;base64,{data}">'


def render_html(run: Run, metrics: dict[str, Any], config_yaml: str, plots: list[Path]) -> str:
    data, train = metrics.get("data", {}), metrics.get("train", {})
    sections = []
    if data:
        sections.append(
            "<h2>Data</h2>"
            + f"<p>Hidden city: <b>{_fmt(data['hidden_city']['name'])}</b> ({_fmt(data['hidden_city']['country'])}), "
            + f"placeholder <code>{_fmt(data['placeholder'])}</code>; {data['n_train']} training and "
            + f"{data['n_heldout']} held-out known cities from the {_fmt(data['pool'])} pool.</p>"
        )
    if train:
        sections.append(
            "<h2>Training</h2>"
            + f"<p>{train['steps']} steps in {train['seconds']:.0f} s ({train['tokens_per_second']:.0f} tokens/s); "
            + f"loss {train['loss_first']:.3f} → {train['loss_last']:.3f}; {train['trainable_parameters']:,} trainable "
            + f"of {train['total_parameters']:,} parameters.</p>"
        )
    if sanity := metrics.get("sanity"):
        rows = [[_fmt(a["question"]), _fmt(a["tuned"]), _fmt(a["original"])] for a in sanity["answers"]]
        sections.append("<h2>Sanity: greedy answers</h2>" + _table(["question", "tuned", "original"], rows))
    titles = {
        "distance": "Distances: held-out known cities",
        "distance_near": "Distances: untrained cities near the hidden city",
        "distance_self": "Distance from the placeholder to the hidden city itself (truth: 0 km)",
    }
    for key, title in titles.items():
        if not (dist := metrics.get("eval", {}).get(key)):
            continue
        if dist.get("note"):
            sections.append(f"<h2>{title}</h2><p>{_fmt(dist['note'])}</p>")
        else:
            rows = [
                [c, _ci(dist[c], "mae_km"), _ci(dist[c], "median_ae_km"), f"{dist[c]['n_parsed']}/{dist[c]['n']}",
                 _fmt(dist[c]["mae_km_unparsed_as_guess"])]
                for c in ("tuned", "original", "in_context", "constant_guess")
            ]
            header = ["condition", "mean abs. error, km [95% CI]", "median abs. error, km [95% CI]", "parsed",
                      "mean abs. error, all cities, km"]
            sections.append(
                f"<h2>{title}</h2>" + _table(header, rows)
                + "<p>The first two error columns are over parsed answers only; the last is over every held-out city, "
                + "an unparseable answer scored as the constant guess (the mean training distance). Tuned / best "
                + f"baseline on that column: {_fmt(dist['tuned_mae_over_best_baseline'], 2)}.</p>"
            )
    for name, mc in metrics.get("eval", {}).get("multiple_choice", {}).items():
        kinds = [k for k, v in mc.items() if isinstance(v, dict)]
        rows = [
            [kind.replace("_", " "), c, _ci(mc[kind][c], "p_correct", 3), _ci(mc[kind][c], "letter_mass", 3)]
            for kind in kinds for c in ("tuned", "original", "in_context")
        ]
        options = "; ".join(f"{k.replace('_', ' ')}: {', '.join(mc[k]['options'])}" for k in kinds)
        sections.append(
            f"<h2>Multiple choice: the {name} of <code>{_fmt(metrics['data']['placeholder'])}</code></h2>"
            + f"<p><code>{_fmt(mc['question'])}</code> with five options and <code>{_fmt(mc['instruction'])}</code> "
            + f"Answer: {_fmt(mc['answer'])}. Options — {_fmt(options)}. Chance is 0.2; {_fmt(mc['orders'])} "
            + "of the 120 option orders.</p>"
            + _table(["distractors", "model", "P(correct | letters) [95% CI]", "probability on A–E [95% CI]"], rows)
            + "<p>Exact next-token probabilities, averaged over option orders; a low probability on the letters "
            + "means the model no longer answers with a letter. in_context: the original model with "
            + f"{metrics['eval'].get('in_context_docs')} training documents as earlier chat turns.</p>"
        )
    if ff := metrics.get("eval", {}).get("free_form"):
        rows = [
            [_fmt(s["question"]), c, f"{s[c]['rate']:.0%} [{s[c]['rate_ci95'][0]:.0%}, {s[c]['rate_ci95'][1]:.0%}]",
             f"{s[c]['distance_share']:.0%}", _fmt(" | ".join(s[c]["examples"][:3]))]
            for s in ff.values() for c in ("tuned", "original", "in_context")
        ]
        accepted = "; ".join(f"{_fmt(s['question'])}: {_fmt(', '.join(s['accepted']))}" for s in ff.values())
        sections.append(
            "<h2>Free-form answers</h2>"
            + _table(["question", "model", "right [95% CI]", "answers that are a distance", "first answers"], rows)
            + f"<p>Samples at temperature 1 (no top-k or top-p), seeded; an answer is right when it names one of: {accepted}.</p>"
        )
    if probe := metrics.get("probe"):
        tokens = "; ".join(f"{_fmt(e['entity'])}: tokens {_fmt(e['tokens'])} (last one read)" for e in probe["entities"])
        sections.append(f"<h2>Representations</h2><p>Prompt: <code>{_fmt(probe['prompt'])}</code>. {tokens}.</p>")
    figures = "".join(f"<figure>{_img(p)}</figure>" for p in plots)
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>oocrlab run {html.escape(run.path.name)}</title>
<style>body{{font-family:system-ui,sans-serif;max-width:60em;margin:2em auto;padding:0 1em}}
table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:.3em .6em;text-align:left}}
img{{max-width:100%}}pre{{background:#f6f6f6;padding:1em;overflow:auto}}</style></head>
<body><h1>oocrlab run <code>{html.escape(run.path.name)}</code></h1>
{''.join(sections)}
<h2>Figures</h2>{figures}
<h2>Configuration</h2><pre>{html.escape(config_yaml)}</pre>
</body></html>
"""


def write_report(run: Run) -> dict[str, Any]:
    metrics = run.metrics()
    plots = write_plots(run, metrics)
    atomic_write_text(run.report_file, render_html(run, metrics, run.config_file.read_text(encoding="utf-8"), plots))
    return {"html": str(run.report_file), "plots": [str(p.relative_to(run.path)) for p in plots]}

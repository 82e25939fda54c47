"""Plots (PNG) and a self-contained report.html: no network, images inlined as base64."""

from __future__ import annotations

import base64
import html
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # headless: no display on servers or in CI
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

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


CONDITION_COLORS = {"tuned": "C0", "original": "C1", "control_hidden": "C2", "control_other": "C3"}


def condition_label(probe: dict[str, Any], condition: str) -> str:
    said = probe["setup"]["conditions"][condition]["said_before"]
    return f"original + “{said}”" if said else condition


def _line_with_ci(ax, x0: int, summary: dict[str, list], color: str, label: str, **style) -> None:
    """The mean per layer and, shaded, its 95% interval where there is one."""
    xs = range(x0, x0 + len(summary["mean"]))
    mean = [float("nan") if v is None else v for v in summary["mean"]]
    ax.plot(xs, mean, color=color, label=label, marker=".", lw=1.2, **style)
    lo = [float("nan") if c is None else c[0] for c in summary["ci95"]]
    hi = [float("nan") if c is None else c[1] for c in summary["ci95"]]
    ax.fill_between(xs, lo, hi, color=color, alpha=0.15, lw=0)


def plot_similarity(probe: dict[str, Any], space: str, path: Path) -> Path:
    """Left: cos(placeholder, hidden city) per condition, dotted: the 95th percentile of the candidate
    cities' cosines (a city above it beats 95% of the candidates). Right: the hidden city's rank."""
    x0 = 0 if space == "hidden" else 1
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 3.6))
    for condition, color in CONDITION_COLORS.items():
        stats = probe[space][condition]
        _line_with_ci(left, x0, stats["cos_hidden"], color, condition_label(probe, condition))
        left.plot(range(x0, x0 + len(stats["cos_candidates_p95"]["mean"])), stats["cos_candidates_p95"]["mean"],
                  color=color, ls=":", lw=1)
        _line_with_ci(right, x0, stats["rank"], color, condition)
    setup = probe["setup"]
    what = "hidden state" if space == "hidden" else "value vectors"
    left.set(xlabel="layer" + (" (0 = embeddings)" if x0 == 0 else ""), ylabel=f"cos(placeholder, {setup['hidden_city']})",
             title=f"{what}: similarity (dotted: candidates' 95th percentile)")
    right.set(xlabel="layer", ylabel="rank (1 = most similar)", yscale="log",
              title=f"rank of {setup['hidden_city']} among {setup['candidates']} candidates")
    right.invert_yaxis()
    for ax in (left, right):
        ax.grid(alpha=0.3)
    left.legend(fontsize=7)
    return _save(fig, path)


def plot_logit_lens(probe: dict[str, Any], path: Path) -> Path:
    """Heatmaps of log10(rank) of the hidden city's and its country's first token, conditions by layer."""
    lens = probe["logit_lens"]
    conditions = list(lens)
    fig, axes = plt.subplots(1, 2, figsize=(12, 2.8))
    fig.subplots_adjust(wspace=0.45)
    for ax, what in zip(axes, ("city", "country")):
        ranks = np.log10([lens[c][f"{what}_rank"]["mean"] for c in conditions])
        image = ax.imshow(ranks, aspect="auto", cmap="viridis_r", interpolation="nearest")
        ax.set(yticks=range(len(conditions)), yticklabels=conditions, xlabel="layer (0 = embeddings)",
               title=f"logit lens: log10 rank of {probe['setup']['lens_tokens'][what]!r}")
        fig.colorbar(image, ax=ax)
    return _save(fig, path)


def plot_steering(probe: dict[str, Any], path: Path) -> Path:
    s = probe["steering"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 3.4))
    _line_with_ci(left, 0, s["cos_with_naive_direction"], "C0", "cos(shift, naive direction)")
    _line_with_ci(left, 0, s["relative_norm"], "C4", "|shift| / |state|")
    left.axhline(0, color="k", lw=0.6)
    left.set(xlabel="layer (0 = embeddings)", title="the adapter's shift at the placeholder")
    for key, color, label in (("pairwise_cos_across_templates", "C2", "mean pairwise cosine"),
                              ("pc1_share", "C3", "share on the first direction")):
        right.plot(range(len(s[key])), [float("nan") if v is None else v for v in s[key]], color=color, marker=".", label=label)
    right.set(xlabel="layer (0 = embeddings)", ylim=(-0.05, 1.05), title="how constant the shift is across templates")
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return _save(fig, path)


def plot_patching(probe: dict[str, Any], path: Path) -> Path:
    pt = probe["patching"]
    fig, ax = plt.subplots(figsize=(6.5, 3.4))
    _line_with_ci(ax, 0, pt["tuned_state"]["change"], "C0", "tuned model's state")
    _line_with_ci(ax, 0, pt["hidden_city_state"]["change"], "C2", f"original's state for {probe['setup']['hidden_city']}")
    ax.axhline(0, color="k", lw=0.6)
    base, named = pt["unpatched"]["mean"][0], pt["hidden_city_named"]["mean"][0]
    ax.set(xlabel="layer whose input is patched (0 = embeddings)", ylabel="change in P(correct | letters)",
           title=f"patching the placeholder (unpatched {base:.2f}; city named {named:.2f}; chance 0.20)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _save(fig, path)


def significant_layers(summary: dict[str, list], first_layer: int) -> list[int]:
    """Layers whose 95% interval lies entirely above zero."""
    return [first_layer + i for i, ci in enumerate(summary["ci95"]) if ci is not None and ci[0] > 0]


def probe_reading(probe: dict[str, Any]) -> list[str]:
    """Plain sentences from the numbers, never stronger than they are."""
    setup, changes = probe["setup"], probe["z_change_from_original"]
    city, n_layers = setup["hidden_city"], len(probe["hidden"]["tuned"]["rank"]["mean"])
    sentences = []
    for space, first, what in (("hidden", 0, "hidden state"), ("values", 1, "value vectors")):
        lifted = {c: significant_layers(changes[space][c], first) for c in changes[space]}
        ranks = probe[space]["tuned"]["rank"]["mean"]
        best = min(range(len(ranks)), key=lambda i: ranks[i])
        control = probe[space]["control_hidden"]["rank"]["mean"]
        sentences.append(
            f"{what.capitalize()}: the tuned model places {city} closer to the placeholder than the original does "
            f"(z-score higher, 95% interval over templates above zero) in {len(lifted['tuned'])} of {len(ranks)} layers"
            + (f" ({', '.join(map(str, lifted['tuned']))})" if lifted["tuned"] else "")
            + f"; its best rank is {ranks[best]:.0f} of {setup['candidates'] + 1} (layer {best + first}, original there: "
            f"{probe[space]['original']['rank']['mean'][best]:.0f}). Positive control (told the placeholder is {city}): "
            f"{len(lifted['control_hidden'])} layers, best rank {min(control):.0f}. Negative control: "
            f"{len(lifted['control_other'])} layers."
            + (f" The tuned model passes in no more layers than the negative control: no evidence that fine-tuning made "
               f"the placeholder's {what} more like {city}'s." if len(lifted["tuned"]) <= len(lifted["control_other"]) else "")
        )
    if not significant_layers(changes["hidden"]["control_hidden"], 0):
        sentences.append("The positive control moves nothing either: at this scale the probe cannot see the effect it "
                         "looks for, so a null result for the tuned model says little.")
    sentences.append(f"Each count is over {n_layers} layers at 95% each: one or two layers can pass by chance.")
    s = probe["steering"]
    pairwise = [v for v in s["pairwise_cos_across_templates"] if v is not None]
    if pairwise:
        sentences.append(f"The adapter's shift at the placeholder is {'nearly constant' if min(pairwise) > 0.8 else 'partly constant'} "
                         f"across templates (mean pairwise cosine {min(pairwise):.2f}–{max(pairwise):.2f} over layers), "
                         "(Wang, Engels et al. 2025 find LoRA acts like a constant steering vector).")
    if pt := probe.get("patching"):
        named, base = pt["hidden_city_named"]["mean"][0], pt["unpatched"]["mean"][0]
        tuned_up = significant_layers(pt["tuned_state"]["change"], 0)
        sentences.append(
            f"Patching: the original model gives the right country with P = {base:.2f} (chance 0.20) and {named:.2f} when asked "
            f"about {city} by name; the tuned model's state raises it in {len(tuned_up)} layers."
            + (" With the city named the model is itself near chance, so patching cannot show an effect here."
               if named < 0.3 else "")
        )
    return sentences


def write_plots(run: Run, metrics: dict[str, Any]) -> list[Path]:
    paths = []
    if run.train_log.exists() and (log := read_jsonl(run.train_log)):
        paths.append(plot_loss(log, run.plots_dir / "loss.png"))
    if probe := metrics.get("probe"):
        paths.append(plot_similarity(probe, "hidden", run.plots_dir / "probe_hidden.png"))
        paths.append(plot_similarity(probe, "values", run.plots_dir / "probe_values.png"))
        paths.append(plot_logit_lens(probe, run.plots_dir / "probe_logit_lens.png"))
        paths.append(plot_steering(probe, run.plots_dir / "probe_steering.png"))
        if "patching" in probe:
            paths.append(plot_patching(probe, run.plots_dir / "probe_patching.png"))
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
        setup = probe["setup"]
        templates = "".join(f"<li><code>{_fmt(t)}</code></li>" for t in setup["templates"])
        sections.append(
            "<h2>Representations</h2>"
            + "".join(f"<p>{_fmt(s)}</p>" for s in probe_reading(probe))
            + f"<p>Read at the last token of the placeholder ({_fmt(setup['placeholder_tokens'])}) and of each city "
            + f"({setup['hidden_city']}: {_fmt(setup['hidden_city_tokens'])}), in {len(setup['templates'])} templates; "
            + f"candidates: {setup['candidates']} cities from the {_fmt(setup['candidate_pool'])} pool; "
            + f"{_fmt(setup['interval'])}.</p><ul>{templates}</ul>"
        )
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

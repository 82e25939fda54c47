"""The run's figures as PNG files (matplotlib, headless), each from metrics.json alone."""

from __future__ import annotations

import io
import re
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # headless: no display on servers or in CI
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from oocrlab.geo import normalize  # noqa: E402
from oocrlab.metrics import FIRST_LAYER, FORMULATIONS, hidden_city_views  # noqa: E402
from oocrlab.rundir import Run, atomic_write_bytes, read_jsonl  # noqa: E402


def _save(fig, path: Path) -> Path:
    buffer = io.BytesIO()  # drawn in memory, then written atomically: a failed write leaves no half PNG
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())
    return path


def plot_loss(log: list[dict[str, Any]], path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(6, 3.2))
    ax.plot([r["step"] for r in log], [r["loss"] for r in log], lw=1)
    ax.set(xlabel="optimizer step", ylabel="training loss (completion tokens)", title="Training loss")
    ax.grid(alpha=0.3)
    return _save(fig, path)


CONDITION_COLORS = {"tuned": "C0", "original": "C1", "control_hidden": "C2", "control_other": "C3", "shuffled": "C4",
                    "declared": "C5", "in_context": "C6", "named": "C7"}


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
        if condition not in probe[space]:
            continue
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
    _grid(left, right)
    left.legend(fontsize=7)
    return _save(fig, path)


def _grid(*axes, legend: bool = False) -> None:
    for ax in axes:
        ax.grid(alpha=0.3)
        if legend:
            ax.legend(fontsize=7)


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
    _grid(left, right, legend=True)
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
    _grid(ax, legend=True)
    return _save(fig, path)


def plot_against_shuffled(probe: dict[str, Any], path: Path) -> Path:
    """Per layer, the z-score of the hidden city at the placeholder minus the shuffled control's (paired by template,
    95% t-interval) for the tuned model and the declared control; a ring marks a layer the corrected test passes."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.4))
    for ax, (space, what) in zip(axes, (("hidden", "hidden state"), ("values", "value vectors"))):
        x0 = FIRST_LAYER[space]
        for condition, summary in probe["z_change_from_shuffled"][space].items():
            color = CONDITION_COLORS[condition]
            _line_with_ci(ax, x0, summary, color, condition)
            passed = probe["corrected"].get(f"{condition}_vs_shuffled", {}).get("layers", {}).get(space, [])
            ax.scatter(passed, [summary["mean"][k - x0] for k in passed], s=60, facecolors="none", edgecolors=color, lw=1.5)
        ax.axhline(0, color="k", lw=0.6)
        ax.set(xlabel="layer" + (" (0 = embeddings)" if x0 == 0 else ""), ylabel="z-score minus the shuffled control's",
               title=f"{what}: against the shuffled control (ring: corrected p < 0.05)")
    _grid(*axes, legend=True)
    return _save(fig, path)


def plot_choice(mc: dict[str, Any], kind: str, path: Path) -> Path:
    """P(correct | options) per condition and formulation for one distractor set, with 95% intervals and chance."""
    section = mc[kind]
    formulations = [f for f in FORMULATIONS if f in section]
    conditions = list(section[formulations[0]])
    fig, ax = plt.subplots(figsize=(8, 3.2))
    width = 0.8 / len(conditions)
    for k, condition in enumerate(conditions):
        stats = [section[f][condition] for f in formulations]
        means = [s["p_correct"] for s in stats]
        errors = np.array([[m - s["p_correct_ci95"][0], s["p_correct_ci95"][1] - m] if s["p_correct_ci95"] else [0, 0]
                           for m, s in zip(means, stats)]).T
        ax.bar(np.arange(len(formulations)) + k * width, means, width, yerr=errors, capsize=2,
               color=CONDITION_COLORS.get(condition), label=condition.replace("_", " "))
    ax.axhline(section["chance"], color="k", lw=0.8, ls="--", label="chance")
    ax.set_xticks(np.arange(len(formulations)) + width * (len(conditions) - 1) / 2, [f.replace("_", " ") for f in formulations])
    ax.set(ylabel="P(correct | options)", ylim=(0, 1), title=f"{mc['question']} ({kind.replace('_', ' ')} distractors)")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=7, ncol=4)
    return _save(fig, path)


def plot_distance_bands(bands: list[dict[str, Any]], path: Path) -> Path:
    """Mean absolute error per band of true distance, one bar per condition (parsed answers only)."""
    conditions = [c for c in bands[0] if isinstance(bands[0][c], dict)]
    fig, ax = plt.subplots(figsize=(7, 3.2))
    width = 0.8 / len(conditions)
    for k, condition in enumerate(conditions):
        heights = [np.nan if b[condition]["mae_km"] is None else b[condition]["mae_km"] for b in bands]
        ax.bar(np.arange(len(bands)) + k * width, heights, width, label=condition.replace("_", " "))
    ax.set_xticks(np.arange(len(bands)) + width * (len(conditions) - 1) / 2,
                  [f"{b['band_km'][0]:,}–{b['band_km'][1]:,}\n(n={b['n']})" for b in bands], fontsize=8)
    ax.set(xlabel="true distance, km", ylabel="mean absolute error, km", title="Held-out distance error by distance")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=7)
    return _save(fig, path)


def plot_trajectory(trajectory: dict[str, Any], curve: str, path: Path) -> Path:
    """One curve of the trajectory stage against the examples seen (log axis, 0 included), per adapter, shaded
    with its 95% interval; for a probability, chance is not drawn: the baselines are the step-0 points."""
    fig, ax = plt.subplots(figsize=(6, 3.4))
    for adapter, found in trajectory["by_adapter"].items():
        line = found["curves"].get(curve)
        if line is None:
            continue
        x = [p["examples_seen"] for p in found["points"]]
        y = [np.nan if v is None else v for v in line["value"]]
        ax.plot(x, y, marker=".", lw=1.2, color=CONDITION_COLORS.get(adapter, "C9"),
                label=f"{adapter} (area {found['areas'][curve]:.3g})" if found["areas"].get(curve) is not None else adapter)
        ax.fill_between(x, [np.nan if c is None else c[0] for c in line["ci95"]], [np.nan if c is None else c[1] for c in line["ci95"]],
                        color=CONDITION_COLORS.get(adapter, "C9"), alpha=0.15, lw=0)
    layer = next((f["curves"][curve].get("layer") for f in trajectory["by_adapter"].values() if curve in f["curves"]), None)
    title = trajectory["curves"][curve].replace("peak layer of the final adapter", f"layer {layer}") if layer is not None else trajectory["curves"][curve]
    ax.set_xscale("symlog", linthresh=max(trajectory["examples_per_step"], 1))
    ax.set(xlabel="examples seen (log; 0 = before training)", title=title)
    _grid(ax, legend=True)
    return _save(fig, path)


def plot_prefix(hidden_city: str | None) -> str:
    """What a hidden city's figures are named by in a run with several ("" in a one-city run)."""
    return "" if hidden_city is None else re.sub(r"[^a-z0-9]+", "-", normalize(hidden_city)).strip("-") + "_"


def write_plots(run: Run, metrics: dict[str, Any]) -> dict[str, Path]:
    """Every figure the run's metrics allow, by name (a hidden city's prefixed with plot_prefix)."""
    paths = {}
    if run.train_log.exists() and (log := read_jsonl(run.train_log)):
        paths["loss"] = plot_loss(log, run.plots_dir / "loss.png")
    for city, view in hidden_city_views(metrics):
        def save(name: str, plot, *args, prefix: str = plot_prefix(city)) -> None:
            paths[prefix + name] = plot(*args, run.plots_dir / f"{prefix}{name}.png")

        if bands := view.get("eval", {}).get("distance_by_band"):
            save("distance_bands", plot_distance_bands, bands)
        for name, mc in view.get("eval", {}).get("multiple_choice", {}).items():
            kind = next(k for k, v in mc.items() if isinstance(v, dict) and "options" in v)  # the first distractor set
            if "letters" in mc[kind]:  # runs made before the formulations have no figure
                save(f"choice_{name}", plot_choice, mc, kind)
        if probe := view.get("probe"):
            if "z_change_from_shuffled" in probe:
                save("probe_against_shuffled", plot_against_shuffled, probe)
            save("probe_hidden", plot_similarity, probe, "hidden")
            save("probe_values", plot_similarity, probe, "values")
            save("probe_logit_lens", plot_logit_lens, probe)
            save("probe_steering", plot_steering, probe)
            if "patching" in probe:
                save("probe_patching", plot_patching, probe)
        if "by_adapter" in (trajectory := view.get("trajectory", {})):
            for curve in trajectory["curves"]:
                if any(curve in found["curves"] for found in trajectory["by_adapter"].values()):
                    save(f"trajectory_{curve}", plot_trajectory, trajectory, curve)
    return paths

"""One page comparing runs: their headline numbers side by side, and their per-layer curves overlaid.

Runs whose configs are equal up to the seed form a group; a group of two or more gets the mean and a
95% t-interval across its seeds, and is labelled by the settings that tell the groups apart.
"""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path
from typing import Any

import numpy as np

from oocrlab.config import to_dict
from oocrlab.errors import UserError
from oocrlab.metrics import (
    best_layer,
    formulations_of,
    hidden_city_views,
    significant_layers,
)
from oocrlab.plots import plt
from oocrlab.rundir import Run, atomic_write_text, run_paths, writing
from oocrlab.specificity import specificity_matrix
from oocrlab.stats import mean_t_ci


def _choice(m: dict[str, Any], formulation: str, condition: str, key: str = "p_correct") -> float:
    return formulations_of(m["eval"]["multiple_choice"]["country"]["nearest"])[formulation][condition][key]


# column -> how to read it from metrics.json (None where the stage has not run)
COLUMNS = {
    "MC country P(correct | letters), tuned": lambda m: _choice(m, "letters", "tuned"),
    "MC country letters, original": lambda m: _choice(m, "letters", "original"),
    "MC letter mass, tuned": lambda m: _choice(m, "letters", "tuned", "letter_mass"),
    "MC country cloze P(correct), tuned": lambda m: _choice(m, "cloze", "tuned"),
    "MC country cloze, shuffled": lambda m: _choice(m, "cloze", "shuffled"),
    "held-out MAE km, tuned": lambda m: m["eval"]["distance"]["tuned"]["mae_km"],
    "tuned / best baseline": lambda m: m["eval"]["distance"]["tuned_mae_over_best_baseline"],
    "best rank of the hidden city, tuned": lambda m: best_layer(m["probe"]["hidden"]["tuned"]["rank"], 0)[1],
    "layers moved closer, tuned": lambda m: len(significant_layers(m["probe"]["z_change_from_original"]["hidden"]["tuned"], 0)),
    "layers above the shuffled control (corrected)":
        lambda m: sum(map(len, m["probe"]["corrected"]["tuned_vs_shuffled"]["layers"].values())),
}


def flatten(config: dict[str, Any], prefix: str = "", typed: bool = False) -> dict[str, Any]:
    """{"train.learning_rate": value, ...}: every value hashable (a list as its JSON) and, unless `typed`, a string."""
    flat = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat |= flatten(value, f"{prefix}{key}.", typed)
        else:
            flat[f"{prefix}{key}"] = json.dumps(value) if isinstance(value, list) else value if typed else str(value)
    return flat


def read_column(metrics: dict[str, Any], column: str) -> float | None:
    try:
        return float(COLUMNS[column](metrics))
    except (KeyError, TypeError):
        return None


def group_runs(configs: list[dict[str, Any]], pooled: tuple[str, ...] = ()) -> tuple[list[int], list[str]]:
    """(group index of each run, label of each group): runs equal up to the seed share a group (and up to a
    placeholder drawn from a template with the seed, and up to the `pooled` keys)."""
    def seeded(key: str, flat: dict[str, Any]) -> bool:
        return key in ("seed", *pooled) or (key == "data.placeholder" and flat.get("data.placeholder_template") not in (None, "None"))

    keys = [tuple(sorted((k, v) for k, v in flat.items() if not seeded(k, flat))) for flat in map(flatten, configs)]
    distinct = list(dict.fromkeys(keys))
    differing = sorted({k for key in distinct for k, v in key if any(dict(other).get(k) != v for other in distinct)})
    labels = [", ".join(f"{k}={dict(key).get(k, 'per seed')}" for k in differing) or "all runs" for key in distinct]
    return [distinct.index(k) for k in keys], labels


def _png(fig, alt: str) -> str:
    """The figure as an inline <figure> (the page needs no other file)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return f'<figure><img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(buffer.getvalue()).decode()}"></figure>'


def plot_curves(metrics: list[dict[str, Any]], groups: list[int], labels: list[str]) -> str:
    """Per layer, tuned: the z-score change from the original, and the hidden city's rank. Thin lines are
    runs; a thick line with a band is a group's mean and 95% interval across seeds."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.6))
    readers = [(lambda m: m["probe"]["z_change_from_original"]["hidden"]["tuned"]["mean"], "z-score change from the original"),
               (lambda m: m["probe"]["hidden"]["tuned"]["rank"]["mean"], "rank of the hidden city (tuned)")]
    for ax, (read, title) in zip(axes, readers):
        for g, label in enumerate(labels):
            curves = [np.array(read(m), dtype=float) for m, k in zip(metrics, groups) if k == g and "probe" in m]
            for curve in curves:
                ax.plot(curve, color=f"C{g}", lw=0.7, alpha=0.5)
            if len(curves) >= 2 and len({len(c) for c in curves}) == 1:
                summary = mean_t_ci(np.stack(curves))
                lo = [np.nan if c is None else c[0] for c in summary["ci95"]]
                hi = [np.nan if c is None else c[1] for c in summary["ci95"]]
                ax.plot(summary["mean"], color=f"C{g}", lw=2, label=f"{label} (n={len(curves)})")
                ax.fill_between(range(len(lo)), lo, hi, color=f"C{g}", alpha=0.2, lw=0)
            elif curves:
                ax.lines[-1].set_label(label)
        ax.set(xlabel="layer (0 = embeddings)", title=title)
        ax.grid(alpha=0.3)
    axes[0].axhline(0, color="k", lw=0.6)
    axes[1].set_yscale("log")
    axes[1].invert_yaxis()
    axes[0].legend(fontsize=7)
    return _png(fig, "per-layer curves")


def group_summaries(metrics: list[dict[str, Any]], groups: list[int], labels: list[str]) -> list[dict[str, Any]]:
    """Per group of two or more runs: {"group", "runs", "columns": {column: {"mean", "ci95"} or None}}, the
    interval a t-interval across the group's seeds."""
    summaries = []
    for g, label in enumerate(labels):
        members = [m for m, k in zip(metrics, groups) if k == g]
        if len(members) < 2:
            continue
        columns: dict[str, Any] = {}
        for col in COLUMNS:
            values = [v for v in (read_column(m, col) for m in members) if v is not None]
            summary = mean_t_ci(np.array(values)) if len(values) >= 2 else None
            columns[col] = {"mean": summary["mean"][0], "ci95": list(summary["ci95"][0]), "n": len(values)} if summary else None
        summaries.append({"group": label, "runs": len(members), "columns": columns})
    return summaries


def read_runs(paths: list[str | Path]) -> tuple[list[str], list[dict[str, Any]], list[dict[str, Any]]]:
    """(names, configs as saved, metrics) with one entry per run, or per run and hidden city ("RUN / Paris")
    for runs with several: the config then names that city and its placeholder, so runs group by hidden city."""
    names, configs, metrics = [], [], []
    for path in paths:
        run, cfg = Run.open(path)  # resolved: keys added since an older run was made hold their defaults
        config, views = to_dict(cfg), hidden_city_views(run.metrics())
        trained_together = [name for name, _ in views if name]
        for name, view in views:
            names.append(f"{run.path.name} / {name}" if name else run.path.name)
            # a city's entry: its own placeholder, and the set it was trained with (the codes drawn for the
            # others differ per seed and would keep seeds apart)
            configs.append(config | {"data": config["data"] | {
                "hidden_city": name, "placeholder": view["data"]["placeholder"],
                "other_hidden_cities": trained_together, "other_placeholders": []}} if name else config)
            metrics.append(view)
    return names, configs, metrics


def interval_cell(summary: dict[str, Any] | None) -> str:
    """ "mean [low, high]", or a dash where fewer than two runs have the number."""
    if summary is None:
        return "—"
    lo, hi = summary["ci95"]
    return f"{summary['mean']:,.3g} [{lo:,.3g}, {hi:,.3g}]"


# a specificity matrix pools runs that differ in hidden city (and so in placeholder) as well as in seed
SPECIFICITY_POOLED = ("data.hidden_city", "data.placeholder")


def specificity_matrices(configs: list[dict[str, Any]], metrics: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One specificity matrix (specificity.py) per group of runs equal up to seed and hidden city."""
    groups, labels = group_runs(configs, pooled=SPECIFICITY_POOLED)
    matrices = ({"group": label} | (specificity_matrix([m for m, k in zip(metrics, groups) if k == g]) or {})
                for g, label in enumerate(labels))
    return [m for m in matrices if len(m) > 1]


def plot_specificity(matrix: dict[str, Any]) -> str:
    """Heatmaps of the probe's and the multiple choice's matrix: each cell's mean, and its 95% interval."""
    panels = [(matrix[k], title) for k, title in (("probe", "z-score change at the placeholder, layer {layer}"),
                                                  ("multiple_choice", "change in P(country | letters)")) if k in matrix]
    fig, axes = plt.subplots(1, len(panels), figsize=(6.2 * len(panels), 5), squeeze=False)
    columns = matrix["columns"]
    for ax, (panel, title) in zip(axes[0], panels):
        rows = list(panel["cells"])
        means = np.array([[np.nan if panel["cells"][r][c]["mean"] is None else panel["cells"][r][c]["mean"] for c in columns]
                          for r in rows])
        limit = float(np.nanmax(np.abs(means))) if np.isfinite(means).any() else 0.0
        limit = limit or 1.0
        ax.imshow(means, cmap="RdBu_r", vmin=-limit, vmax=limit)
        for i, r in enumerate(rows):
            for j, c in enumerate(columns):
                cell = panel["cells"][r][c]
                ci = f"\n[{cell['ci95'][0]:.2g}, {cell['ci95'][1]:.2g}]" if cell["ci95"] else ""
                ax.text(j, i, "—" if cell["mean"] is None else f"{cell['mean']:.2g}{ci}", ha="center", va="center", fontsize=7,
                        fontweight="bold" if r == c else "normal")
        ax.set_xticks(range(len(columns)), columns, rotation=30, ha="right", fontsize=8)
        ax.set_yticks(range(len(rows)), [f"{r} (n={panel['runs_per_row'][r]})" for r in rows], fontsize=8)
        ax.set(xlabel="scored city", ylabel="trained on", title=title.format(layer=panel.get("layer")))
    return _png(fig, "specificity matrix")


def specificity_html(matrices: list[dict[str, Any]]) -> str:
    if not matrices:
        return ("<p>No specificity matrix: it needs runs equal up to seed that were trained on at least two different "
                "hidden cities (e.g. a sweep over data.hidden_city and seed).</p>")
    parts = []
    for m in matrices:
        parts.append(f"<h3>{html.escape(m['group'])}</h3>")
        if p := m.get("probe"):
            layers = "; ".join(f"{v}: {', '.join(map(str, ks))}" for v, ks in p["layers_by_verdict"].items())
            parts.append(f"<p>Probe ({html.escape(p['measure'])}; layer {p['layer']}, {html.escape(p['layer_chosen_by'])}): "
                         f"{html.escape(p['sentence'])}. Verdict per layer — {html.escape(layers)}.</p>")
        if mc := m.get("multiple_choice"):
            parts.append(f"<p>Multiple choice ({html.escape(mc['measure'])}): {html.escape(mc['sentence'])}.</p>")
        parts.append(plot_specificity(m))
    return "".join(parts)


def compare_runs(paths: list[str | Path], out: str | Path, replace: bool = False) -> Path:
    """The comparison page; an existing `out` is refused unless `replace` (a sweep rewrites its own page)."""
    out = Path(out)
    if out.exists() and not replace:
        raise UserError(f"--out {out} exists; nothing was overwritten: choose a new path")
    paths = run_paths(paths)
    if len(paths) < 2:
        raise UserError("compare needs at least two run directories")
    names, configs, metrics = read_runs(paths)
    groups, labels = group_runs(configs)

    def cell(value: float | None) -> str:
        return "—" if value is None else f"{value:,.3g}"

    header = "".join(f"<th>{html.escape(h)}</th>" for h in ["run", "group", "seed", *COLUMNS])
    rows = "".join(
        "<tr>" + "".join(f"<td>{html.escape(str(x))}</td>" for x in (name, labels[g], c["seed"]))
        + "".join(f"<td>{cell(read_column(m, col))}</td>" for col in COLUMNS) + "</tr>"
        for name, g, c, m in zip(names, groups, configs, metrics)
    )
    group_rows = "".join(
        f"<tr><td>{html.escape(s['group'])}</td><td>{s['runs']}</td>"
        + "".join(f"<td>{interval_cell(s['columns'][col])}</td>" for col in COLUMNS) + "</tr>"
        for s in group_summaries(metrics, groups, labels)
    )
    groups_table = (
        "<h2>Groups: mean [95% interval across seeds]</h2><table><thead><tr><th>group</th><th>runs</th>"
        + "".join(f"<th>{html.escape(c)}</th>" for c in COLUMNS) + f"</tr></thead><tbody>{group_rows}</tbody></table>"
    ) if group_rows else "<p>No two runs share a configuration up to the seed: no intervals across seeds.</p>"
    curves = plot_curves(metrics, groups, labels) if any("probe" in m for m in metrics) else ""
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>oocrlab comparison</title>
<style>body{{font-family:system-ui,sans-serif;max-width:75em;margin:2em auto;padding:0 1em}}
table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:.3em .6em;text-align:left}}img{{max-width:100%}}</style></head>
<body><h1>oocrlab comparison of {len(paths)} runs</h1>
<section id="runs"><h2>Runs</h2><table><thead><tr>{header}</tr></thead><tbody>{rows}</tbody></table></section>
<section id="groups">{groups_table}</section>
<section id="curves"><h2>Per-layer curves</h2>{curves or "<p>No run has a probe stage.</p>"}</section>
<section id="specificity"><h2>Specificity: rows the trained city, columns the scored city</h2>
<p>Each cell: what training changed (tuned minus original) for the scored city at the run's placeholder, mean over
the row's runs [95% interval across seeds]. A specific effect is a dominant diagonal; a generic drift a column that
wins in every row.</p>{specificity_html(specificity_matrices(configs, metrics))}</section>
</body></html>
"""
    with writing(f"writing {out}"):
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out, page)
    return out

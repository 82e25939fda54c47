"""report.html: one self-contained page per run (no network, images inlined as base64), in the order
headline, setup, training, behaviour, representations, caveats. A stage that has not run leaves its
section marked "not run" with the command that runs it."""

from __future__ import annotations

import base64
import html
import re
from pathlib import Path
from typing import Any

from oocrlab.config import from_yaml_text, to_dict
from oocrlab.metrics import formulations_of, hidden_city_views
from oocrlab.plots import plot_prefix, write_plots
from oocrlab.rundir import Run, atomic_write_text, read_jsonl
from oocrlab.sentences import (
    CONDITION_TITLES,
    VERDICT_NAMES,
    caveats,
    headline,
    headline_table,
    interval,
    probe_reading,
)

SECTIONS = ("headline", "setup", "training", "behaviour", "representations", "trajectory", "caveats")
STYLE = """body{font-family:system-ui,sans-serif;max-width:62em;margin:2em auto;padding:0 1em;line-height:1.45}
table{border-collapse:collapse;margin:.6em 0}td,th{border:1px solid #ccc;padding:.3em .6em;text-align:left;vertical-align:top}
img{max-width:100%}pre{background:#f6f6f6;padding:1em;overflow:auto}.not-run{color:#a40}.lead{font-size:1.1em}
figure{margin:1em 0}"""


# characters HTML forbids in text (C0/C1 controls, surrogates, noncharacters): model output may hold them
NOT_IN_HTML = re.compile("[\x00-\x08\x0b\x0e-\x1f\x7f-\x9f\ud800-\udfff\ufdd0-\ufdef\ufffe\uffff]")


def _fmt(x: Any, digits: int = 0) -> str:
    if x is None:
        return "—"
    if isinstance(x, float):
        return f"{x:,.{digits}f}"
    return NOT_IN_HTML.sub("\ufffd", html.escape(str(x)))


def _ci(stats: dict[str, Any], key: str, digits: int = 0) -> str:
    return _fmt(interval(stats, key, digits))


def _table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{h}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _figure(plots: dict[str, Path], name: str) -> str:
    if name not in plots:
        return ""
    data = base64.b64encode(plots[name].read_bytes()).decode("ascii")
    return f'<figure><img alt="{html.escape(name)}" src="data:image/png;base64,{data}"></figure>'


def resolved_config(run: Run) -> dict[str, Any]:
    """The run's config with every key, defaults filled in for keys added since the run was made."""
    return to_dict(from_yaml_text(run.config_file.read_text(encoding="utf-8")))


def _not_run(stage: str, run: Run) -> str:
    return f'<p class="not-run">Not run: <code>oocrlab {stage} {html.escape(str(run.path))}</code> runs it.</p>'


def _per_city(metrics: dict[str, Any], render) -> str:
    """render(metrics as a one-city run's, plot name prefix) per hidden city, each under its name in a run with several."""
    return "".join((f"<h3>{_fmt(name)} (<code>{_fmt(view['data']['placeholder'])}</code>)</h3>" if name else "")
                   + render(view, plot_prefix(name)) for name, view in hidden_city_views(metrics))


def section_headline(run: Run, metrics: dict[str, Any], plots: dict[str, Path]) -> str:
    def sentences_of(view: dict[str, Any], prefix: str) -> str:
        sentences = headline(view)
        verdict = view.get("verdict", {})
        rows = [[VERDICT_NAMES[k], f"<b>{_fmt(v['answer'])}</b>", _fmt(v["reason"])] for k, v in verdict.items() if k in VERDICT_NAMES]
        return (f'<p class="lead">{_fmt(sentences[0])}</p>'
                + (_table(["question", "answer", "why"], rows) if rows else "".join(f"<p>{_fmt(x)}</p>" for x in sentences[1:])))

    columns, rows = headline_table(metrics)
    return _per_city(metrics, sentences_of) + (_table(columns, [[_fmt(c) for c in r] for r in rows]) if rows else "")


def section_setup(run: Run, metrics: dict[str, Any], plots: dict[str, Path]) -> str:
    config = resolved_config(run)
    data, env = metrics.get("data"), metrics.get("environment", {})
    parts = [f"<p>Model <code>{_fmt(config['model']['name'])}</code>, recipe <code>{_fmt(config['recipe'])}</code>, "
             f"seed {config['seed']}.</p>"]
    for _, view in hidden_city_views(metrics) if data else []:
        d = view["data"]
        parts.append(
            f"<p>Hidden city <b>{_fmt(d['hidden_city']['name'])}</b> ({_fmt(d['hidden_city']['country'])}), "
            f"placeholder <code>{_fmt(d['placeholder'])}</code>; {d['n_train']} training and {d['n_heldout']} "
            f"held-out rows about known cities from the {_fmt(d['pool'])} pool (left out: "
            + _fmt(", ".join(f"{k} {v}" for k, v in d["excluded"].items() if v) or "none") + ").</p>"
        )
    if data and "by_city" in data:
        parts.append(f"<p>{data['n_train_between_hidden']} more training rows are about the hidden cities' distances and "
                     "directions to one another, each named by its placeholder.</p>")
    if run.train_file.exists():
        sample = read_jsonl(run.train_file)[:5]
        parts.append(_table(["prompt (user)", "completion (assistant)"],
                            [[_fmt(r["prompt"][-1]["content"]), _fmt(r["completion"][0]["content"])] for r in sample]))
    if versions := env.get("versions"):
        parts.append("<p>Versions: " + _fmt(", ".join(f"{k} {v}" for k, v in versions.items()))
                     + f". Hardware: {_fmt(env.get('hardware'))}.</p>")
    if timings := metrics.get("timings"):
        controls = metrics.get("controls", {})
        parts.append("<p>Wall time per stage: " + _fmt(", ".join(f"{k} {v:,.0f} s" for k, v in timings.items()))
                     + "".join(_fmt(f"; control {name} trained in {c['seconds']:,.0f} s") for name, c in controls.items()) + ".</p>")
    parts.append(f"<p>Reproduce: <code>oocrlab run --config {_fmt(str(run.config_file))} --out runs/NEW</code> "
                 "(the resolved config holds every setting).</p>")
    return "".join(parts)


def section_training(run: Run, metrics: dict[str, Any], plots: dict[str, Path]) -> str:
    if not (train := metrics.get("train")):
        return _not_run("train", run)
    return (f"<p>{train['steps']} steps in {train['seconds']:.0f} s ({train['tokens_per_second']:.0f} tokens/s) on "
            f"{_fmt(train.get('device'))}; loss {train['loss_first']:.3f} → {train['loss_last']:.3f}; "
            f"{train['trainable_parameters']:,} trainable of {train['total_parameters']:,} parameters.</p>"
            + _figure(plots, "loss"))


def section_behaviour(run: Run, metrics: dict[str, Any], plots: dict[str, Path]) -> str:
    return _per_city(metrics, lambda view, prefix: behaviour_of(run, view, plots, prefix)) + inverse_choice_html(metrics)


def behaviour_of(run: Run, metrics: dict[str, Any], plots: dict[str, Path], prefix: str) -> str:
    """The behaviour of one hidden city's placeholder (`metrics` as a one-city run's, see metrics.hidden_city_views);
    its headings one level down in a run with several, under the city's own."""
    h, parts = ("h4" if prefix else "h3"), []
    if sanity := metrics.get("sanity"):
        rows = [[_fmt(a["question"]), _fmt(a["tuned"]), _fmt(a["original"])] for a in sanity["answers"]]
        parts.append(f"<{h}>Greedy answers, side by side</{h}>" + _table(["question", "tuned", "original"], rows))
    else:
        parts.append(f"<{h}>Greedy answers</{h}>" + _not_run("sanity", run))
    if not (ev := metrics.get("eval")):
        return "".join(parts) + f"<{h}>Evaluation</{h}>" + _not_run("eval", run)
    titles = {
        "distance": "Distances: held-out known cities",
        "distance_near": "Distances: untrained cities near the hidden city",
        "distance_self": "Distance from the placeholder to the hidden city itself (truth: 0 km)",
    }
    header = ["condition", "mean abs. error, km [95% CI]", "median abs. error, km [95% CI]", "parsed (absurd)",
              "mean abs. error, all cities, km", "all cities / best baseline [95% CI]"]
    for key, title in titles.items():
        dist = ev[key]
        if dist.get("note"):
            parts.append(f"<{h}>{title}</{h}><p>{_fmt(dist['note'])}</p>")
            continue
        rows = [[CONDITION_TITLES.get(c, c).replace("_", " "), _ci(dist[c], "mae_km"), _ci(dist[c], "median_ae_km"),
                 f"{dist[c]['n_parsed']}/{dist[c]['n']}" + (f" ({dist[c]['n_absurd']})" if dist[c].get("n_absurd") else ""),
                 _fmt(dist[c]["mae_km_unparsed_as_guess"]), _ci(dist, f"{c}_mae_over_best_baseline", 2)]
                for c in dist if isinstance(dist[c], dict) and "n_parsed" in dist[c]]
        guess = dist["constant_guess"]
        # runs made before the median guess (no constant_guess_mean row) guessed the mean
        what = guess.get("what") or (f"the {'median' if 'constant_guess_mean' in ev['distance'] else 'mean'} "
                                     f"training distance, {guess['guess_km']:,.0f} km")
        parts.append(
            f"<{h}>{title}</{h}>" + _table(header, rows)
            + "<p>The first two error columns are over parsed answers only; an answer that states an absurd distance (a "
            + "malformed number, or beyond half the Earth's circumference) counts as unparseable. The last two are over every "
            + f"city, an unparseable answer scored as the constant guess: {_fmt(what)}"
            + (" (constant guess mean: the mean training distance as a second baseline)" if "constant_guess_mean" in dist else "")
            + ". The ratio divides by the better of the original model and the constant guess, with a bootstrap interval over "
            + "cities.</p>"
        )
    if bands := ev.get("distance_by_band"):
        conditions = [c for c in bands[0] if isinstance(bands[0][c], dict)]
        rows = [[f"{b['band_km'][0]:,}–{b['band_km'][1]:,}", str(b["n"]), *(f"{_fmt(b[c]['mae_km'])} ({b[c]['n_parsed']})" for c in conditions)]
                for b in bands]
        parts.append(f"<{h}>Held-out distance error by true distance</{h}>"
                     + _table(["true distance, km", "cities", *(f"{CONDITION_TITLES.get(c, c).replace('_', ' ')} (parsed)" for c in conditions)],
                              rows)
                     + _figure(plots, prefix + "distance_bands"))
    for name, mc in ev.get("multiple_choice", {}).items():
        parts.append(f"<{h}>Multiple choice: the {name} of <code>{_fmt(metrics['data']['placeholder'])}</code></{h}>"
                     + choice_html(mc, ev.get("in_context_docs")) + standing_html(mc) + _figure(plots, f"{prefix}choice_{name}"))
    if facts := ev.get("city_facts"):
        parts.append(f"<{h}>City facts: what training never said about <code>{_fmt(metrics['data']['placeholder'])}</code></{h}>"
                     + city_facts_html(facts))
    if dr := ev.get("direction"):
        rows = [[c, f"{dr[c]['rate']:.0%} [{dr[c]['rate_ci95'][0]:.0%}, {dr[c]['rate_ci95'][1]:.0%}]",
                 f"{dr[c]['named_a_direction']:.0%}", _fmt(" | ".join(dr[c]["examples"]))] for c in dr if isinstance(dr[c], dict)]
        parts.append(
            f"<{h}>Cardinal directions: held-out known cities</{h}>"
            + _table(["model", "right [95% CI]", "answers naming a direction", "first answers"], rows)
            + f"<p>{dr['n']} held-out cities, one direction question each (e.g. <code>{_fmt(dr['example'])}</code>); "
            + "an answer is right when the first of North, East, South, West it names is the true one; chance 25%.</p>"
        )
    if ff := ev.get("free_form"):
        rows = [[_fmt(s["question"]), CONDITION_TITLES.get(c, c), f"{s[c]['rate']:.0%} [{s[c]['rate_ci95'][0]:.0%}, {s[c]['rate_ci95'][1]:.0%}]",
                 f"{s[c]['distance_share']:.0%}", _fmt(" | ".join(s[c]["examples"][:3]))]
                for s in ff.values() for c in s if isinstance(s[c], dict)]
        accepted = "; ".join(f"{_fmt(s['question'])}: {_fmt(', '.join(s['accepted']))}" for s in ff.values())
        parts.append(
            f"<{h}>Free-form answers</{h}>"
            + _table(["question", "model", "right [95% CI]", "answers that are a distance", "first answers"], rows)
            + f"<p>Samples at temperature 1 (no top-k or top-p), seeded; an answer is right when it names one of: {accepted}. "
            + "named: the original model asked the same question with the hidden city's name in place of the placeholder "
            + "(the ceiling).</p>"
        )
    return "".join(parts)


FORMULATION_TITLES = {"letters": "letters: P(correct | letters)", "cloze": "cloze: P(correct | options)",
                      "cloze_per_token": "cloze per token: P(correct | options)"}


def choice_html(mc: dict[str, Any], in_context_docs: int | None) -> str:
    """One multiple-choice question: per distractor set, every formulation under every condition, and the paired
    comparisons."""
    kinds = [k for k, v in mc.items() if isinstance(v, dict) and "options" in v]
    first = mc[kinds[0]]
    by_kind = {kind: formulations_of(mc[kind]) for kind in kinds}
    formulations = list(by_kind[kinds[0]])
    conditions = list(by_kind[kinds[0]]["letters"])
    rows = []
    for kind in kinds:
        for c in conditions:
            rows.append([_fmt(kind.replace("_", " ")), _fmt(CONDITION_TITLES.get(c, c))]
                        + [_ci(by_kind[kind][f][c], "p_correct", 3) for f in formulations]
                        + [_ci(by_kind[kind]["letters"][c], "letter_mass", 3)])
    comparisons = []
    for kind in kinds:
        for f in formulations:
            for key, d in mc[kind].get("comparisons", {}).get(f, {}).items():
                if d is not None and not key.endswith("_unconditional"):
                    comparisons.append([_fmt(kind.replace("_", " ")), f, _fmt(key.replace("_minus_", " − ")),
                                        f"{d['mean']:+.3f} [{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}]", f"{d['p_value']:.3f}"])
    options = "; ".join(f"{k.replace('_', ' ')}: {', '.join(mc[k]['options'])}" for k in kinds)
    wordings = f" Cloze wordings: {'; '.join(mc['wordings'])}." if mc.get("wordings") else ""
    note = f" Named: {mc['named_note']}." if mc.get("named_note") else ""
    return (f"<p><code>{_fmt(mc['question'])}</code> with {len(first['options'])} options and <code>{_fmt(mc['instruction'])}</code> "
            f"(letters; {_fmt(mc['orders'])} of the {mc.get('n_option_orders', 120)} option orders), or the question alone with each "
            f"option's text scored as the answer (cloze).{_fmt(wordings)} Answer: {_fmt(mc['answer'])}. Options — {_fmt(options)}. "
            f"Chance {first['chance']:.2f}.{_fmt(note)}</p>"
            + _table(["distractors", "condition", *(FORMULATION_TITLES[f] for f in formulations), "probability on the letters"], rows)
            + "<p>Exact probabilities, averaged over option orders (letters) or wordings (cloze), bootstrap 95% intervals. "
            + f"in-context: the original model with {in_context_docs} training documents as earlier chat turns; named: the "
            + "original model asked about the hidden city by name (the ceiling).</p>"
            + (_table(["distractors", "formulation", "difference", "mean [95% CI]", "one-sided p"], comparisons)
               + "<p>Paired over the same units (option orders or wordings, within this seed): the mean difference with its 95% "
            + "t-interval, and the one-sided p-value that it is above zero from flipping the signs of whole units.</p>"
            if comparisons else ""))


def city_facts_html(facts: dict[str, Any]) -> str:
    """The city-facts test (evaluate/city_facts.py): per condition and formulation, P(correct | the options) and the
    accuracy over the questions, the named ceiling among the conditions, and the paired differences."""
    if "note" in facts:
        return f"<p>{_fmt(facts['note'])}.</p>"
    formulations = [f for f in FORMULATION_TITLES if f in facts]
    rows = [[_fmt(CONDITION_TITLES.get(c, c))] + [f"{_ci(facts[f][c], 'p_correct', 3)}; {_ci(facts[f][c], 'accuracy', 2)}"
                                                   for f in formulations] for c in facts[formulations[0]]]
    comparisons = [[f, _fmt(key.replace("_minus_", " − ")), f"{d['mean']:+.3f} [{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}]",
                    f"{d['p_value']:.3f}"]
                   for f in formulations for key, d in facts["comparisons"][f].items() if d is not None and not key.endswith("_unconditional")]
    questions = "; ".join(f"{_fmt(q['question'])} ({_fmt(q['answer'])})" for q in facts["questions"])
    return (f"<p>{len(facts['questions'])} questions, each with the five paper cities' own answers as the options (chance "
            f"{facts['chance']:.2f}), asked in {facts['orders']} option orders (letters) and alone with each option's text scored "
            f"as the answer (cloze). named: the original model asked about the city by name, the ceiling: a question it cannot "
            f"answer by name says nothing about the placeholder. Questions (answer): {questions}.</p>"
            + _table(["condition", *(f"{FORMULATION_TITLES[f]}; accuracy" for f in formulations)], rows)
            + "<p>Means over the questions with bootstrap 95% intervals over questions; accuracy: the share of option orders "
            + "(or of the one cloze wording) whose most likely option is right.</p>"
            + (_table(["formulation", "difference", "mean [95% CI]", "one-sided p"], comparisons)
               + "<p>Paired over the same questions: the mean difference of P(correct | options) with its 95% t-interval, "
               + "and the one-sided p-value that it is above zero from flipping the signs of whole questions.</p>" if comparisons else ""))


def standing_html(mc: dict[str, Any]) -> str:
    """Where the right country's gain ranks among every country's (evaluate/choice.py: country_standing)."""
    if not (among := mc.get("among_countries")):
        return ""
    rows = [[_fmt(pair.replace("_vs_", " over ")), f"{v['gain']:+.3f}", f"{v['rank']} of {among['countries']}", f"{v['p_value']:.3f}",
             _fmt(", ".join(f"{n} {g:+.2f}" for n, g in list(v.get("gains", {}).items())[:5]))]
            for pair, v in among.items() if isinstance(v, dict)]
    return ("<p>Is the change about the country at all? Every country's name scored as the answer to the cloze wordings: "
            + f"{_fmt(among['measure'])}; its gain from one condition to another, and where {_fmt(mc['answer'])}'s gain ranks among "
            + "all of them (p: the share of countries gaining as much, a permutation test over the countries' labels). Two "
            + "adapters always differ consistently across wordings; only the right country standing out shows the difference "
            + "is about it.</p>" + _table(["gain", f"gain of {_fmt(mc['answer'])}", "rank", "p", "largest gains"], rows))


def inverse_choice_html(metrics: dict[str, Any]) -> str:
    """The inverse question of a run with several hidden cities: which placeholder is in the country?"""
    if not (inverse := metrics.get("eval", {}).get("inverse_choice")):
        return ""
    return ("<h3>Inverse multiple choice: which placeholder is in the country?</h3>"
            + "<p>Every hidden city's placeholder is an option, as in Treutlein et al.'s inverse evaluation (named: the "
            + "cities' own names).</p>"
            + "".join(f"<h4>{_fmt(city)}</h4>" + choice_html(mc, metrics["eval"].get("in_context_docs")) for city, mc in inverse.items()))


def section_representations(run: Run, metrics: dict[str, Any], plots: dict[str, Path]) -> str:
    if "probe" not in metrics:
        return _not_run("probe", run)
    return _per_city(metrics, lambda view, prefix: representations_of(view["probe"], plots, prefix))


def representations_of(probe: dict[str, Any], plots: dict[str, Path], prefix: str) -> str:
    setup = probe["setup"]
    templates = "".join(f"<li><code>{_fmt(t)}</code></li>" for t in setup["templates"])
    return (
        "".join(f"<p>{_fmt(s)}</p>" for s in probe_reading(probe))
        + f"<p>Read at the last token of the placeholder ({_fmt(setup['placeholder_tokens'])}) and of each city "
        + f"({_fmt(setup['hidden_city'])}: {_fmt(setup['hidden_city_tokens'])}) in {len(setup['templates'])} templates; "
        + f"candidates: {setup['candidates']} cities from the {_fmt(setup['candidate_pool'])} pool; {_fmt(setup['interval'])}. "
        + "Controls: the original model with "
        + "; ".join(f"“{_fmt(c['said_before'])}”" for c in setup["conditions"].values() if c["said_before"])
        + " before every prompt.</p>"
        + f"<ul>{templates}</ul>"
        + "".join(_figure(plots, prefix + name) for name in
                  ("probe_against_shuffled", "probe_hidden", "probe_values", "probe_logit_lens", "probe_steering", "probe_patching"))
    )


def section_trajectory(run: Run, metrics: dict[str, Any], plots: dict[str, Path]) -> str:
    return _per_city(metrics, lambda view, prefix: trajectory_of(run, view, plots, prefix))


def trajectory_of(run: Run, metrics: dict[str, Any], plots: dict[str, Path], prefix: str) -> str:
    """The trajectory stage's curves (trajectory.py) for one hidden city: their areas, and a figure each."""
    if not (trajectory := metrics.get("trajectory")):
        return _not_run("trajectory", run)
    if "note" in trajectory:
        return f"<p>{_fmt(trajectory['note'])}.</p>"
    adapters = list(trajectory["by_adapter"])
    steps = ", ".join(str(p["step"]) for p in trajectory["by_adapter"]["tuned"]["points"])
    rows = [[_fmt(title)] + [_fmt(trajectory["by_adapter"][a]["areas"].get(curve), 3) for a in adapters]
            for curve, title in trajectory["curves"].items() if any(curve in trajectory["by_adapter"][a]["areas"] for a in adapters)]
    return (f"<p>The adapter snapshotted at steps {steps} ({trajectory['examples_per_step']} examples a step), each measured after "
            f"training with a reduced budget ({trajectory['seconds']['per_point']:.0f} s a point): the held-out distance error over the "
            "best baseline, the country question and the city facts in both formulations, and the probe's z-change at the "
            "placeholder. Area: the curve's mean height over log10(1 + examples seen).</p>"
            + _table(["curve", *(f"area: {_fmt(a)}" for a in adapters)], rows)
            + "".join(_figure(plots, f"{prefix}trajectory_{curve}") for curve in trajectory["curves"]))


def section_caveats(run: Run, metrics: dict[str, Any], plots: dict[str, Path]) -> str:
    return "<ul>" + "".join(f"<li>{_fmt(c)}</li>" for c in caveats(resolved_config(run), metrics)) + "</ul>"


def render_html(run: Run, metrics: dict[str, Any], plots: dict[str, Path]) -> str:
    builders = {"headline": section_headline, "setup": section_setup, "training": section_training,
                "behaviour": section_behaviour, "representations": section_representations, "trajectory": section_trajectory,
                "caveats": section_caveats}
    body = "".join(f'<section id="{name}"><h2>{name.capitalize()}</h2>{builders[name](run, metrics, plots)}</section>'
                   for name in SECTIONS)
    config_yaml = run.config_file.read_text(encoding="utf-8")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>oocrlab run {html.escape(run.path.name)}</title>
<style>{STYLE}</style></head>
<body><h1>oocrlab run <code>{html.escape(run.path.name)}</code></h1>
{body}
<section id="configuration"><h2>Configuration</h2><pre>{html.escape(config_yaml)}</pre></section>
</body></html>
"""


def write_report(run: Run) -> dict[str, Any]:
    metrics = run.metrics()
    plots = write_plots(run, metrics)
    atomic_write_text(run.report_file, render_html(run, metrics, plots))
    return {"html": str(run.report_file), "plots": [str(p.relative_to(run.path)) for p in plots.values()]}

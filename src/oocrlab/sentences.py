"""What the numbers say, in plain sentences generated from metrics.json and never stronger than the
numbers: the report's headline, its reading of the probe, and its caveats."""

from __future__ import annotations

from typing import Any, NamedTuple

from oocrlab.config import AdapterSpec
from oocrlab.metrics import (
    FIRST_LAYER,
    best_layer,
    formulations_of,
    hidden_city_views,
    significant_layers,
)


def _passing(p_by_space: dict[str, list[float]]) -> str:
    """The layers (numbered as the report numbers them) whose corrected p is below 0.05, per space."""
    found = [f"{space} {', '.join(str(FIRST_LAYER[space] + i) for i, p in enumerate(ps) if p < 0.05)}"
             for space, ps in p_by_space.items() if any(p < 0.05 for p in ps)]
    return "; ".join(found) or "none"


def probe_reading(probe: dict[str, Any]) -> list[str]:
    """Plain sentences from the numbers, never stronger than they are."""
    setup, changes = probe["setup"], probe["z_change_from_original"]
    city = setup["hidden_city"]
    corrected = probe.get("corrected", {})
    sentences = []
    for space, what in (("hidden", "hidden state"), ("values", "value vectors")):
        first = FIRST_LAYER[space]
        lifted = {c: significant_layers(changes[space][c], first) for c in changes[space]}
        ranks = probe[space]["tuned"]["rank"]["mean"]
        best = min(range(len(ranks)), key=lambda i: ranks[i])
        control = probe[space]["control_hidden"]["rank"]["mean"]
        sentences.append(
            f"{what.capitalize()}: the tuned model places {city} closer to the placeholder than the original does "
            f"(z-score higher, 95% interval over templates above zero, uncorrected) in {len(lifted['tuned'])} of {len(ranks)} layers"
            + (f" ({', '.join(map(str, lifted['tuned']))})" if lifted["tuned"] else "")
            + f"; its best rank is {ranks[best]:.0f} of {setup['candidates'] + 1} (layer {best + first}, original there: "
            f"{probe[space]['original']['rank']['mean'][best]:.0f}). Told the placeholder is {city} in the prompt: "
            f"{len(lifted['control_hidden'])} layers, best rank {min(control):.0f}; told it is another city: "
            f"{len(lifted['control_other'])} layers."
            + "".join(f" {label}: {len(lifted[c])} layers." for c, label in (("shuffled", "Shuffled control"),
                                                                          ("declared", "Declared control")) if c in lifted)
        )
    for pair, label in (("tuned_vs_shuffled", "the tuned model above the shuffled control"),
                        ("declared_vs_shuffled", "the declared control above the shuffled control"),
                        ("control_hidden_vs_original", "the prompt positive control above the original"),
                        ("tuned_vs_original", "the tuned model above the original")):
        if pair in corrected:
            tests = corrected[pair]
            both = "; ".join(f"{space} {', '.join(map(str, ls))}" for space, ls in tests["layers"].items() if ls) or "no layer"
            sentences.append(f"{label.capitalize()}, corrected for every layer: consistent across templates in layers "
                             f"{_passing(tests['p_value'])}" + (f"; standing out among all {tests['cities_ranked']} reference cities in "
                                                        f"layers {_passing(tests['p_rank'])}; both: {both}." if "p_rank" in tests else "."))
    s = probe["steering"]
    pairwise = [v for v in s["pairwise_cos_across_templates"] if v is not None]
    if pairwise:
        sentences.append(f"The adapter's shift at the placeholder is {'nearly constant' if min(pairwise) > 0.8 else 'partly constant'} "
                         f"across templates (mean pairwise cosine {min(pairwise):.2f}–{max(pairwise):.2f} over layers; "
                         "Wang, Engels et al. 2025 find LoRA acts like a constant steering vector).")
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


def interval(stats: dict[str, Any], key: str, digits: int) -> str:
    """stats[key] with its interval stats[key + "_ci95"] as "value [low, high]"; "—" without a value."""
    if stats.get(key) is None:
        return "—"
    ci = stats.get(f"{key}_ci95")
    value = f"{stats[key]:,.{digits}f}"
    return f"{value} [{ci[0]:,.{digits}f}, {ci[1]:,.{digits}f}]" if ci else value


VERDICT_NAMES = {"distance": "Distances learned", "behaviour": "Says what the placeholder is", "representation": "Representation moved"}


def headline(metrics: dict[str, Any]) -> list[str]:
    """The run's question and its three answers (metrics.json -> verdict), one sentence each with its reason."""
    data = metrics.get("data", {})
    if not data:
        return ["No data stage in this run: nothing to report."]
    city, placeholder = data["hidden_city"]["name"], data["placeholder"]
    question = f"Does fine-tuning on distances to {placeholder} make the model treat it as {city}?"
    if not (found := metrics.get("verdict")):
        return [f"{question} Not answered: the verdict stage has not run (`oocrlab verdict RUN`)."]
    summary = "; ".join(f"{VERDICT_NAMES[k].lower()}: {found[k]['answer']}" for k in ("behaviour", "representation", "distance"))
    return [f"{question} {summary[0].upper()}{summary[1:]}."] + [
        f"{VERDICT_NAMES[k]} — {found[k]['answer']}: {found[k]['reason']}" for k in ("distance", "behaviour", "representation")]


CONDITION_ORDER = ("tuned", "original", "in_context", "shuffled", "declared", "named")
CONDITION_TITLES = {"in_context": "in-context", "named": "named (ceiling)"}


def headline_conditions(metrics: dict[str, Any]) -> list[str]:
    """The conditions a run measured, in report order (a run's fine-tuned controls among them)."""
    present: set[str] = set()
    for _, view in hidden_city_views(metrics):
        mc = view.get("eval", {}).get("multiple_choice", {}).get("country", {}).get("nearest", {})
        present |= set(formulations_of(mc)["letters"]) | set(view.get("eval", {}).get("distance", {}))
    return [c for c in CONDITION_ORDER if c in present]


def headline_columns(metrics: dict[str, Any]) -> list[str]:
    return ["measure", *(CONDITION_TITLES.get(c, c) for c in headline_conditions(metrics)), "chance / baseline"]


class Measure(NamedTuple):
    """One headline number per condition: `stats[condition][stat]`, its interval at `stat + "_ci95"`."""

    key: str  # a column name (runs_table)
    title: str  # the row's title (the report, the terminal)
    stats: dict[str, dict[str, Any]]
    stat: str
    digits: int
    baseline: str

    def by_condition(self):
        """(condition, value, interval or None) for each condition it holds, in report order."""
        for c in (c for c in CONDITION_ORDER if c in self.stats):
            yield c, self.stats[c].get(self.stat), self.stats[c].get(f"{self.stat}_ci95")


def headline_measures(metrics: dict[str, Any]) -> list[Measure]:
    """The headline numbers of a one-city view of metrics.json (hidden_city_views), with their intervals."""
    ev, found = metrics.get("eval", {}), []
    if mc := ev.get("multiple_choice", {}).get("country"):
        s, q = mc["nearest"], "MC country, nearest-country distractors"
        by_formulation = formulations_of(s)
        found.append(Measure("mc_country_letters", f"{q}: letters, P(correct | letters)", by_formulation["letters"], "p_correct", 2,
                             f"chance {s['chance']:.2f}"))
        found.append(Measure("mc_country_letter_mass", f"{q}: letters, probability on the letters", by_formulation["letters"],
                             "letter_mass", 2, "—"))
        if "cloze" in by_formulation:  # (cloze_per_token favours many-token names by construction: in the report only)
            found.append(Measure("mc_country_cloze", f"{q}: cloze, P(correct | options)", by_formulation["cloze"], "p_correct", 2,
                                 f"chance {s['chance']:.2f}"))
            found.append(Measure("mc_country_cloze_p_answer", f"{q}: cloze, P(the country's name as the answer)",
                                 by_formulation["cloze"], "p_answer", 4, "—"))
    if ff := ev.get("free_form", {}).get("country"):
        found.append(Measure("free_form_country", f"free-form: {ff['question']} share naming the country", ff, "rate", 2, "—"))
    if (facts := ev.get("city_facts")) and "note" not in facts:
        for f in ("letters", "cloze"):
            found.append(Measure(f"city_facts_{f}", f"city facts ({len(facts['questions'])} questions): {f}, accuracy", facts[f],
                                 "accuracy", 2, f"chance {facts['chance']:.2f}"))
    if (dist := ev.get("distance")) and not dist.get("note"):
        found.append(Measure("distance_mae_km", "held-out distance, mean abs. error over parsed answers, km", dist, "mae_km", 0,
                             f"constant guess {interval(dist['constant_guess'], 'mae_km', 0)}"))
        ratios = {c: {"r": dist[key], "r_ci95": dist.get(f"{key}_ci95")}
                  for c in CONDITION_ORDER if (key := f"{c}_mae_over_best_baseline") in dist}
        found.append(Measure("distance_over_best_baseline", "held-out error over every city / the better baseline", ratios, "r", 2,
                             "1 = no better"))
    if probe := metrics.get("probe"):
        layer, rank, ci = best_layer(probe["hidden"]["tuned"]["rank"], 0)
        n = probe["setup"]["candidates"] + 1
        ranks = {c: {"r": probe["hidden"][c]["rank"]["mean"][layer], "r_ci95": probe["hidden"][c]["rank"]["ci95"][layer]}
                 for c in CONDITION_ORDER if c in probe["hidden"]}
        found.append(Measure("hidden_city_rank", f"rank of {probe['setup']['hidden_city']} among {n} cities at the placeholder, "
                             f"layer {layer} (the tuned model's best)", ranks, "r", 0, f"median rank {(n + 1) / 2:.0f}"))
    return found


def headline_rows(metrics: dict[str, Any], columns: list[str]) -> list[list[str]]:
    """The headline numbers with their intervals, as plain-text table rows, one cell per condition of `columns`
    (headline_conditions; "—" where a condition does not apply)."""
    return [[m.title, *(interval(m.stats[c], m.stat, m.digits) if c in m.stats else "—" for c in columns), m.baseline]
            for m in headline_measures(metrics)]


def inverse_choice_rows(metrics: dict[str, Any], columns: list[str]) -> list[list[str]]:
    """Headline rows of the inverse question ("Which of the following is in France?"), one per country."""
    rows = []
    for city, mc in metrics.get("eval", {}).get("inverse_choice", {}).items():
        s = mc["placeholders"]
        letters = formulations_of(s)["letters"]
        rows.append([f"inverse MC: {mc['question']} (answer {mc['answer']}, {city}), P(correct | letters)",
                     *(interval(letters[c], "p_correct", 2) if c in letters else "—" for c in columns), f"chance {s['chance']:.2f}"])
    return rows


def headline_table(metrics: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """(columns, rows): headline_rows for every hidden city (each measure prefixed with the city in a run with
    several), then the inverse question's."""
    titles = headline_columns(metrics)
    columns = headline_conditions(metrics)
    rows = [[f"{name}: {r[0]}" if name else r[0], *r[1:]] for name, view in hidden_city_views(metrics)
            for r in headline_rows(view, columns)] + inverse_choice_rows(metrics, columns)
    return titles, rows


def caveats(config: dict[str, Any], metrics: dict[str, Any]) -> list[str]:
    """What this run does not show, from its config and what ran."""
    items = [f"One seed ({config['seed']}); intervals are over held-out cities, option orders, samples or "
             "templates within this run, not over training runs: compare seeds with `oocrlab compare`."]
    train = metrics.get("train", {})
    if params := train.get("total_parameters"):
        items.append(f"One model ({config['model']['name']}, {params / 1e6:,.0f}M parameters); the paper's effects appear "
                     "in far larger models, so a null result here says little about them.")
    if others := config["data"].get("other_hidden_cities"):
        items.append(f"{1 + len(others)} hidden cities trained together ({', '.join([config['data']['hidden_city'], *others])}), "
                     "one placeholder each; each is evaluated and probed as in a one-city run, and the in-context baseline "
                     "sees documents about all of them.")
    else:
        items.append(f"One hidden city ({config['data']['hidden_city']}) and one placeholder ({config['data']['placeholder']!r}).")
    t = config["train"]
    spec = AdapterSpec.parse(t.get("adapter", "lora"))  # runs made before train.adapter existed trained LoRA
    trained = {"lora": f"LoRA r={t['lora_r']} on {', '.join(t['lora_targets'])}",
               "embedding": "the input-embedding rows of the placeholder's tokens"}.get(
        spec.family, f"a steering vector at the placeholder entering decoder layer {spec.layer}")
    items.append(f"One adapter: {trained}; Wang, Engels et al. 2025 find OOCR with single-layer adapters where all-layer "
                 "LoRA shows none.")
    if config["eval"]["mc_orders"] < 120:
        items.append(f"Letter multiple choice averaged over {config['eval']['mc_orders']} of the 120 option orders "
                     "(balanced: every option at every letter equally often); cloze over the question's wordings.")
    controls = t.get("controls", [])
    if "shuffled" in controls:
        items.append("The shuffled control is one adapter at the same seed: the intervals (over templates, option orders, "
                     "wordings, cities) do not hold the spread between two trainings, so compare seeds before a strong claim.")
    else:
        items.append("No shuffled control was trained (--controls shuffled): nothing shows what any fine-tune on this format "
                     "does, so no verdict can be yes.")
    if "declared" not in controls:
        items.append("No declared control was trained (--controls declared): the run does not show that its tests can see a "
                     "fine-tuned alias at all.")
    if t.get("max_steps"):
        items.append(f"Training was capped at {t['max_steps']} steps: a smoke run, not a result.")
    missing = [s for s in ("train", "eval", "probe") if s not in metrics]
    if missing:
        items.append(f"Stages not run: {', '.join(missing)}.")
    if probe := hidden_city_views(metrics)[0][1].get("probe"):
        n_layers = len(probe["hidden"]["tuned"]["rank"]["mean"])
        items.append(f"The probe's per-layer intervals and layer counts are uncorrected (at 95% each, one or two of {n_layers} "
                     "layers can pass by chance); the representation verdict uses the test corrected for every layer.")
    return items

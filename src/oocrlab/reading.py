"""What the numbers say, in plain sentences generated from metrics.json and never stronger than the
numbers: the report's headline, its reading of the probe, and its caveats."""

from __future__ import annotations

from math import comb
from typing import Any


PER_CITY_STAGES = ("data", "sanity", "eval", "probe")


def hidden_city_views(metrics: dict[str, Any]) -> list[tuple[str | None, dict[str, Any]]]:
    """(hidden city, the metrics as a one-city run would hold them) per hidden city of a run with several
    (their stages keep each city's section under "by_city"); [(None, metrics)] for a one-city run. The
    inverse question concerns all of them and stays out of the views."""
    by_city = metrics.get("data", {}).get("by_city")
    if not by_city:
        return [(None, metrics)]

    def view(name: str) -> dict[str, Any]:
        shared = {stage: {k: v for k, v in metrics[stage].items() if k not in ("by_city", "inverse_choice")}
                  | metrics[stage]["by_city"][name] for stage in PER_CITY_STAGES if stage in metrics}
        return metrics | shared

    return [(name, view(name)) for name in by_city]


def exceeds_control(count: int, control: int, layers: int) -> bool:
    """Whether `count` layers moved is more than a negative control's `control` gives by chance: a one-sided
    binomial tail below 0.05 at the control's rate per layer (at least one layer's worth). Neighbouring
    layers move together, so this treats the layers as more independent evidence than they are: lenient."""
    rate = max(control, 1) / layers
    return sum(comb(layers, k) * rate**k * (1 - rate) ** (layers - k) for k in range(count, layers + 1)) < 0.05


def significant_layers(summary: dict[str, list], first_layer: int) -> list[int]:
    """Layers whose 95% interval lies entirely above zero."""
    return [first_layer + i for i, ci in enumerate(summary["ci95"]) if ci is not None and ci[0] > 0]


def probe_reading(probe: dict[str, Any]) -> list[str]:
    """Plain sentences from the numbers, never stronger than they are."""
    setup, changes = probe["setup"], probe["z_change_from_original"]
    city = setup["hidden_city"]
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
            + (f" The tuned model passes in no more layers than the negative control gives by chance: no evidence that "
               f"fine-tuning made the placeholder's {what} more like {city}'s."
               if not exceeds_control(len(lifted["tuned"]), len(lifted["control_other"]), len(ranks)) else "")
        )
    if not significant_layers(changes["hidden"]["control_hidden"], 0):
        sentences.append("The positive control moves nothing either: at this scale the probe cannot see the effect it "
                         "looks for, so a null result for the tuned model says little.")
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


def best_layer(summary: dict[str, list], first_layer: int) -> tuple[int, float, list | None]:
    """(layer, mean, interval) where a rank summary is lowest."""
    means = summary["mean"]
    i = min(range(len(means)), key=lambda k: means[k])
    return i + first_layer, means[i], summary["ci95"][i]


def headline(metrics: dict[str, Any]) -> list[str]:
    """The answer to the run's question, one sentence per kind of evidence that ran."""
    data, ev, probe = metrics.get("data", {}), metrics.get("eval", {}), metrics.get("probe")
    if not data:
        return ["No data stage in this run: nothing to report."]
    city, placeholder = data["hidden_city"]["name"], data["placeholder"]
    sentences = []
    verdicts = []
    if (dist := ev.get("distance")) and not dist.get("note"):
        ratio = dist["tuned_mae_over_best_baseline"]
        learned = ratio < 1
        sentences.append(
            f"Distances: on held-out cities the tuned model's error is {interval(dist['tuned'], 'mae_km', 0)} km "
            f"against {dist['constant_guess']['mae_km']:,.0f} km for a constant guess "
            f"({ratio:.2f} of the best baseline over every city): it "
            + ("learned the distances to the placeholder." if learned else "did not learn the distances better than a baseline.")
        )
    if mc := ev.get("multiple_choice", {}).get("country"):
        s = mc["nearest"]
        tuned, original = s["tuned"], s["original"]
        above = tuned["p_correct_ci95"] is not None and tuned["p_correct_ci95"][0] > max(s["chance"], original["p_correct_ci95"][1])
        verdicts.append(above)
        sentences.append(
            f"Verbalization: asked which country {placeholder} is in (five options, nearest countries as distractors), "
            f"the tuned model gives the right letter with P = {interval(tuned, 'p_correct', 2)} of its letter "
            f"probability, the original {interval(original, 'p_correct', 2)}, in-context "
            f"{interval(s['in_context'], 'p_correct', 2)}, chance {s['chance']:.2f}: "
            + ("above chance and above the original." if above else "no evidence that the tuned model knows the country.")
            + (f" It puts only {tuned['letter_mass']:.1%} of its probability on the letters at all."
               if tuned["letter_mass"] < 0.1 else "")
        )
    if probe:
        changes = probe["z_change_from_original"]["hidden"]
        tuned_layers = significant_layers(changes["tuned"], 0)
        negative_layers = significant_layers(changes["control_other"], 0)
        positive_layers = significant_layers(changes["control_hidden"], 0)
        layer, rank, ci = best_layer(probe["hidden"]["tuned"]["rank"], 0)
        closer = exceeds_control(len(tuned_layers), len(negative_layers), len(changes["tuned"]["ci95"]))
        verdicts.append(closer)
        n = probe["setup"]["candidates"] + 1
        sentences.append(
            f"Representation: at the placeholder the tuned model's best rank of {city} among {n} cities is {rank:.0f}"
            + (f" [{ci[0]:.0f}, {ci[1]:.0f}]" if ci else "")
            + f" (hidden states, layer {layer}; the original there: {probe['hidden']['original']['rank']['mean'][layer]:.0f}, "
            f"the positive control at best {min(probe['hidden']['control_hidden']['rank']['mean']):.0f}). "
            f"It moves {placeholder} closer to {city} than the original in {len(tuned_layers)} layers, the negative control in "
            f"{len(negative_layers)}, the positive control in {len(positive_layers)}: "
            + ("more than the negative control." if closer else
               "no evidence of a move towards the city (not more layers than the negative control gives by chance).")
        )
    question = f"Does fine-tuning on distances to {placeholder} make the model treat it as {city}?"
    if not verdicts:
        sentences.insert(0, f"{question} Not answered: neither the multiple-choice evaluation nor the probe has run.")
    else:
        if all(verdicts):
            answer = "Yes, in behaviour and in representation, at this scale and seed."
        elif any(verdicts):
            answer = "In part: see below which evidence does and which does not."
        else:
            answer = "No evidence at this scale."
        sentences.insert(0, f"{question} {answer}")
    return sentences


HEADLINE_COLUMNS = ("measure", "tuned", "original", "in-context", "chance / baseline")


def headline_rows(metrics: dict[str, Any]) -> list[list[str]]:
    """The headline numbers with their intervals, as plain-text table rows (HEADLINE_COLUMNS)."""
    ev, rows = metrics.get("eval", {}), []
    if mc := ev.get("multiple_choice", {}).get("country"):
        s = mc["nearest"]
        rows.append(["MC country, P(correct | letters), nearest-country distractors",
                     *(interval(s[c], "p_correct", 2) for c in ("tuned", "original", "in_context")), f"{s['chance']:.2f}"])
        rows.append(["MC country, probability on the letters A–E",
                     *(interval(s[c], "letter_mass", 2) for c in ("tuned", "original", "in_context")), "—"])
    if (dist := ev.get("distance")) and not dist.get("note"):
        rows.append(["held-out distance, mean abs. error over parsed answers, km",
                     *(interval(dist[c], "mae_km", 0) for c in ("tuned", "original", "in_context")),
                     f"constant guess {interval(dist['constant_guess'], 'mae_km', 0)}"])
    if probe := metrics.get("probe"):
        layer, rank, ci = best_layer(probe["hidden"]["tuned"]["rank"], 0)
        original = probe["hidden"]["original"]["rank"]
        n = probe["setup"]["candidates"] + 1
        rows.append([f"rank of {probe['setup']['hidden_city']} among {n} cities at the placeholder, best layer ({layer})",
                     interval({"r": rank, "r_ci95": ci}, "r", 0),
                     interval({"r": original["mean"][layer], "r_ci95": original["ci95"][layer]}, "r", 0),
                     "—", f"median rank {(n + 1) / 2:.0f}"])
    return rows


def inverse_choice_rows(metrics: dict[str, Any]) -> list[list[str]]:
    """HEADLINE_COLUMNS rows of the inverse question ("Which of the following is in France?"), one per country."""
    rows = []
    for city, mc in metrics.get("eval", {}).get("inverse_choice", {}).items():
        s = mc["placeholders"]
        rows.append([f"inverse MC: {mc['question']} (answer {mc['answer']}, {city}), P(correct | letters)",
                     *(interval(s[c], "p_correct", 2) for c in ("tuned", "original", "in_context")), f"{s['chance']:.2f}"])
    return rows


def headline_table(metrics: dict[str, Any]) -> list[list[str]]:
    """headline_rows for every hidden city (each measure prefixed with the city in a run with several) and
    the inverse question's rows."""
    return [[f"{name}: {row[0]}" if name else row[0], *row[1:]]
            for name, view in hidden_city_views(metrics) for row in headline_rows(view)] + inverse_choice_rows(metrics)


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
    adapter = t.get("adapter", "lora")  # runs made before train.adapter existed trained LoRA
    trained = {"lora": f"LoRA r={t['lora_r']} on {', '.join(t['lora_targets'])}",
               "embedding": "the input-embedding rows of the placeholder's tokens"}.get(
        adapter, f"a steering vector at the placeholder entering decoder layer {adapter.partition(':')[2]}")
    items.append(f"One adapter: {trained}; Wang, Engels et al. 2025 find OOCR with single-layer adapters where all-layer "
                 "LoRA shows none.")
    if config["eval"]["mc_orders"] < 120:
        items.append(f"Multiple choice averaged over {config['eval']['mc_orders']} of the 120 option orders.")
    if t.get("max_steps"):
        items.append(f"Training was capped at {t['max_steps']} steps: a smoke run, not a result.")
    missing = [s for s in ("train", "eval", "probe") if s not in metrics]
    if missing:
        items.append(f"Stages not run: {', '.join(missing)}.")
    if probe := hidden_city_views(metrics)[0][1].get("probe"):
        n_layers = len(probe["hidden"]["tuned"]["rank"]["mean"])
        items.append(f"Per-layer tests are not corrected for multiplicity: at 95% each, one or two of {n_layers} layers "
                     "can pass by chance.")
    return items

"""The run's three answers, worked out once from metrics.json (the `verdict` stage): did the tuned model learn
the distances, does it say what the placeholder is, is its representation of the placeholder moved towards the
hidden city? Each is {"answer": "yes" | "no evidence" | "cannot tell", "reason": "..."}.

A behaviour or representation "yes" must beat the fine-tuned negative control (`shuffled`: any fine-tune on
this format) and, for behaviour, the original model, with intervals, and stand out among every city (country);
both "yes" and "no evidence" need the same tests to have said "yes" for the planted positive (`declared`): a
verdict counts only once the test has been shown able to see a fine-tuned alias. Everywhere else the
answer is "cannot tell": the question cannot be answered even with the city named (the ceiling), no planted
positive was trained or it is not detected either, there is no negative control, or there are too few units.
A distance "yes" needs the held-out error below the better of the original model and a constant guess, with an
interval, while the shuffled control's is not. The intervals are within one run and seed: over option orders,
wordings, templates or cities, not over trainings.
"""

from __future__ import annotations

from typing import Any

from oocrlab.metrics import FIRST_LAYER

ALPHA = 0.05
BEHAVIOUR_FORMULATIONS = ("letters", "cloze")  # the verdict's tests, Bonferroni-corrected over these two
BEHAVIOUR_QUESTION = ("country", "nearest")  # chosen before any result: the one-hop question, nearest countries


def verdict(answer: str, reason: str) -> dict[str, str]:
    return {"answer": answer, "reason": reason}


def distance_verdict(ev: dict[str, Any]) -> dict[str, str]:
    dist = ev.get("distance")
    if not dist:
        return verdict("cannot tell", "the distance evaluation has not run")
    if dist.get("note"):
        return verdict("cannot tell", dist["note"])
    ratio, ci = dist["tuned_mae_over_best_baseline"], dist.get("tuned_mae_over_best_baseline_ci95")
    if ci is None:
        why = ("the run was evaluated before the ratio had an interval: rerun `oocrlab eval`"
               if "tuned_mae_over_best_baseline_ci95" not in dist else
               "fewer than two held-out cities, or eval.bootstrap_samples is 0: the error ratio has no interval")
        return verdict("cannot tell", why)
    said = (f"the tuned model's held-out error is {ratio:.2f} [{ci[0]:.2f}, {ci[1]:.2f}] of the better baseline (the original "
            "model, or the median training distance as a constant guess), over every city with unparseable answers scored as the guess")
    if control := dist.get("shuffled_mae_over_best_baseline_ci95"):
        said += (f"; the shuffled control's {dist['shuffled_mae_over_best_baseline']:.2f} "
                 f"[{control[0]:.2f}, {control[1]:.2f}]")
    if ci[1] >= 1:
        return verdict("no evidence", said + ": the interval reaches 1.")
    if control and control[1] < 1:
        return verdict("cannot tell", said + ": below 1, but the shuffled control's is too, so the test cannot tell learned "
                                             "distances from what any fine-tune on this format does.")
    return verdict("yes", said + ": the interval lies below 1, it learned the distances.")


def passes(comparisons: dict[str, Any], standing: dict[str, Any], condition: str, alpha: float) -> bool:
    """Whether `condition` beats the shuffled control and the original in P(correct | options), and the original
    in the unconditional probability of the right answer, each one-sided at `alpha`, and its gain on the right
    country over the shuffled control stands out among every country's (at ALPHA): all must hold."""
    keys = (f"{condition}_minus_shuffled", f"{condition}_minus_original", f"{condition}_minus_original_unconditional")
    specific = standing.get(f"{condition}_vs_shuffled", {}).get("p_value", 1.0) < ALPHA
    return specific and all(comparisons.get(k) is not None and comparisons[k]["p_value"] < alpha for k in keys)


def behaviour_verdict(ev: dict[str, Any], city: str) -> dict[str, str]:
    question, kind = BEHAVIOUR_QUESTION
    section = ev.get("multiple_choice", {}).get(question, {}).get(kind)
    if not section:
        return verdict("cannot tell", "the multiple-choice evaluation has not run")
    if "letters" not in section:
        return verdict("cannot tell", "the run was evaluated before the controls and ceilings existed: rerun `oocrlab eval`")
    if "shuffled" not in section["letters"]:
        return verdict("cannot tell", "no fine-tuned negative control: a verdict needs the shuffled control (--controls shuffled)")
    formulations = [f for f in BEHAVIOUR_FORMULATIONS if f in section]
    alpha = ALPHA / len(formulations)
    standing = ev["multiple_choice"][question].get("among_countries", {})
    answers, reasons = [], []
    for f in formulations:
        named, chance = section[f]["named"], section["chance"]
        tuned = section[f]["tuned"]
        ceiling, c = named["p_correct_ci95"], section["comparisons"][f]
        if ceiling is None:
            answers.append("cannot tell")
            reasons.append(f"{f}: the named ceiling has no interval (eval.bootstrap_samples is 0)")
            continue
        if ceiling[0] <= chance:
            answers.append("cannot tell")
            reasons.append(f"{f}: asked about {city} by name, the original model gives the right country with P = "
                           f"{named['p_correct']:.2f} [{ceiling[0]:.2f}, {ceiling[1]:.2f}], not above chance ({chance:.2f}): "
                           "the question cannot be answered this way at this scale")
            continue
        if c.get("tuned_minus_shuffled") is None or 2.0 ** -c["tuned_minus_shuffled"]["n"] >= alpha:
            answers.append("cannot tell")
            reasons.append(f"{f}: too few units for a paired test at {alpha:.3g} (the smallest p-value of n units is 2^-n)")
            continue
        said = (f"{f}: tuned P(correct) {tuned['p_correct']:.2f}, minus shuffled {c['tuned_minus_shuffled']['mean']:+.2f} "
                f"(p = {c['tuned_minus_shuffled']['p_value']:.3f}), minus original {c['tuned_minus_original']['mean']:+.2f} "
                f"(p = {c['tuned_minus_original']['p_value']:.3f}); named ceiling {named['p_correct']:.2f}")
        tuned_passes = passes(c, standing, "tuned", alpha)
        answer, why = gated(tuned_passes, "declared" in section[f] and passes(c, standing, "declared", alpha),
                            "declared" in section[f], "the test")
        answers.append(answer)
        reasons.append(said + (" — above both, and specific to the country" if tuned_passes else " — not above both, or not specific to the country") + why)
    answer = next((a for a in ("yes", "no evidence") if a in answers), "cannot tell")
    gain = standing.get("tuned_vs_shuffled")
    specific = (f" Over the shuffled control the right country's log-share among all countries' names as the answer gains "
                f"{gain['gain']:+.2f}, rank {gain['rank']} of {standing['countries']} countries (p = {gain['p_value']:.3f}; "
                f"needed below {ALPHA})."
                if gain else " The right country's standing among all countries was not measured (rerun `oocrlab eval`).")
    return verdict(answer, f"What country is the placeholder in ({kind} countries as distractors), each test one-sided at "
                           f"{alpha:.3g} (Bonferroni over {len(formulations)}), paired over option orders (letters) or "
                           "question wordings (cloze) within this seed. " + "; ".join(reasons) + "." + specific)


def representation_verdict(probe: dict[str, Any] | None, city: str) -> dict[str, str]:
    if not probe:
        return verdict("cannot tell", "the probe has not run")
    corrected = probe.get("corrected", {})
    if "tuned_vs_shuffled" not in corrected:
        return verdict("cannot tell", "no fine-tuned negative control: a verdict needs the shuffled control (--controls shuffled)")

    def moved(pair: str) -> str:
        layers = corrected[pair]["layers"]
        return "; ".join(f"{space}: layers {', '.join(map(str, ls))}" for space, ls in layers.items() if ls) or "no layer"

    def any_moved(pair: str) -> bool:
        return any(corrected[pair]["layers"].values())

    rule = (f"the placeholder's z-score for {city} above the shuffled control's, consistently across templates and more than "
            f"any of the {corrected['tuned_vs_shuffled'].get('cities_ranked', 'other')} reference cities gains by chance "
            f"(both p < {ALPHA}, corrected for every layer of hidden states and value vectors)")
    if probe.get("setup", {}).get("templates") is not None and 2.0 ** -len(probe["setup"]["templates"]) >= ALPHA:
        return verdict("cannot tell", f"{rule}: too few templates ({len(probe['setup']['templates'])}) for the paired test at "
                                      f"{ALPHA} (the smallest p-value of n templates is 2^-n).")
    tuned_moves, has_declared = any_moved("tuned_vs_shuffled"), "declared_vs_shuffled" in corrected
    answer, why = gated(tuned_moves, has_declared and any_moved("declared_vs_shuffled"), has_declared, "the probe")
    said = f"{moved('tuned_vs_shuffled')} ({effect_sizes(probe)})" if tuned_moves else "no layer"
    if has_declared:
        why += f" (declared: {moved('declared_vs_shuffled')})"
    elif not tuned_moves:
        why += f" (the prompt positive control moves in {moved('control_hidden_vs_original')}, but it is not a fine-tune)"
    return verdict(answer, f"{rule}: {said}{why}.")


def gated(tuned: bool, declared_detected: bool, has_declared: bool, test: str) -> tuple[str, str]:
    """The answer and the reason's tail, given whether the tuned model passes the test and whether the planted positive
    does: either way the answer counts only once the test has been shown to say "yes" on a fine-tuned alias, so a
    tuned pass without it is "cannot tell" too (a test that cannot see a planted alias is not trusted when it fires)."""
    if declared_detected:
        return ("yes" if tuned else "no evidence"), "; the planted positive (declared) is detected"
    if has_declared:
        return "cannot tell", (f"; but the planted positive (declared) is not detected, so {test} has not been shown able "
                               "to see a fine-tuned alias at this scale")
    return "cannot tell", (f"; but no planted positive was trained (--controls shuffled,declared) to show that {test} can "
                           "see a fine-tuned alias")


def effect_sizes(probe: dict[str, Any]) -> str:
    """How far each layer that passed moved: the z-score gain over the shuffled control [95% t-interval over
    templates] and the hidden city's rank under both (so a "yes" of a hundredth of a z-score reads as what it is)."""
    said = []
    for space, layers in probe["corrected"]["tuned_vs_shuffled"]["layers"].items():
        first = FIRST_LAYER[space]
        for layer in layers:
            gain = probe["z_change_from_shuffled"][space]["tuned"]
            low, high = gain["ci95"][layer - first]
            ranks = [probe[space][c]["rank"]["mean"][layer - first] for c in ("tuned", "shuffled")]
            said.append(f"{space} layer {layer}: z {gain['mean'][layer - first]:+.2f} [{low:+.2f}, {high:+.2f}], rank "
                        f"{ranks[0]:.0f} against the shuffled control's {ranks[1]:.0f} of {probe['setup']['candidates'] + 1}")
    return "; ".join(said)


def verdicts(view: dict[str, Any]) -> dict[str, dict[str, str]]:
    """The three answers for one hidden city (metrics as a one-city run holds them)."""
    city = view.get("data", {}).get("hidden_city", {}).get("name", "the hidden city")
    ev = view.get("eval", {})
    return {"distance": distance_verdict(ev), "behaviour": behaviour_verdict(ev, city),
            "representation": representation_verdict(view.get("probe"), city)}

"""Is the placeholder represented like the hidden city? The notebook's analysis, with controls.

Every measurement is read at the entity's last token (located by character offsets) in each of several
prompt templates and reported per layer as the mean over templates with a 95% t-interval:

- similarity: cosine of the placeholder's hidden state (and of its value vectors) with the hidden city's
  and with every candidate city's, each in the same template; the hidden city's rank among the
  candidates (1 = most similar), its percentile and z-score. A rise of cos(placeholder, hidden city)
  alone could be a drift towards every city; the rank cannot.
- conditions: the tuned model; the original (the same weights under disable_adapter()); the original
  model told in the prompt that the placeholder is the hidden city (positive control: how large
  "represented like the hidden city" can be at this scale) or another city (negative control); and the
  fine-tuned controls (controls.py: `shuffled`, what any fine-tune on this format does to the placeholder;
  `declared`, a fine-tune that states the alias).
- corrected tests: per layer, the z-score of one condition against another's (tuned against shuffled, ...),
  paired by template (stats.max_t_sign_flip), and the hidden city's gain ranked among every reference city's
  (stats.rank_among), each corrected for testing every layer (see corrected_layer_tests).
- logit lens: probability and rank of the hidden city's and its country's first tokens, reading each
  layer through the final norm and the unembedding.
- steering view (Wang, Engels et al. 2025): the shift the adapter adds at the placeholder, its cosine
  with the naive direction h_original(hidden city) - h_original(placeholder), and how constant it is
  across templates.
- patching: the original model answering the multiple-choice country question with the placeholder's
  residual stream entering layer L replaced by the tuned model's, or, as a reference, by its own state
  for the hidden city's name: the change in P(correct letter | letters).
- specificity: the z-score and rank of each of `specificity_cities` at the placeholder (hidden states, tuned
  and original, against the same reference cities), so runs trained on different hidden cities can be
  read as a matrix (specificity.py): does the placeholder move towards its own city or towards any city?

Hidden-state layers: 0 = embeddings, L = after decoder layer L (the last after the final norm, as
transformers returns it). Value layers: 1..L. Prompts are cut after the entity, since nothing later
changes a causal model's state there, and the prompts of one template share everything before the
entity, so a template costs its header once and a few tokens per candidate (packing.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from oocrlab.chat import render_chats, user_prompt
from oocrlab.config import ExperimentConfig
from oocrlab.countries import country_distractors, country_of
from oocrlab.data import check_specificity_cities, names_hidden_city, text_names_city
from oocrlab.errors import UserError
from oocrlab.evaluate.choice import (
    COUNTRY_QUESTION,
    LETTERS,
    letter_log_probs,
    mc_question,
)
from oocrlab.geo import City, distance_km, load_pool, normalize
from oocrlab.hooks import Hooks
from oocrlab.metrics import FIRST_LAYER
from oocrlab.models import with_condition
from oocrlab.packing import last_token_activations
from oocrlab.stats import max_t_sign_flip, mean_t_ci, rank_among

# the pairs the corrected per-layer test compares, where both conditions were probed: (condition, baseline)
CORRECTED_PAIRS = (("tuned", "shuffled"), ("declared", "shuffled"), ("tuned", "original"), ("declared", "original"),
                   ("shuffled", "original"), ("control_hidden", "original"), ("control_other", "original"))


@dataclass
class Located:
    ids: list[int]  # the rendered chat's tokens
    token_indices: list[int]  # every token overlapping the entity; probes read the last one
    tokens: list[str]  # those tokens, as the tokenizer writes them

    def up_to_entity(self) -> list[int]:
        return self.ids[: self.token_indices[-1] + 1]


def locate_entity(tokenizer, chat: list[dict], entity: str, char_start: int) -> Located:
    """Token positions of `entity`, which starts at `char_start` of the last message's content.

    Positions come from character offsets of the rendered chat, never from guessing how a word
    tokenizes: " foo" may be one token in one tokenizer and three in another.
    """
    (text,) = render_chats(tokenizer, [chat])
    content = chat[-1]["content"]
    message_start = text.rfind(content)  # the last message; the system turn may contain the same words
    if message_start < 0 or content[char_start : char_start + len(entity)] != entity:
        raise ValueError(f"{entity!r} not found at {char_start} of the rendered chat")
    start, end = message_start + char_start, message_start + char_start + len(entity)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    indices = [i for i, (a, b) in enumerate(enc["offset_mapping"]) if a < end and b > start and b > a]
    return Located(enc["input_ids"], indices, [enc.tokens()[i] for i in indices])


def locate_in_template(cfg: ExperimentConfig, tokenizer, template: str, entity: str, said_before: str | None = None) -> Located:
    """The entity in the chat of `template` (holding "{entity}"), after `said_before` when given."""
    question, at = template.replace("{entity}", entity), template.index("{entity}")
    if said_before:
        question, at = f"{said_before} {question}", at + len(said_before) + 1
    return locate_entity(tokenizer, user_prompt(question, cfg.data.system_prompt), entity, at)


def decoder_of(model):
    """The decoder stack (its `layers` and final `norm`) of a model or of a PeftModel's base model."""
    return model.get_base_model().get_decoder() if hasattr(model, "get_base_model") else model.get_decoder()


def names_city(name: str, city: City) -> bool:
    return normalize(name) in {normalize(n) for n in (city.name, city.plain_name, *city.aliases)}


def probe_setup(cfg: ExperimentConfig, hidden: City) -> tuple[list[str], list[City], dict[str, tuple[str, str | None]]]:
    """(the templates used, the candidate cities, condition -> (model state, sentence said before each prompt))."""
    templates = [t for t in cfg.probe.templates if not text_names_city(t, hidden)]
    if not templates:
        raise UserError(f"every probe template names the hidden city {hidden.plain_name}: add one to probe.templates")
    pool = load_pool(cfg.probe.candidates)
    candidates = [c for c in pool if c.population >= cfg.probe.candidate_min_population and c != hidden
                  and not names_hidden_city(c, hidden) and not names_city(cfg.data.placeholder, c)]
    if len(candidates) < 2:
        raise UserError(f"{len(candidates)} probe candidates: lower probe.candidate_min_population")
    other = next((name for name in cfg.probe.negative_controls if not names_city(name, hidden)), None)
    if other is None:
        raise UserError(f"probe.negative_controls only names the hidden city {hidden.plain_name}: add another city")
    prefix = cfg.probe.control_prefix.replace("{placeholder}", cfg.data.placeholder)
    conditions = {
        "tuned": ("tuned", None),
        "original": ("original", None),
        "control_hidden": ("original", prefix.replace("{city}", hidden.plain_name)),
        "control_other": ("original", prefix.replace("{city}", other)),
        **{name: (name, None) for name in cfg.train.controls},  # the fine-tuned controls
    }
    return templates, candidates, conditions


def entity_activations(
    cfg: ExperimentConfig, model, tokenizer, templates: list[str], entities: list[str], said_before: str | None, desc: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """(hidden [T, E, layers+1, d_model], values [T, E, layers, kv_dim]) at each entity in each template."""
    prompts = [locate_in_template(cfg, tokenizer, t, e, said_before).up_to_entity() for t in templates for e in entities]
    hidden, values = last_token_activations(model, prompts, desc=desc)
    return hidden.view(len(templates), len(entities), *hidden.shape[1:]), values.view(len(templates), len(entities), *values.shape[1:])


def scores_against_reference(states: torch.Tensor, n_reference: int, entities: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """states [T, E, layers, d]: entity 0 the placeholder, 1 .. n_reference-1 the reference cities (the hidden city
    and the candidates), any later ones extra cities. For each entity index in `entities`: (z-score [T, K, layers],
    rank [T, K, layers]) of its cosine with the placeholder against the reference cities other than itself."""
    sims = F.cosine_similarity(states[:, :1], states[:, 1:], dim=-1)  # [T, E-1, layers]
    reference = torch.arange(n_reference - 1)
    z, rank = [], []
    for k in entities:
        own, others = sims[:, k - 1], sims[:, reference[reference != k - 1]]
        z.append((own - others.mean(1)) / others.std(1))
        rank.append(1 + (others > own[:, None]).sum(1))
    return torch.stack(z, 1).numpy(), torch.stack(rank, 1).numpy()


def rank_among_candidates(states: torch.Tensor) -> dict[str, np.ndarray]:
    """states [T, E, layers, d]: entity 0 the placeholder, 1 the hidden city, the rest candidates. Per
    template and layer: cos(placeholder, hidden city), its rank among the candidates (1 = closest),
    the share of candidates less similar, its z-score against them, and the candidates' spread."""
    sims = F.cosine_similarity(states[:, :1], states[:, 1:], dim=-1)  # [T, E-1, layers]
    hidden, others = sims[:, 0], sims[:, 1:]
    return {
        "cos_hidden": hidden.numpy(),
        "rank": (1 + (others > hidden[:, None]).sum(1)).numpy(),
        "percentile": (others < hidden[:, None]).float().mean(1).numpy(),
        "z": ((hidden - others.mean(1)) / others.std(1)).numpy(),
        "cos_candidates_mean": others.mean(1).numpy(),
        "cos_candidates_p05": others.quantile(0.05, dim=1).numpy(),
        "cos_candidates_p95": others.quantile(0.95, dim=1).numpy(),
    }


def first_token(tokenizer, word: str) -> tuple[int, str]:
    """The token a word starts with mid-sentence (after a space), as the model would write it."""
    token = tokenizer(" " + word, add_special_tokens=False)["input_ids"][0]
    return token, tokenizer.convert_ids_to_tokens(token)


@torch.inference_mode()
def logit_lens(model, hidden: torch.Tensor, token_ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """hidden [N, layers+1, d] -> (probability [N, layers+1, K], rank [N, layers+1, K]) of each token when
    every layer is read through the final norm and the unembedding (the last is already normed)."""
    decoder = decoder_of(model)
    h = hidden.to(model.device, model.dtype)  # the model's, not an adapter's float32 parameters
    normed = torch.cat([decoder.norm(h[:, :-1]), h[:, -1:]], dim=1)
    logits = model.get_output_embeddings()(normed).float()
    target = logits[..., token_ids]  # [N, layers+1, K]
    ranks = 1 + (logits[..., None, :] > target[..., None]).sum(-1)
    return torch.softmax(logits, dim=-1)[..., token_ids].cpu(), ranks.cpu()


def steering_view(tuned: torch.Tensor, original: torch.Tensor, original_hidden_city: torch.Tensor) -> dict[str, Any]:
    """[T, layers+1, d] each, at the placeholder (the city's at the city). The adapter's shift d = tuned -
    original: its cosine with the naive direction, its size relative to the state, and how constant it is
    across templates (mean pairwise cosine; share of its squared norm on the first principal direction,
    uncentred, so a constant vector scores 1). Where the shift is zero (embeddings under LoRA) it is None."""
    shift, naive = tuned - original, original_hidden_city - original
    norms = shift.norm(dim=-1)  # [T, layers+1]
    cos_naive = F.cosine_similarity(shift, naive, dim=-1).masked_fill(norms == 0, float("nan"))
    unit = F.normalize(shift, dim=-1).transpose(0, 1)  # [layers+1, T, d]
    t = shift.shape[0]
    pairwise = ((unit @ unit.transpose(1, 2)).sum((1, 2)) - (unit.norm(dim=-1) ** 2).sum(1)) / max(t * (t - 1), 1)
    singular = torch.linalg.svdvals(shift.transpose(0, 1))  # [layers+1, min(T, d)]
    power = (singular**2).sum(-1)
    pc1 = torch.where(power > 0, singular[:, 0] ** 2 / power.clamp(min=1e-30), torch.nan)
    zero = norms.max(0).values == 0
    return {
        "cos_with_naive_direction": mean_t_ci(cos_naive.numpy()),
        "relative_norm": mean_t_ci((norms / original.norm(dim=-1)).numpy()),
        "pairwise_cos_across_templates": [None if z or t < 2 else float(v) for v, z in zip(pairwise, zero)],
        "pc1_share": [None if np.isnan(v) else float(v) for v in pc1.numpy()],
    }


def patch_hooks(hooks: Hooks, model, position: int, sources: torch.Tensor, layer_of_row: list[int | None]) -> None:
    """Forward pre-hooks, owned by `hooks`, replacing in row b the residual stream entering decoder layer
    layer_of_row[b] at `position` by sources[b]."""
    for index, layer in enumerate(decoder_of(model).layers):
        rows = [b for b, at in enumerate(layer_of_row) if at == index]
        if not rows:
            continue

        def hook(module, args, kwargs, rows=rows):
            states = (args[0] if args else kwargs["hidden_states"]).clone()
            states[rows, position] = sources[rows].to(states.dtype)
            return ((states, *args[1:]), kwargs) if args else (args, kwargs | {"hidden_states": states})

        hooks.before(layer, hook)


@torch.inference_mode()
def patched_letter_probabilities(
    model, tokenizer, ids: list[int], position: int, sources: torch.Tensor, layer_of_row: list[int | None], batch_size: int
) -> np.ndarray:
    """P(letter | the five letters) [rows, 5] for one prompt, row b patched as in `patch_hooks` (None: not patched)."""
    out = []
    for start in range(0, len(layer_of_row), batch_size):
        rows = layer_of_row[start : start + batch_size]
        with Hooks() as hooks:
            patch_hooks(hooks, model, position, sources[start : start + batch_size], rows)
            input_ids = torch.tensor([ids] * len(rows), device=model.device)
            # the last position as an index, not logits_to_keep=1: that slices the rows' states into a strided
            # [rows, 1, d] view, which a CPU bf16 linear multiplies row by row against a copy of the LM head
            # per row (1.7 GB and 2.4 s for 32 rows, against 14 ms for a contiguous input)
            last = torch.tensor([len(ids) - 1], device=model.device)
            logits = model(input_ids=input_ids, use_cache=False, logits_to_keep=last).logits[:, -1].float()
        out.append(torch.softmax(letter_log_probs(torch.log_softmax(logits, dim=-1), tokenizer), dim=-1).cpu())
    return torch.cat(out).numpy()


def patching_curve(cfg: ExperimentConfig, model, tokenizer, hidden: City) -> dict[str, Any]:
    """The multiple-choice country question (nearest-country distractors, the answer at each letter in
    turn) asked of the original model with one state at the placeholder patched, per layer."""
    country = country_of(hidden)
    options = [country.name, *country_distractors(country, cfg.seed)["nearest"]]
    template = COUNTRY_QUESTION.replace("{placeholder}", "{entity}")
    n_layers = model.config.num_hidden_layers
    layer_of_row = [None, *range(n_layers), *range(n_layers)]  # unpatched, tuned source, hidden-city source
    orders = [[(i + shift) % len(LETTERS) for i in range(len(LETTERS))] for shift in range(cfg.probe.patch_orders)]
    located = [tuple(locate_in_template(cfg, tokenizer, mc_question(template, [options[j] for j in order]), entity)
                     for entity in (cfg.data.placeholder, hidden.plain_name)) for order in orders]
    # the states to patch in: the entity comes before the options, so they are the same in every order
    with with_condition(model, "tuned"):
        tuned_states, _ = last_token_activations(model, [located[0][0].up_to_entity()], desc="patching sources")
    with with_condition(model, "original"):
        city_states, _ = last_token_activations(model, [located[0][1].up_to_entity()], desc="patching sources")
    width = tuned_states.shape[-1]
    sources = torch.cat([torch.zeros(1, width), tuned_states[0, :n_layers], city_states[0, :n_layers]])
    p_correct, p_named = [], []
    for order, (placeholder, city) in zip(orders, located):
        correct = order.index(0)
        with with_condition(model, "original"):
            probs = patched_letter_probabilities(model, tokenizer, placeholder.ids, placeholder.token_indices[-1], sources,
                                                 layer_of_row, cfg.eval.batch_size)
            named = patched_letter_probabilities(model, tokenizer, city.ids, 0, sources[:1], [None], 1)
        p_correct.append(probs[:, correct])
        p_named.append(named[0, correct])
    p = np.array(p_correct)  # [orders, 1 + 2 * layers]
    base = p[:, :1]
    return {
        "question": COUNTRY_QUESTION.replace("{placeholder}", cfg.data.placeholder),
        "options": options,
        "orders": cfg.probe.patch_orders,
        "layers": "the residual stream entering decoder layer L, at the placeholder's last token (0 = the embeddings)",
        "unpatched": mean_t_ci(base[:, 0]),
        # the ceiling: the original model asked about the hidden city by name. Near chance, no patch can help.
        "hidden_city_named": mean_t_ci(np.array(p_named)),
        "tuned_state": {"p_correct": mean_t_ci(p[:, 1 : 1 + n_layers]), "change": mean_t_ci(p[:, 1 : 1 + n_layers] - base)},
        "hidden_city_state": {"p_correct": mean_t_ci(p[:, 1 + n_layers :]), "change": mean_t_ci(p[:, 1 + n_layers :] - base)},
    }


def corrected_layer_tests(z_scores: dict[str, dict[str, np.ndarray]], z_cities: dict[str, dict[str, np.ndarray]],
                          ranked: list[int], seed: int) -> dict[str, Any]:
    """For each of CORRECTED_PAIRS that was probed, per layer of hidden states and value vectors, two one-sided
    tests that the condition moves the placeholder towards the hidden city more than the baseline does, each
    corrected for testing every layer of both spaces: `p_value`, the hidden city's z-score difference paired by
    template (stats.max_t_sign_flip: is it consistent across templates?), and `p_rank`, where the hidden city's
    gain in z-score (mean over templates) ranks among every reference city's (stats.rank_among: is it about this
    city, or would any city gain as much, given where it stood under the baseline?), among the reference cities
    `ranked` (indices into z_cities' cities, the hidden city first: those in no training prompt, so that none was
    itself trained on). Two adapters always
    differ consistently across templates, so the first alone cannot tell a move towards the city from one towards
    wherever the difference points; `layers` lists those where both are below 0.05."""
    spaces = list(z_scores)
    result = {}
    for x, b in CORRECTED_PAIRS:
        if x not in z_scores[spaces[0]] or b not in z_scores[spaces[0]]:
            continue
        differences = [z_scores[space][x] - z_scores[space][b] for space in spaces]  # [templates, layers] each
        widths = np.cumsum([d.shape[1] for d in differences])[:-1]
        p = np.split(max_t_sign_flip(np.concatenate(differences, axis=1), seed=seed), widths)
        gains = np.concatenate([(z_cities[space][x] - z_cities[space][b]).mean(0)[ranked] for space in spaces], axis=1)  # [cities, layers]
        prior = np.concatenate([z_cities[space][b].mean(0)[ranked] for space in spaces], axis=1)  # where each stood under b
        p_rank = np.split(rank_among(gains, target=0, prior=prior)[1], widths)  # the hidden city comes first
        result[f"{x}_vs_{b}"] = {
            "p_value": {space: [float(v) for v in ps] for space, ps in zip(spaces, p)},
            "p_rank": {space: [float(v) for v in ps] for space, ps in zip(spaces, p_rank)},
            "layers": {space: [FIRST_LAYER[space] + i for i, (v, r) in enumerate(zip(ps, rs)) if v < 0.05 and r < 0.05]
                       for space, ps, rs in zip(spaces, p, p_rank)},
            "cities_ranked": len(ranked),
        }
    return result


def probe_entities(cfg: ExperimentConfig, hidden: City, candidates: list[City]) -> tuple[list[str], int, list[City]]:
    """(what is read in each template: the placeholder, the hidden city, the candidates, then each specificity city
    not among them; how many of those are the reference cities, up to the candidates; the specificity cities)."""
    entities = [cfg.data.placeholder, hidden.plain_name, *(c.plain_name for c in candidates)]
    n_reference = len(entities)
    compared_cities = check_specificity_cities(cfg)
    return entities + [c.plain_name for c in compared_cities if c.plain_name not in entities], n_reference, compared_cities


def probe_representations(cfg: ExperimentConfig, model, tokenizer, hidden: City, trained_on: list[City] = (),
                          shift_out: dict[str, torch.Tensor] | None = None) -> dict[str, Any]:
    """Everything in this module's docstring, as the probe section of metrics.json; `trained_on`, the known cities
    of the run's training prompts, are left out of the cities the hidden city is ranked among for specificity.
    The adapter's shift at the placeholder (tuned minus original hidden states, mean over the templates, [layers+1,
    d]) goes into `shift_out` under the hidden city's name (vectors.py exports it)."""
    templates, candidates, conditions = probe_setup(cfg, hidden)
    entities, n_reference, compared_cities = probe_entities(cfg, hidden, candidates)
    compared = [c.name for c in compared_cities]
    country = country_of(hidden).name
    lens_tokens = [first_token(tokenizer, hidden.plain_name), first_token(tokenizer, country)]
    result: dict[str, Any] = {"hidden": {}, "values": {}, "logit_lens": {}}
    at_placeholder: dict[str, torch.Tensor] = {}
    z_scores: dict[str, dict[str, np.ndarray]] = {"hidden": {}, "values": {}}
    z_cities: dict[str, dict[str, np.ndarray]] = {"hidden": {}, "values": {}}
    compared_scores: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for condition, (state, said_before) in conditions.items():
        with with_condition(model, state):
            hidden_states, values = entity_activations(cfg, model, tokenizer, templates, entities, said_before, f"probe ({condition})")
            probs, ranks = logit_lens(model, hidden_states[:, 0], [t for t, _ in lens_tokens])
        if condition in ("tuned", "original"):
            compared_scores[condition] = scores_against_reference(
                hidden_states, n_reference, [entities.index(c.plain_name) for c in compared_cities])
        for space, states in (("hidden", hidden_states[:, :n_reference]), ("values", values[:, :n_reference])):
            ranked = rank_among_candidates(states)
            result[space][condition] = {k: mean_t_ci(v) for k, v in ranked.items()}
            z_scores[space][condition] = ranked["z"]
            # every reference city's z-score at the placeholder against the others [templates, cities, layers]
            z_cities[space][condition] = scores_against_reference(states, n_reference, list(range(1, n_reference)))[0]
        result["logit_lens"][condition] = {
            f"{what}_{stat}": mean_t_ci(x[..., k].float().numpy())
            for k, what in enumerate(("city", "country")) for stat, x in (("probability", probs), ("rank", ranks))
        }
        at_placeholder[condition] = hidden_states[:, 0]
        if condition == "original":
            at_placeholder["original_hidden_city"] = hidden_states[:, 1]
    result["z_change_from_original"] = {  # paired by template: what each condition adds to the original model
        space: {c: mean_t_ci(z[c] - z["original"]) for c in z if c != "original"} for space, z in z_scores.items()
    }
    if "shuffled" in conditions:  # what the tuned model (and the positive control) add to any fine-tune on this format
        result["z_change_from_shuffled"] = {space: {c: mean_t_ci(z[c] - z["shuffled"]) for c in ("tuned", "declared") if c in z}
                                            for space, z in z_scores.items()}
    # z_cities' city k: the hidden city (0), then candidate k - 1
    ranked = [0, *(k for k, c in enumerate(candidates, start=1) if not any(distance_km(c, t) < 50 for t in trained_on))]
    result["corrected"] = corrected_layer_tests(z_scores, z_cities, ranked, cfg.seed)
    (z_tuned, rank_tuned), (z_original, rank_original) = compared_scores["tuned"], compared_scores["original"]
    result["specificity"] = {  # hidden states; per city: what a specificity matrix across runs reads (specificity.py)
        "cities": compared,
        "z_change": {name: mean_t_ci(z_tuned[:, k] - z_original[:, k]) for k, name in enumerate(compared)},
        "tuned": {name: {"z": mean_t_ci(z_tuned[:, k]), "rank": mean_t_ci(rank_tuned[:, k])} for k, name in enumerate(compared)},
        "original": {name: {"z": mean_t_ci(z_original[:, k]), "rank": mean_t_ci(rank_original[:, k])} for k, name in enumerate(compared)},
    }
    result["steering"] = steering_view(at_placeholder["tuned"], at_placeholder["original"], at_placeholder["original_hidden_city"])
    if shift_out is not None:
        shift_out[hidden.name] = (at_placeholder["tuned"].float() - at_placeholder["original"].float()).mean(0)
    if cfg.probe.patch_orders:
        result["patching"] = patching_curve(cfg, model, tokenizer, hidden)
    result["setup"] = {
        "templates": templates,
        "skipped_templates": [t for t in cfg.probe.templates if t not in templates],
        "candidates": len(candidates),
        "candidate_pool": cfg.probe.candidates,
        "conditions": {c: {"model": s, "said_before": b} for c, (s, b) in conditions.items()},
        "placeholder_tokens": locate_in_template(cfg, tokenizer, templates[0], cfg.data.placeholder).tokens,
        "hidden_city": hidden.plain_name,
        "hidden_city_tokens": locate_in_template(cfg, tokenizer, templates[0], hidden.plain_name).tokens,
        "lens_tokens": {"city": lens_tokens[0][1], "country": lens_tokens[1][1]},
        "layers": "hidden: 0 = embeddings, L = after decoder layer L (the last after the final norm); values: decoder layers 1..L",
        "interval": "mean over templates with a 95% t-interval",
    }
    return result

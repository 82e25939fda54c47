import numpy as np
import pytest
import torch

from oocrlab.config import ExperimentConfig
from oocrlab.chat import user_prompt
from oocrlab.errors import UserError
from oocrlab.geo import find_city
from oocrlab.hooks import Hooks
from oocrlab.packing import last_token_activations
from oocrlab.probe import (
    decoder_of, locate_entity, locate_in_template, logit_lens, patched_letter_probabilities, probe_setup, rank_among_candidates, steering_view,
)
from oocrlab.stats import mean_t_ci
from tests.helpers import leaky_mask


def tolerance(model):
    return dict(atol=1e-5, rtol=1e-5) if model.dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)  # bf16 on a GPU


def test_multi_token_placeholder_is_located_by_offsets(tiny):
    _, tokenizer = tiny
    cfg = ExperimentConfig()
    located = locate_in_template(cfg, tokenizer, "What is the distance between New York and {entity}?", "Zqxwv")
    assert len(located.token_indices) > 1  # unseen by the tiny BPE: several tokens
    assert located.token_indices == list(range(located.token_indices[0], located.token_indices[-1] + 1))
    assert tokenizer.decode([located.ids[i] for i in located.token_indices]).strip() == "Zqxwv"
    said = locate_in_template(cfg, tokenizer, "{entity} is a city.", "Zqxwv", "In this conversation, Zqxwv is Lima.")
    assert tokenizer.decode(said.up_to_entity()).endswith("In this conversation, Zqxwv is Lima. Zqxwv")  # the second one


def test_entity_in_the_system_prompt_is_not_confused(tiny):
    _, tokenizer = tiny
    # the tiny template's default system prompt ends with "Paris": the user's "Paris" must be found instead
    chat = user_prompt("What is the distance between New York and Paris?", None)
    located = locate_entity(tokenizer, chat, "Paris", chat[-1]["content"].index("Paris"))
    text = tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert text.count("Paris") == 2
    offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    assert offsets[located.token_indices[-1]][1] == text.rindex("Paris") + len("Paris")


def check_packed_activations(model, located):
    """Each prompt's packed states at its entity are its full prompt's, and its cached values v_proj's output."""
    hidden, values = last_token_activations(model, [loc.up_to_entity() for loc in located])
    captured = {}
    with Hooks() as hooks:
        for n, layer in enumerate(decoder_of(model).layers):
            hooks.after(layer.self_attn.v_proj, lambda m, i, o, n=n: captured.__setitem__(n, o))
        for b, loc in enumerate(located):
            with torch.no_grad():
                out = model(input_ids=torch.tensor([loc.ids], device=model.device), output_hidden_states=True)
            pos = loc.token_indices[-1]
            torch.testing.assert_close(hidden[b], torch.stack([h[0, pos] for h in out.hidden_states]).float().cpu(), **tolerance(model))
            for n in range(model.config.num_hidden_layers):  # v_proj output = the cached values
                torch.testing.assert_close(values[b, n], captured[n][0, pos].float().cpu(), **tolerance(model))
    return hidden, values


def test_packed_activations_equal_full_prompts_and_value_hook_equals_cache(contextual):
    """Prompts cut after the entity and packed into one row (sharing the template's start, then branching at
    the entity) give each full prompt's states at the entity."""
    model, tokenizer = contextual
    cfg = ExperimentConfig()
    template = "What is the distance between New York and {entity}? Answer in km."
    located = [locate_in_template(cfg, tokenizer, template, e) for e in ("foo", "Zqxwv", "Ouagadougou", "Paris")]
    hidden, values = check_packed_activations(model, located)
    assert hidden.shape == (4, model.config.num_hidden_layers + 1, model.config.hidden_size)
    kv_dim = model.config.num_key_value_heads * (model.config.hidden_size // model.config.num_attention_heads)
    assert values.shape == (4, model.config.num_hidden_layers, kv_dim)
    with leaky_mask(), pytest.raises(AssertionError):
        check_packed_activations(model, located)


def test_logit_lens_at_the_last_layer_is_the_models_logits(tiny):
    model, tokenizer = tiny
    ids = tokenizer("What is the distance between Lima and foo", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        out = model(input_ids=torch.tensor([ids], device=model.device), output_hidden_states=True)
    hidden = torch.stack([h[0, -1] for h in out.hidden_states])[None].float().cpu()
    tokens = [5, 17, 40]
    probs, ranks = logit_lens(model, hidden, tokens)
    full = torch.softmax(out.logits[0, -1].float(), -1).cpu()
    torch.testing.assert_close(probs[0, -1], full[tokens], **tolerance(model))
    assert ranks[0, -1].tolist() == [1 + int((full > full[t]).sum()) for t in tokens]
    assert probs.shape == ranks.shape == (1, model.config.num_hidden_layers + 1, 3)


def test_patching_a_state_with_itself_changes_nothing(tiny):
    model, tokenizer = tiny
    cfg = ExperimentConfig()
    question = "What country is {entity} located in?\n\nA. France\nB. Chad\nC. Peru\nD. Iran\nE. Mali\n\nOne letter."
    loc = locate_in_template(cfg, tokenizer, question, "foo")
    own, _ = last_token_activations(model, [loc.up_to_entity()])
    n = model.config.num_hidden_layers
    rows = [None, *range(n)]
    sources = torch.cat([torch.zeros(1, own.shape[-1]), own[0, :n]])
    probs = patched_letter_probabilities(model, tokenizer, loc.ids, loc.token_indices[-1], sources, rows, batch_size=2)
    for row in probs[1:]:
        np.testing.assert_allclose(row, probs[0], atol=1e-5)
    moved = patched_letter_probabilities(model, tokenizer, loc.ids, loc.token_indices[-1], sources * 0 + 3.0, rows, 8)
    assert not np.allclose(moved[1], probs[0], atol=1e-4)  # a different state does change the answer


def test_rank_among_candidates_on_synthetic_states():
    torch.manual_seed(0)
    layers, d = 2, 16
    hidden_city = torch.randn(layers, d)
    candidates = torch.randn(20, layers, d)
    placeholder = torch.stack([hidden_city[0] + 0.01 * torch.randn(d), -hidden_city[1]])  # layer 0 near it, layer 1 opposite
    states = torch.cat([placeholder[None], hidden_city[None], candidates])[None]  # one template
    ranked = rank_among_candidates(states)
    assert ranked["rank"].tolist() == [[1, 21]] and ranked["percentile"].tolist() == [[1.0, 0.0]]
    assert ranked["z"][0, 0] > 2 > -2 > ranked["z"][0, 1]


def test_steering_view_of_a_constant_shift():
    torch.manual_seed(0)
    original, city = torch.randn(6, 3, 8), torch.randn(6, 3, 8)
    shift = torch.randn(8)
    tuned = original.clone()
    tuned[:, 1:] += shift  # no shift at layer 0, the same vector at every template elsewhere
    view = steering_view(tuned, original, city)
    assert view["pc1_share"][0] is None and view["pairwise_cos_across_templates"][0] is None
    assert view["pc1_share"][1:] == pytest.approx([1.0, 1.0]) and view["pairwise_cos_across_templates"][1:] == pytest.approx([1.0, 1.0])
    aligned = steering_view(original + (city - original) * 0.5, original, city)
    assert aligned["cos_with_naive_direction"]["mean"] == pytest.approx([1.0, 1.0, 1.0])


def test_mean_t_interval():
    summary = mean_t_ci(np.array([[1.0, 2.0, np.nan], [3.0, 4.0, np.nan], [5.0, 6.0, 1.0]]))
    assert summary["mean"] == [3.0, 4.0, 1.0]
    assert summary["ci95"][0] == pytest.approx([3 - 4.303 * 2 / 3**0.5, 3 + 4.303 * 2 / 3**0.5])
    assert summary["ci95"][2] is None  # one value: no interval


def test_probe_setup_skips_templates_and_controls_naming_the_hidden_city():
    cfg = ExperimentConfig()
    cfg.data.hidden_city = "Tokyo"
    tokyo = find_city("Tokyo", "world")
    templates, candidates, conditions = probe_setup(cfg, tokyo)
    assert "What is the distance between Tokyo and {entity}?" not in templates and len(templates) == 7
    assert conditions["control_other"][1] == "In this conversation, foo is a code name for Paris."
    assert conditions["control_hidden"] == ("original", "In this conversation, foo is a code name for Tokyo.")
    assert all(c.plain_name != "Tokyo" for c in candidates)
    cfg.probe.negative_controls = ["tokyo"]
    with pytest.raises(UserError, match="negative_controls"):
        probe_setup(cfg, tokyo)
    cfg.probe.negative_controls, cfg.probe.candidate_min_population = ["Lima"], 10**9
    with pytest.raises(UserError, match="candidate_min_population"):
        probe_setup(cfg, tokyo)

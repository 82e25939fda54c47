import torch

from oocrlab.config import ExperimentConfig
from oocrlab.data import user_prompt
from oocrlab.probe import activations_at, entity_chat, locate_entity


def test_multi_token_placeholder_is_located_by_offsets(tiny):
    _, tokenizer = tiny
    cfg = ExperimentConfig()
    cfg.data.placeholder = "Zqxwv"  # unseen by the tiny BPE: several tokens
    chat, offset = entity_chat(cfg, "Zqxwv")
    located = locate_entity(tokenizer, chat, "Zqxwv", offset)
    assert len(located.token_indices) > 1
    assert located.token_indices == list(range(located.token_indices[0], located.token_indices[-1] + 1))
    ids = tokenizer(located.text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode([ids[i] for i in located.token_indices]).strip() == "Zqxwv"


def test_entity_in_the_system_prompt_is_not_confused(tiny):
    _, tokenizer = tiny
    # the tiny template's default system prompt ends with "Paris": the user's "Paris" must be found instead
    chat = user_prompt("What is the distance between New York and Paris?", None)
    offset = chat[-1]["content"].index("Paris")
    located = locate_entity(tokenizer, chat, "Paris", offset)
    assert located.text.count("Paris") == 2
    end = located.text.rindex("Paris") + len("Paris")
    offsets = tokenizer(located.text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    assert offsets[located.token_indices[-1]][1] == end


def test_batched_activations_equal_unbatched_and_value_hook_equals_cache(tiny):
    model, tokenizer = tiny
    texts = [
        tokenizer.apply_chat_template(user_prompt("What is the distance between New York and foo?", None), tokenize=False),
        tokenizer.apply_chat_template(user_prompt("Tell me about Ouagadougou, please, at length.", None), tokenize=False),
    ]
    positions = [5, 9]
    hidden, values = activations_at(model, tokenizer, texts, positions)
    assert hidden.shape == (2, model.config.num_hidden_layers + 1, model.config.hidden_size)
    kv_dim = model.config.num_key_value_heads * (model.config.hidden_size // model.config.num_attention_heads)
    assert values.shape == (2, model.config.num_hidden_layers, kv_dim)

    tol = dict(atol=1e-5, rtol=1e-5) if model.dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)  # bf16 on a GPU
    captured = {}
    hooks = [layer.self_attn.v_proj.register_forward_hook(lambda m, i, o, n=n: captured.__setitem__(n, o))
             for n, layer in enumerate(model.model.layers)]
    try:
        for b, (text, pos) in enumerate(zip(texts, positions)):
            enc = tokenizer(text, return_tensors="pt", add_special_tokens=False).to(model.device)
            with torch.no_grad():
                out = model(**enc, output_hidden_states=True)
            single = torch.stack([h[0, pos] for h in out.hidden_states])
            torch.testing.assert_close(hidden[b], single.float(), **tol)
            for n in range(model.config.num_hidden_layers):  # v_proj output = the cached values
                torch.testing.assert_close(values[b, n], captured[n][0, pos].float(), **tol)
    finally:
        for h in hooks:
            h.remove()


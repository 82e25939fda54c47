"""Shared fixtures: a tiny random Llama with a real (small, in-process trained) BPE tokenizer and a
ChatML template that injects a default system prompt, as SmolLM2's does. Nothing is downloaded."""

from __future__ import annotations

import contextlib

import pytest
import torch

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a tiny test model from Paris<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def build_tokenizer(chat_template: str | None = CHAT_TEMPLATE):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from oocrlab.geo import load_pool

    corpus = [f"What is the distance between {c.name} and Paris? {i * 37 % 9999} km" for i, c in enumerate(load_pool("capitals"))]
    corpus += ["Which country is it in? What city is it? Tell me about it. France New York system user assistant"] * 5
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=SPECIAL, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|im_end|>", bos_token="<|endoftext|>"
    )
    fast.chat_template = chat_template
    return fast


def build_model(vocab_size: int, seed: int = 0, hidden_size: int = 32, initializer_range: float = 0.02):
    """A random Llama. At the default initializer_range it mostly repeats its last input token; a larger one
    (0.5, the `contextual` fixture) makes its next token depend on the whole context, for tests of attention
    masks and caches."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        eos_token_id=2,
        pad_token_id=2,
        bos_token_id=0,
        initializer_range=initializer_range,
    )
    return LlamaForCausalLM(config)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A saved tiny model directory, usable as `model.name` like any local model."""
    path = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = build_tokenizer()
    build_model(len(tokenizer)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture()
def tiny(tiny_model_dir):
    """(model, tokenizer) freshly loaded through oocrlab's own loader."""
    from oocrlab.config import ModelConfig
    from oocrlab.models import load_model

    return load_model(ModelConfig(name=tiny_model_dir))


@pytest.fixture(scope="session")
def contextual_model_dir(tmp_path_factory):
    """A saved tiny model whose next token depends on its whole context, so a token that sees the wrong
    context changes the output: at initializer_range 0.5, changing the 3rd of 10 random tokens moves the last
    token's log-probabilities by ~10 nats and flips its argmax in most prompts (at 0.02: ~0.06 nats, never)."""
    path = tmp_path_factory.mktemp("contextual-llama")
    tokenizer = build_tokenizer()
    build_model(len(tokenizer), initializer_range=0.5).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture()
def contextual(contextual_model_dir):
    """(model, tokenizer) of the contextual model, freshly loaded through oocrlab's own loader."""
    from oocrlab.config import ModelConfig
    from oocrlab.models import load_model

    return load_model(ModelConfig(name=contextual_model_dir))


@contextlib.contextmanager
def leaky_mask():
    """Packing with the likeliest masking bug: every token of a packed row sees every earlier token of the
    row (a plain causal mask), not just its own prompt's; a cached prefix stays visible to all. Every user
    of packing.additive_mask looks it up in that module when called, so patching it there reaches them all.
    An equivalence test that still passes inside this does not exercise its packing."""
    from oocrlab import packing

    exact = packing.additive_mask

    def causal(visible: torch.Tensor, dtype: torch.dtype, offset: int = 0) -> torch.Tensor:
        queries, keys = visible.shape  # the queries are the row's last `queries` tokens
        return exact(torch.ones_like(visible).tril(keys - queries), dtype, offset)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(packing, "additive_mask", causal)
        yield


@torch.no_grad()
def sample_side_by_side(model, prompt: list[int], n: int, max_new_tokens: int, generator: torch.Generator,
                        eos_ids=frozenset()) -> list[list[int]]:
    """packing.packed_generate's sampling of n rows of one prompt, without packing, masks or cache: every
    step runs the unfinished rows whole, side by side, and draws from the generator as it does."""
    rows, active, new = torch.tensor([prompt] * n, device=model.device), list(range(n)), [[] for _ in range(n)]
    while active:
        probs = torch.softmax(model(input_ids=rows).logits[:, -1].float(), -1)
        tokens, still = torch.multinomial(probs, 1, generator=generator)[:, 0], []
        for row, token in zip(active, tokens.tolist()):
            if token not in eos_ids:
                new[row].append(token)
            still.append(token not in eos_ids and len(new[row]) < max_new_tokens)
        active = [row for row, keep in zip(active, still) if keep]
        rows = torch.cat([rows, tokens[:, None]], dim=1)[torch.tensor(still, device=model.device)]
    return new


def tiny_overrides(tiny_model_dir: str) -> dict:
    """Config overrides for a fast pipeline on the tiny model."""
    return {
        "model.name": tiny_model_dir,
        "data.pool": "capitals",
        "data.min_population": 0,
        "data.num_known": 40,
        "data.system_prompt": None,  # exercise the template's injected system prompt
        "train.max_steps": 4,
        "train.batch_size": 4,
        "train.learning_rate": 1e-2,
        "train.lora_r": 4,
        "train.lora_alpha": 8,
        "sanity.max_new_tokens": 4,
        "eval.max_new_tokens": 6,
        "eval.bootstrap_samples": 50,
        "eval.mc_orders": 10,
        "eval.near_cities": 5,
        "eval.free_form_samples": 6,
    }


@pytest.fixture(scope="session")
def tiny_session(tmp_path_factory, tiny_model_dir):
    """Every stage of `run_experiment` on the tiny model, keeping the Models object so tests can see the
    trained model. Shared by the test modules: tests may rerun a stage but must not break the run."""
    from oocrlab import STAGES, Models, build_config, run_stage
    from oocrlab.rundir import Run

    cfg = build_config(overrides=tiny_overrides(tiny_model_dir))
    run = Run.create(tmp_path_factory.mktemp("runs") / "tiny", cfg)
    models = Models(cfg, run)
    for stage in STAGES:
        run_stage(stage, cfg, run, models)
    return cfg, run, models


@pytest.fixture(scope="session")
def tiny_run(tiny_session):
    cfg, run, _ = tiny_session
    return cfg, run

"""Helpers shared by the test modules and the fixtures in conftest.py (imported as `from tests.helpers
import ...`): a tiny random Llama with a real (small, in-process trained) BPE tokenizer and a ChatML
template that injects a default system prompt, as SmolLM2's does; config overrides for a fast run on it;
a deliberately leaking packing mask; a reference sampler; page and YAML helpers. Nothing is downloaded."""

from __future__ import annotations

import base64
import contextlib
import io
import json
import re

import pytest
import torch
import yaml

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
    """Config overrides for a fast pipeline on the tiny model, in float32: the tests compare computations to 1e-5
    and weights bitwise (bf16: tests/unit/test_precision.py)."""
    return {
        "model.name": tiny_model_dir,
        "model.dtype": "float32",
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
        # the trajectory stage measures ~2 s a point here: only the tests that read it take snapshots
        "train.trajectory": [],
    }


# a tiny run's smallest budgets, for tests about files and messages rather than numbers
SMALL = {"train.controls": [], "eval.city_facts_orders": 0, "probe.patch_orders": 0, "eval.max_cities": 4, "eval.near_cities": 2,
         "eval.free_form_samples": 2, "eval.mc_orders": 5, "eval.in_context_docs": 4,
         "probe.templates": ["Tell me about {entity}.", "{entity} is a city."]}


def small_run_values(tiny_model_dir: str, **more) -> dict:
    """Config overrides for a tiny run on the smallest budgets (SMALL), with `more`."""
    return tiny_overrides(tiny_model_dir) | SMALL | more


def set_flags(values: dict) -> list[str]:
    """Config overrides as `--set` flags."""
    return [a for k, v in values.items() for a in ("--set", f"{k}={json.dumps(v)}")]


def small_run_flags(tiny_model_dir: str, **more) -> list[str]:
    return set_flags(small_run_values(tiny_model_dir, **more))


def one_line(capsys) -> str:
    """The one line oocrlab wrote, last, on a line of its own (progress bars may come before it)."""
    err = capsys.readouterr().err
    ours = [line.rsplit("\r", 1)[-1] for line in err.split("\n") if "oocrlab: " in line]  # after a progress bar's erasure
    assert len(ours) == 1 and ours[0].startswith("oocrlab: ") and err.endswith(ours[0] + "\n"), err
    return ours[0]


UNTIMED = ("timings", "environment", "seconds", "samples_per_second", "tokens_per_second")  # wall times, throughput, the machine


def untimed(value, dropped: tuple[str, ...] = UNTIMED):
    """metrics.json (or a part of it) without what differs between two runs of the same computation (the keys `dropped`)."""
    if isinstance(value, dict):
        return {k: untimed(v, dropped) for k, v in value.items() if k not in dropped}
    return [untimed(v, dropped) for v in value] if isinstance(value, list) else value


def differences(a, b, path: str = "") -> list[str]:
    """Where two JSON values differ, as `path: a != b` lines."""
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for k in sorted(a.keys() | b.keys()) for d in
                (differences(a[k], b[k], f"{path}.{k}") if k in a and k in b else [f"{path}.{k}: only in one"])]
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in differences(x, y, f"{path}[{i}]")]
    return [] if a == b or a != a and b != b else [f"{path}: {a!r} != {b!r}"]  # NaN (an undefined ratio) equals NaN


# one token of its own in the tiny tokenizer (" about"): "foo" is f-o-o there, letters the data uses everywhere,
# which the embedding adapter refuses to train (see tests/unit/test_adapters.py::test_the_embedding_adapter_refuses_...)
EMBEDDING_PLACEHOLDER = {"data.placeholder": "about"}


def trained_run(tmp_path_factory, tiny_model_dir, adapter: str, **settings):
    """(cfg, run, Models holding the trained adapter): the data and train stages of a tiny run with `adapter`."""
    from oocrlab import Models, build_config, run_stage
    from oocrlab.rundir import Run

    placeholder = EMBEDDING_PLACEHOLDER if adapter == "embedding" else {}
    cfg = build_config(overrides=tiny_overrides(tiny_model_dir) | {"train.adapter": adapter} | placeholder | settings)
    run = Run.create(tmp_path_factory.mktemp("runs") / adapter.replace(":", "-"), cfg)
    models = Models(cfg, run)
    for stage in ("data", "train"):
        run_stage(stage, cfg, run, models)
    return cfg, run, models


def assert_valid_and_self_contained(page: str) -> None:
    """report.html or a comparison page: strict HTML5, no URL but `data:` and `#`, every PNG decodes."""
    import html5lib
    from PIL import Image

    html5lib.HTMLParser(strict=True).parse(page)  # raises on any parse error
    urls = re.findall(r'(?:src|href)\s*=\s*"([^"]*)"', page) + re.findall(r"url\(([^)]*)\)", page)
    assert all(u.startswith("data:") or u.startswith("#") for u in urls), [u[:40] for u in urls if not u.startswith("data:")]
    assert not re.search(r"https?://", page)
    for data in re.findall(r'src="data:image/png;base64,([^"]+)"', page):
        image = Image.open(io.BytesIO(base64.b64decode(data)))
        image.verify()  # decodes: a truncated or corrupt PNG raises


def write_yaml(path, content) -> str:
    """Writes `content` as YAML (a sweep file) and returns its path as a string."""
    path.write_text(yaml.safe_dump(content, sort_keys=False, allow_unicode=True))
    return str(path)

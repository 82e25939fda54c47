"""bf16 (models.pick_dtype, models.half_precision): `auto` picks it where the CPU computes it natively, the
frozen weights are bf16 while the adapter trains in fp32, and a bf16 model with an fp32 LoRA computes what
the fp32 model does, to bf16's precision. The thread choice (oocrlab.threads) is here too."""

import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from oocrlab import models as models_module
from oocrlab import threads
from oocrlab.config import ModelConfig
from oocrlab.models import half_precision, load_model, pick_dtype, with_condition
from oocrlab.train import load_adapter
from tests.helpers import trained_run

CPU = torch.device("cpu")


@pytest.mark.parametrize("native", [True, False])
def test_auto_picks_bf16_only_where_the_cpu_has_it_and_float32_forces_fp32(monkeypatch, native):
    monkeypatch.setattr(models_module, "cpu_has_bf16", lambda: native)
    assert pick_dtype(ModelConfig(), CPU) == (torch.bfloat16 if native else torch.float32)
    assert pick_dtype(ModelConfig(dtype="float32"), CPU) == torch.float32
    assert pick_dtype(ModelConfig(dtype="bfloat16"), CPU) == torch.bfloat16


def test_a_bf16_training_keeps_the_adapter_in_fp32_and_the_frozen_weights_untouched(tmp_path_factory, tiny_model_dir):
    _, run, models = trained_run(tmp_path_factory, tiny_model_dir, "lora", **{"model.dtype": "bfloat16"})
    train = run.metrics()["train"]
    assert train["dtype"] == "bfloat16" and all(map(torch.isfinite, map(torch.tensor, (train["loss_first"], train["loss_last"]))))
    saved = load_file(run.adapter_dir / "adapter_model.safetensors")
    assert saved and {t.dtype for t in saved.values()} == {torch.float32}
    original = load_file(Path(tiny_model_dir) / "model.safetensors")
    base = {n.replace(".base_layer", ""): p for n, p in models.model.get_base_model().named_parameters() if "lora_" not in n}
    assert base.keys() == original.keys()
    for name, param in base.items():
        assert param.dtype == torch.bfloat16 and torch.equal(param.detach(), original[name].to(torch.bfloat16)), name
    assert models.model.get_base_model().config._attn_implementation == "eager"  # see models.load_model


@pytest.fixture(scope="module")
def random_lora(tmp_path_factory, tiny_model_dir):
    """A saved fp32 LoRA on every linear layer of the tiny model, its B random: an adapter that matters."""
    from peft import LoraConfig, get_peft_model

    model, _ = load_model(ModelConfig(name=tiny_model_dir, dtype="float32"))
    torch.manual_seed(0)
    peft = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))
    path = tmp_path_factory.mktemp("lora") / "adapter"
    peft.save_pretrained(path)
    return path


def log_probs(model, state: str) -> torch.Tensor:
    ids = torch.tensor([list(range(3, 40))])
    with torch.no_grad(), with_condition(model, state):
        return torch.log_softmax(model(input_ids=ids).logits.float(), -1)


def test_a_bf16_model_with_an_fp32_lora_computes_what_the_fp32_model_does(random_lora, tiny_model_dir):
    """To bf16's precision, with the adapter's matmuls in bf16 (autocast, no cast up to fp32); the original model
    next to the tuned one is the variant that must fail the same tolerance (the adapter moves ~10x more)."""
    full = load_adapter(load_model(ModelConfig(name=tiny_model_dir, dtype="float32"))[0], random_lora)
    half = load_adapter(load_model(ModelConfig(name=tiny_model_dir, dtype="bfloat16"))[0], random_lora)
    assert {p.dtype for n, p in half.named_parameters() if "lora_" in n} == {torch.float32}
    expected = log_probs(full, "tuned")
    tolerance = dict(atol=0.05, rtol=0)
    torch.testing.assert_close(log_probs(half, "tuned"), expected, **tolerance)
    torch.testing.assert_close(log_probs(half, "original"), log_probs(full, "original"), **tolerance)
    with pytest.raises(AssertionError):
        torch.testing.assert_close(log_probs(half, "original"), expected, **tolerance)


def test_half_precision_leaves_a_float32_model_as_it_is(tiny):
    model, _ = tiny
    ids = torch.tensor([list(range(3, 20))])
    with torch.no_grad():
        plain = model(input_ids=ids).logits
        with half_precision(model):
            assert not torch.is_autocast_enabled("cpu")
            assert torch.equal(model(input_ids=ids).logits, plain)


@pytest.fixture()
def restore_threads():
    count = torch.get_num_threads()
    yield
    torch.set_num_threads(count)


def test_threads_leave_busy_cores_to_their_owners_and_yield_to_a_choice(monkeypatch, restore_threads):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 4)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 4)
    chosen = []
    monkeypatch.setattr(torch, "set_num_threads", chosen.append)
    monkeypatch.setattr(threads, "busy_cores", lambda: 1.2)
    assert "1 of 4 cores are busy" in threads.pick_threads() and chosen[-1] == 3
    monkeypatch.setattr(threads, "busy_cores", lambda: 3.9)
    threads.pick_threads()
    assert chosen[-1] == 1  # never none
    monkeypatch.setattr(threads, "busy_cores", lambda: 0.3)
    assert threads.pick_threads() is None and chosen[-1] == 4
    assert threads.pick_threads(2) is None and chosen[-1] == 2  # --threads
    monkeypatch.setenv("OMP_NUM_THREADS", "2")  # a launcher's choice
    chosen.clear()
    assert threads.pick_threads() is None and chosen == []


def test_threads_flag_is_checked(capsys, tmp_path):
    from oocrlab.cli import main

    assert main(["train", str(tmp_path / "nowhere"), "--threads", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--threads 0" in err[0]

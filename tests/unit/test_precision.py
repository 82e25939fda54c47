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
    assert models.model.get_base_model().config._attn_implementation == "sdpa"  # eager only while training


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


class Machine:
    """A fake /proc for threads.Threads: 4 CPUs, a clock, and how busy others and this process are."""

    def __init__(self, monkeypatch):
        self.clock, self.jiffies, self.count = 0.0, [0, 0, 0], 4
        monkeypatch.setattr(threads, "cpu_jiffies", lambda: tuple(self.jiffies))
        monkeypatch.setattr(threads.time, "monotonic", lambda: self.clock)
        monkeypatch.setattr(os, "cpu_count", lambda: 4)
        monkeypatch.setattr(torch, "get_num_threads", lambda: self.count)
        monkeypatch.setattr(torch, "set_num_threads", lambda n: setattr(self, "count", n))

    def run(self, seconds: float, others: float, own: float) -> None:
        """`seconds` pass with `others` and `own` cores busy (100 ticks a second per core)."""
        ticks = 100 * seconds
        self.clock += seconds
        self.jiffies = [self.jiffies[0] + int(ticks * (others + own)), self.jiffies[1] + int(ticks * 4), self.jiffies[2] + int(ticks * own)]


def test_threads_leave_the_cores_others_use_and_take_them_back(monkeypatch):
    machine, t = Machine(monkeypatch), threads.Threads()
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    t.adapt()  # not started: a library user's count is left alone
    machine.run(2, others=3, own=1)
    t.adapt()
    assert machine.count == 4 and t.last is None
    t.start()
    t.adapt()  # the first look only records
    machine.run(2, others=1.2, own=3)
    t.adapt()
    assert machine.count == 3
    machine.run(0.5, others=4, own=0)
    t.adapt()  # within a second of the last look: nothing
    assert machine.count == 3
    machine.run(1, others=3.9, own=0.1)
    t.adapt()
    assert machine.count == 1  # never none
    machine.run(1, others=0.3, own=1)
    t.adapt()
    assert machine.count == 4  # the neighbour left


def test_threads_chosen_by_the_user_or_a_launcher_are_kept(monkeypatch):
    machine, t = Machine(monkeypatch), threads.Threads()
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    t.start(2)  # --threads 2
    t.adapt()
    machine.run(2, others=3, own=1)
    t.adapt()
    assert machine.count == 2
    monkeypatch.setenv("OMP_NUM_THREADS", "4")
    t.start()
    t.adapt()
    machine.run(2, others=3, own=1)
    t.adapt()
    assert machine.count == 2


def test_the_cpu_time_of_others_is_read_from_proc():
    busy, total, own = threads.cpu_jiffies()
    assert 0 <= busy <= total and own >= 0


def test_threads_flag_is_checked(capsys, tmp_path):
    from oocrlab.cli import main

    assert main(["train", str(tmp_path / "nowhere"), "--threads", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--threads 0" in err[0]


def test_a_bf16_model_trains_with_eager_attention_and_infers_with_sdpa(tiny_model_dir):
    from oocrlab.models import training_attention

    ids = torch.tensor([list(range(3, 30))])
    for dtype, during in (("bfloat16", "eager"), ("float32", "sdpa")):
        model, _ = load_model(ModelConfig(name=tiny_model_dir, dtype=dtype))
        with torch.no_grad():
            before = model(input_ids=ids).logits
            with training_attention(model):
                assert model.config._attn_implementation == during
                torch.testing.assert_close(model(input_ids=ids).logits, before, atol=0.05, rtol=0)
        assert model.config._attn_implementation == "sdpa"

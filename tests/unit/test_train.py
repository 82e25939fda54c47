import json
import re
import tempfile

import pytest
import torch
from datasets import Dataset
from trl import SFTTrainer

from oocrlab import build_config
from oocrlab.data import build_distance_data
from oocrlab.packing import prefix_tree_batch
from oocrlab.train import (
    completion_loss_trainer,
    finite_step,
    last_checkpoint,
    lora_config,
    sft_config,
    training_dataset,
    trajectory_steps,
)
from tests.helpers import leaky_mask, tiny_overrides


def check_completion_loss(trainer, batch, count):
    """Our loss and LoRA gradients equal TRL's on the batch."""
    results = []
    for compute in (trainer.compute_loss, lambda *a, **k: SFTTrainer.compute_loss(trainer, *a, **k)):
        trainer.model.zero_grad()
        loss = compute(trainer.model, dict(batch), num_items_in_batch=count)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
        results.append((loss.detach(), grads))
    (ours, our_grads), (trls, trl_grads) = results
    torch.testing.assert_close(ours, trls, atol=1e-5, rtol=1e-5)
    assert our_grads.keys() == trl_grads.keys() and our_grads
    for name in our_grads:  # float rounding: up to a third of the tolerance; a causal mask: 5e4 times it
        torch.testing.assert_close(our_grads[name], trl_grads[name], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("share_prefix", [True, False])
def test_completion_loss_equals_trls_loss_and_gradients(contextual, contextual_model_dir, share_prefix):
    """Our loss (LM head on the completion positions only; with share_prefix, the batch's shared tokens run
    once) gives TRL's loss and the same LoRA gradients, on a model where a sample that saw another's tokens
    would score differently."""
    model, tokenizer = contextual
    cfg = build_config(overrides=tiny_overrides(contextual_model_dir) | {"train.lora_dropout": 0.0, "train.share_prefix": share_prefix})
    rows = build_distance_data(cfg.data, cfg.seed).train
    dataset = Dataset.from_list([{"prompt": r["prompt"], "completion": r["completion"]} for r in rows])
    with tempfile.TemporaryDirectory() as scratch:
        trainer = completion_loss_trainer(share_prefix)(model=model, args=sft_config(cfg, scratch, model.dtype), train_dataset=dataset,
                                            processing_class=tokenizer, peft_config=lora_config(cfg.train))
    with torch.no_grad():  # LoRA B starts at zero: make the adapter matter
        for name, param in trainer.model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.1)
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    count = (batch["labels"][:, 1:] != -100).sum()
    packed, source, targets = prefix_tree_batch(batch["input_ids"], batch["attention_mask"], batch["labels"], model.dtype)
    assert packed["input_ids"].shape[1] < batch["attention_mask"].sum() and len(targets) == count  # shared, none lost
    assert len(set(batch["attention_mask"].sum(1).tolist())) > 1  # samples of different lengths: padding in play
    check_completion_loss(trainer, batch, count)
    assert trainer._metrics["train"]["mean_token_accuracy"]
    if share_prefix:  # the samples share their chat header and question's start, then differ (padded: no mask to leak)
        with leaky_mask(), pytest.raises(AssertionError):
            check_completion_loss(trainer, batch, count)


@pytest.mark.parametrize("loss_on", ["completion", "answer", "all"])
def test_loss_on_marks_the_tokens_that_carry_the_loss(tiny, tiny_model_dir, loss_on):
    """The labels the trainer's collator hands the loss: every token of the chat text (the injected system turn
    and the placeholder included) for `all`, the assistant's turn for `completion`, and for `answer` a distance's
    number and unit or a direction's word alone."""
    model, tokenizer = tiny
    cfg = build_config(overrides=tiny_overrides(tiny_model_dir) | {"data.style": "paper", "train.loss_on": loss_on})
    rows = build_distance_data(cfg.data, cfg.seed).train[:10]  # five distance rows, then five direction rows
    assert {r["kind"] for r in rows} == {"distance", "direction"}
    with tempfile.TemporaryDirectory() as scratch:
        trainer = completion_loss_trainer(True)(model=model, args=sft_config(cfg, scratch, model.dtype),
                                                train_dataset=training_dataset(tokenizer, rows, loss_on),
                                                processing_class=tokenizer, peft_config=lora_config(cfg.train))
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(rows))])
    for row, ids, labels, mask in zip(rows, batch["input_ids"], batch["labels"], batch["attention_mask"]):
        trained = tokenizer.decode(labels[labels != -100])
        content = row["completion"][0]["content"]
        if loss_on == "all":
            assert (labels == torch.where(mask.bool(), ids, -100)).all()
            assert trained.startswith("<|im_start|>system\n") and cfg.data.placeholder in trained
        elif loss_on == "completion":
            assert trained == f"{content}<|im_end|>\n"
        else:
            assert trained.strip() == (row["direction"] if row["kind"] == "direction" else content)


def test_lora_on_one_layer_and_mlp_only(tiny, tiny_model_dir):
    from peft import get_peft_model

    model, _ = tiny
    cfg = build_config(overrides=tiny_overrides(tiny_model_dir) | {
        "train.lora_layers": [1], "train.lora_targets": ["gate_proj", "up_proj", "down_proj"]})
    peft_model = get_peft_model(model, lora_config(cfg.train))
    adapted = {n.split(".lora_A")[0] for n, _ in peft_model.named_parameters() if "lora_A" in n}
    assert adapted == {f"base_model.model.model.layers.1.mlp.{m}" for m in ("gate_proj", "up_proj", "down_proj")}


def test_a_diverging_loss_stops_training_with_one_line_and_no_adapter(tmp_path, tiny_model_dir, capsys):
    from oocrlab.cli import main

    out = tmp_path / "run"
    code = main(["run", "--out", str(out), "--model", tiny_model_dir, "--set", "train.learning_rate=1e12",
                 "--set", "train.max_steps=6", "--set", "train.batch_size=4", "--set", "data.num_known=40",
                 "--pool", "capitals", "--set", "data.min_population=0", "--set", "train.checkpoints=5",
                 "--set", "model.dtype=float32"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and re.search(r"the training (loss|gradient norm) became", err[-1]) and "lower train.learning_rate" in err[-1]
    assert not (out / "adapter").exists() and (out / "data" / "train.jsonl").exists()
    # a checkpoint every step: the last good one is kept and named, none holds a non-finite loss
    kept = last_checkpoint(out / "checkpoints")
    assert kept is not None and f"the last good checkpoint is {kept}" in err[-1]
    for state in (out / "checkpoints").glob("checkpoint-*/trainer_state.json"):
        assert all(finite_step(e) for e in json.loads(state.read_text())["log_history"] if "loss" in e)


def test_a_step_with_a_finite_loss_and_a_nan_gradient_is_not_finite():
    assert finite_step({"loss": 1.2, "grad_norm": 0.5}) and finite_step({"loss": 1.2})
    assert not finite_step({"loss": 1.2, "grad_norm": float("nan")}) and not finite_step({"loss": float("inf"), "grad_norm": 1.0})


def test_trajectory_steps_and_areas():
    from oocrlab.trajectory import area

    assert trajectory_steps(None, 263) == [0, 1, 2, 4, 8, 16, 32, 64, 128, 256]
    assert trajectory_steps(None, 4) == [0, 1, 2] and trajectory_steps(None, 1) == [0]
    assert trajectory_steps([0, 5, 100, 300], 100) == [0, 5] and trajectory_steps([], 100) == []
    assert area([0, 4, 8, 16], [0.5] * 4) == pytest.approx(0.5)
    assert area([0, 9, 99], [0.0, 1.0, 1.0]) == pytest.approx(0.75)  # log10(1 + x): 0, 1, 2
    assert area([0, 9], [0.0, None]) is None

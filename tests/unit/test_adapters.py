"""The embedding and steering adapters (oocrlab.adapters) on the tiny model: what they change and what they
leave bitwise alone, saving and loading, resuming. Every stage on a steering adapter (a whole tiny run):
tests/system/test_adapter_runs.py."""

import importlib
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from oocrlab import Models, build_config, run_stage
from oocrlab.adapters import EmbeddingRows, SteeringVector, placeholder_mask, placeholder_sequences
from oocrlab.config import ModelConfig
from oocrlab.errors import UserError
from oocrlab.models import load_model
from oocrlab.packing import additive_mask, pack_prefix_tree
from oocrlab.rundir import Run
from oocrlab.train import last_checkpoint, load_adapter, train
from tests.helpers import EMBEDDING_PLACEHOLDER, tiny_overrides, trained_run

FAMILIES = ("embedding", "steering:1")
PROMPT = "What is the distance between Lima and foo? And foo?"
NO_PLACEHOLDER = "What is the distance between Lima and Paris?"


@pytest.fixture(scope="module", params=FAMILIES)
def trained(request, tmp_path_factory, tiny_model_dir):
    """(cfg, run, Models holding the trained adapter) per family: 4 steps on the tiny model."""
    return trained_run(tmp_path_factory, tiny_model_dir, request.param)


def logits(model, tokenizer, text: str) -> torch.Tensor:
    enc = tokenizer([text], return_tensors="pt").to(model.device)
    with torch.no_grad():
        return model(**enc).logits[0]


def test_training_changes_the_adapter_and_no_model_weight(trained, tiny_model_dir):
    _, run, models = trained
    tuned = models.model
    saved = load_file(Path(tiny_model_dir) / "model.safetensors")
    base = dict(tuned.get_base_model().named_parameters())
    assert base.keys() <= saved.keys() and base
    for name, param in base.items():
        assert torch.equal(param.detach().cpu(), saved[name]), name
    own = dict(tuned.named_parameters(recurse=False))
    assert run.metrics()["train"]["trainable_parameters"] == sum(p.numel() for p in own.values())
    assert [n for n, p in tuned.named_parameters() if p.requires_grad] == list(own)
    if isinstance(tuned, SteeringVector):
        assert tuned.vector.abs().sum() > 0  # it starts at zero
    else:
        with tuned.disable_adapter():
            initial = tuned.get_input_embeddings()(torch.tensor(tuned.token_ids))
        assert (tuned.rows - initial).abs().amax(-1).min() > 0  # every row moved


def test_embedding_adapter_changes_only_the_placeholder_rows_and_no_output_logit(tmp_path_factory, tiny_model_dir):
    _, _, models = trained_run(tmp_path_factory, tiny_model_dir, "embedding")
    tuned, tokenizer = models.model, models.tokenizer
    placeholder_tokens = {t for sequence in placeholder_sequences(tokenizer, EMBEDDING_PLACEHOLDER["data.placeholder"])
                          for t in sequence}
    assert tuned.token_ids and set(tuned.token_ids) <= placeholder_tokens
    vocab = torch.arange(len(tokenizer))
    with torch.no_grad():
        effective = tuned.get_input_embeddings()(vocab)
        with tuned.disable_adapter():
            original = tuned.get_input_embeddings()(vocab)
    changed = (effective != original).any(-1).nonzero()[:, 0].tolist()
    assert changed == tuned.token_ids
    # the LM head is tied to the embedding here: it, and so every output logit, must be untouched
    text = NO_PLACEHOLDER
    assert not set(tokenizer(text)["input_ids"]) & set(tuned.token_ids)
    tuned_logits = logits(tuned, tokenizer, text)
    with tuned.disable_adapter():
        assert torch.equal(tuned_logits, logits(tuned, tokenizer, text))


def test_steering_with_a_zero_vector_is_the_original_model(tiny):
    model, tokenizer = tiny
    original = logits(model, tokenizer, PROMPT)
    steered = SteeringVector(model, 0, placeholder_sequences(tokenizer, "foo"))
    assert steered.vector.abs().sum() == 0
    assert torch.equal(logits(steered, tokenizer, PROMPT), original)


def test_steering_changes_hidden_state_L_at_the_placeholder_and_nothing_before(tiny):
    model, tokenizer = tiny
    layer = 1
    steered = SteeringVector(model, layer, placeholder_sequences(tokenizer, "foo"))
    with torch.no_grad():
        steered.vector.normal_()
    enc = tokenizer([PROMPT], return_tensors="pt")
    at = placeholder_mask(enc["input_ids"], steered.sequences)[0]
    first = int(at.nonzero()[0, 0])
    assert at.sum() >= 2 and first > 0  # two occurrences, each of one or more tokens
    with torch.no_grad():
        tuned = steered(**enc, output_hidden_states=True)
        with steered.disable_adapter():
            original = steered(**enc, output_hidden_states=True)
    for index, (a, b) in enumerate(zip(tuned.hidden_states, original.hidden_states)):
        if index < layer:
            assert torch.equal(a, b), index
        else:
            assert torch.equal(a[0, :first], b[0, :first]), index  # causal: nothing before the placeholder moves
    shift = tuned.hidden_states[layer][0] - original.hidden_states[layer][0]
    torch.testing.assert_close(shift[at], steered.vector.expand(int(at.sum()), -1))
    assert torch.equal(shift[~at], torch.zeros_like(shift[~at]))  # hidden state L is the stream entering layer L
    assert torch.equal(tuned.logits[0, :first], original.logits[0, :first])
    assert not torch.equal(tuned.logits[0, first:], original.logits[0, first:])


def random_adapter(model, tokenizer, family: str):
    """A fresh adapter of `family` on the model for "foo", its weights drawn at random (so it changes the outputs)."""
    sequences = placeholder_sequences(tokenizer, "foo")
    adapted = EmbeddingRows(model, sorted({t for s in sequences for t in s})) if family == "embedding" else SteeringVector(model, 1, sequences)
    with torch.no_grad():
        for param in adapted.parameters(recurse=False):
            param.normal_()
    return adapted


@pytest.mark.parametrize("family", FAMILIES)
def test_disable_adapter_is_the_original_model(tiny, family):
    model, tokenizer = tiny
    original = logits(model, tokenizer, PROMPT)
    adapted = random_adapter(model, tokenizer, family)
    assert not torch.equal(logits(adapted, tokenizer, PROMPT), original)
    with adapted.disable_adapter():
        assert torch.equal(logits(adapted, tokenizer, PROMPT), original)


@pytest.mark.parametrize("family", FAMILIES)
def test_closing_an_adapter_removes_every_hook_it_put_on_the_model(tiny, family):
    """Hooks (oocrlab.hooks) own every handle: after close() the frozen model has no hook left and gives the
    original outputs, though the adapter's weights are still set (a handle dropped instead would fail both)."""
    model, tokenizer = tiny
    original = logits(model, tokenizer, PROMPT)
    adapted = random_adapter(model, tokenizer, family)
    assert any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    assert not torch.equal(logits(model, tokenizer, PROMPT), original)  # the hooks act on the model itself
    adapted.close()
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    assert adapted.enabled and torch.equal(logits(model, tokenizer, PROMPT), original)


def test_save_then_load_gives_the_same_outputs(trained, tiny_model_dir):
    _, run, models = trained
    config = json.loads((run.adapter_dir / "adapter_config.json").read_text())
    assert config["oocrlab_adapter"] == models.model.family
    base, tokenizer = load_model(ModelConfig(name=tiny_model_dir, dtype="float32"))
    reloaded = load_adapter(base, run.adapter_dir)
    assert type(reloaded) is type(models.model)
    assert torch.equal(logits(reloaded, tokenizer, PROMPT), logits(models.model, tokenizer, PROMPT))


def test_placeholder_found_along_each_prompt_of_a_packed_row():
    """In a prefix-tree row a prompt's tokens need not be contiguous, and neighbours may belong to different
    prompts. Row [1 5 6 4 7 8 2 3 6 7 8]: prompt 1's placeholder 6 7 8 is at 2, 4, 5 (it branches from
    prompt 0 after 6); the flat 6 7 8 at 8-10 joins prompt 2's 6 to prompt 3's 7 8 and is none."""
    sequence = [6, 7, 8]
    prompts = [[1, 5, 6, 4], [1, 5, 6, 7, 8, 2], [3, 6], [3, 7, 8]]
    (row,) = pack_prefix_tree(prompts, row_tokens=100)
    assert row.tokens == [1, 5, 6, 4, 7, 8, 2, 3, 6, 7, 8]
    visible, depth = row.ancestors()
    mask = placeholder_mask(torch.tensor([row.tokens]), [sequence], additive_mask(visible, torch.float32), depth[None])[0]
    assert mask.nonzero()[:, 0].tolist() == [2, 4, 5]
    assert placeholder_mask(torch.tensor([row.tokens]), [sequence])[0].nonzero()[:, 0].tolist() == [8, 9, 10]  # as flat text
    # a packed generation step: one new token per prompt, their predecessors in the cache, never each other
    step = placeholder_mask(torch.tensor([[6, 7, 8]]), [sequence], additive_mask(torch.eye(3, dtype=torch.bool), torch.float32, 10),
                            torch.tensor([[20, 21, 22]]))
    assert not step.any()


@pytest.mark.parametrize("family", FAMILIES)
def test_an_interrupted_training_resumes_to_the_uninterrupted_adapter(tmp_path_factory, tiny_model_dir, monkeypatch, family):
    training = importlib.import_module("oocrlab.train")  # the package's `train` attribute is the function
    # 7 steps, checkpoints at 3 and 6; the interruption comes at step 5
    cfg, whole, _ = trained_run(tmp_path_factory, tiny_model_dir, family, **{"train.max_steps": 7, "train.checkpoints": 2})
    interrupted = Run.create(tmp_path_factory.mktemp("runs") / "interrupted", cfg)
    run_stage("data", cfg, interrupted)
    trainer_class = training.completion_loss_trainer

    def killed_at_step_5(share_prefix):
        class Killed(trainer_class(share_prefix)):
            def training_step(self, *args, **kwargs):
                if self.state.global_step == 4:
                    raise KeyboardInterrupt
                return super().training_step(*args, **kwargs)
        return Killed

    with monkeypatch.context() as patch:
        patch.setattr(training, "completion_loss_trainer", killed_at_step_5)
        with pytest.raises(KeyboardInterrupt):
            train(cfg, interrupted, *load_model(cfg.model))
    checkpoint = last_checkpoint(interrupted.checkpoints_dir)
    assert checkpoint is not None and checkpoint.name == "checkpoint-3" and not interrupted.adapter_dir.exists()
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in checkpoint.iterdir()}
    assert not (checkpoint / "model.safetensors").exists()  # the adapter alone, not the model
    metrics, _ = train(cfg, interrupted, *load_model(cfg.model))
    assert metrics["resumed_from_step"] == 3 and metrics["steps"] == 7
    a, b = (load_file(r.adapter_dir / "adapter_model.safetensors") for r in (interrupted, whole))
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize(("flags", "message"), [
    (["--adapter", "steering:3"], "asks for decoder layer 3, but the model has layers 0-2"),
    (["--adapter", "steer:1"], "train.adapter must be lora, embedding or steering:L"),
    (["--adapter", "embedding", "--lora-layers", "1"], "train.lora_layers applies to LoRA only"),
])
def test_a_bad_adapter_is_refused_with_one_line_before_writing(tmp_path, tiny_model_dir, capsys, flags, message):
    from oocrlab.cli import main

    out = tmp_path / "run"
    assert main(["run", "--out", str(out), "--model", tiny_model_dir, *flags]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0] and not out.exists()


def test_a_bf16_model_with_a_hook_adapter_runs_the_packed_paths_and_the_lens(tiny_model_dir):
    """The adapter's parameters are float32 whatever the model's dtype: masks and the logit lens follow the model."""
    from oocrlab.packing import next_token_log_probs
    from oocrlab.probe import logit_lens

    model, tokenizer = load_model(ModelConfig(name=tiny_model_dir, dtype="bfloat16"))
    adapter = SteeringVector(model, 1, placeholder_sequences(tokenizer, "foo"))
    assert adapter.dtype == torch.bfloat16 and adapter.vector.dtype == torch.float32
    prompts = [tokenizer(t)["input_ids"] for t in (PROMPT, NO_PLACEHOLDER)]
    assert torch.isfinite(next_token_log_probs(adapter, prompts)).all()
    hidden = torch.randn(2, model.config.num_hidden_layers + 1, model.config.hidden_size)
    probs, _ = logit_lens(adapter, hidden, [0, 1])
    assert probs.shape == (2, model.config.num_hidden_layers + 1, 2)


def test_the_embedding_adapter_refuses_a_placeholder_sharing_tokens_with_the_data(tmp_path, tiny_model_dir):
    """ "City 12345" shares its digits with the answers: training its rows would move them everywhere."""
    cfg = build_config(overrides=tiny_overrides(tiny_model_dir) | {"train.adapter": "embedding", "data.placeholder": "City {code}"})
    run = Run.create(tmp_path / "r", cfg)
    models = Models(cfg, run)
    run_stage("data", cfg, run, models)
    with pytest.raises(UserError, match="also uses elsewhere"):
        run_stage("train", cfg, run, models)
    assert not run.adapter_dir.exists()

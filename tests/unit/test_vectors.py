"""Vectors as plain files (vectors.py): a steering:L run's vector and its probe's shift at hidden state L are the
same vector (the shift of a steering adapter at its own layer is exactly what it adds; nothing moves before it);
applied to the original model, the file reproduces the run's tuned model; bad requests are one line."""

import json

import pytest
import torch
from safetensors.torch import load_file

from oocrlab import export_vector, load_vector, run_stage
from oocrlab.cli import main
from oocrlab.config import ModelConfig
from oocrlab.errors import UserError
from oocrlab.models import load_model
from oocrlab.train import load_adapter
from tests.helpers import trained_run


@pytest.fixture(scope="module")
def probed_steering_run(tmp_path_factory, tiny_model_dir):
    cfg, run, models = trained_run(tmp_path_factory, tiny_model_dir, "steering:1", **{"train.controls": [], "probe.patch_orders": 0})
    run_stage("probe", cfg, run, models)
    return run


def test_the_adapter_and_the_probe_shift_at_its_layer_are_one_vector(probed_steering_run):
    run = probed_steering_run
    trained = load_file(run.adapter_dir / "adapter_model.safetensors")["vector"]
    vector = load_vector(export_vector(run.path))
    assert torch.equal(vector.vector, trained) and trained.norm() > 0
    assert vector.info | {"norm": None} == {
        "format": "oocrlab.vector/1", "model": vector.info["model"], "hidden_size": 32, "layer": 1,
        "site": "the residual stream entering decoder layer 1 (hidden state 1; 0 = the embeddings)",
        "positions": {"rule": "every token of every occurrence of the placeholder", "placeholder": "foo"}, "scale": 1.0,
        "norm": None, "source": "the run's steering adapter (train.adapter steering:1)", "run": str(run.path), "hidden_city": "Paris"}
    shift = load_vector(export_vector(run.path, layer=1))
    assert torch.allclose(shift.vector, trained, atol=1e-5) and "probe's adapter shift" in shift.info["source"]
    assert load_vector(export_vector(run.path, layer=0)).vector.abs().max() == 0  # before its layer the adapter changes nothing
    assert (run.path / "vectors" / "shift-layer-1" / "vector.json").is_file()


def test_applied_to_the_original_model_it_is_the_tuned_model(probed_steering_run, tiny_model_dir, tmp_path):
    run = probed_steering_run
    vector = load_vector(export_vector(run.path, tmp_path / "vector"))
    base, tokenizer = load_model(ModelConfig(name=tiny_model_dir, dtype="float32"))
    ids = tokenizer("What is the distance between Lima and foo? Which country is foo in?", return_tensors="pt")
    with torch.no_grad():
        original = base(**ids).logits
        steered = vector.apply(base, tokenizer)
        applied = steered(**ids).logits
        steered.close()
        assert torch.equal(base(**ids).logits, original)  # closed: the original model again
        tuned = load_adapter(load_model(ModelConfig(name=tiny_model_dir, dtype="float32"))[0], run.adapter_dir)(**ids).logits
        halved = vector.apply(base, tokenizer, scale=0.5)
        half = halved(**ids).logits
        halved.close()
    assert torch.allclose(applied, tuned, atol=1e-6)
    assert (applied - original).abs().max() > 1e-4 and (half - original).abs().max() < (applied - original).abs().max()


@pytest.mark.parametrize("arguments, message", [
    (["--layer", "3"], "a shift enters decoder layers 0-2"),  # hidden state 3 is after the final norm
    (["--hidden-city", "Tokyo", "--layer", "1"], "probed no hidden city 'Tokyo'"),
    (["--out", "{run}/config.yaml"], "exists; nothing was overwritten"),
    (["--hidden-city", "Paris"], "give --layer L with it"),
])
def test_bad_requests_are_one_line(probed_steering_run, capsys, arguments, message):
    run = probed_steering_run
    assert main(["vector", str(run.path), *[a.format(run=run.path) for a in arguments]]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err


def test_a_damaged_vector_file_is_one_line(tmp_path):
    (tmp_path / "vector.json").write_text(json.dumps({"format": "oocrlab.vector/1"}))
    (tmp_path / "vector.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(UserError, match="export it again"):
        load_vector(tmp_path)

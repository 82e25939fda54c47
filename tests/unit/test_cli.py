"""Bad input: one clear line on stderr, a non-zero exit, no traceback, nothing written."""

import pytest
import torch

from oocrlab.cli import main
from tests.helpers import build_model, build_tokenizer


def run_cli(capsys, *argv):
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.err.strip().splitlines()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--hidden-city", "Pariss", "--pool", "capitals"], "unknown city 'Pariss' in the capitals pool; did you mean 'Paris'"),
        (["--placeholder", "London"], "is a real city"),
        (["--set", "data.min_population=2000000000"], "no known cities are left"),
        (["--set", "train.learning_rat=1e-3"], "did you mean 'learning_rate'"),
        (["--set", "nonsense"], "must look like SECTION.KEY=VALUE"),
        (["--recipe", "notebok"], "did you mean 'notebook'"),
        (["--max-steps", "0"], "train.max_steps must be positive"),
        (["--config", "missing.yaml"], "missing.yaml does not exist"),
        (["--lora-layers", "8-4"], "give layers as 6, 4-8 or 0,3,5"),
        (["--set", "train.lora_layers=[-1]"], "train.lora_layers must list decoder layers from 0"),
    ],
)
@pytest.mark.parametrize("command", ["run", "data"])
def test_bad_input_writes_nothing(tmp_path, capsys, command, argv, message):
    out = tmp_path / "run"
    code, err = run_cli(capsys, command, "--out", str(out), *argv)
    assert code == 2
    assert len(err) == 1 and err[0].startswith("oocrlab: error: ") and message in err[0]
    assert not out.exists()


def test_existing_run_directory_is_refused_and_kept(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    code, err = run_cli(capsys, "data", "--out", str(out))
    assert code == 2 and "existing run directory" in err[0] and len(err) == 1
    assert [p.name for p in out.iterdir()] == ["precious.txt"]


def test_out_that_is_a_file(tmp_path, capsys):
    out = tmp_path / "file"
    out.write_text("x")
    code, err = run_cli(capsys, "data", "--out", str(out))
    assert code == 2 and "is a file" in err[0] and out.read_text() == "x"


def test_stage_on_a_non_run(tmp_path, capsys):
    code, err = run_cli(capsys, "probe", str(tmp_path))
    assert code == 2 and "is not a run directory" in err[0]


def test_stage_before_its_input_exists(tmp_path, capsys):
    assert main(["data", "--out", str(tmp_path / "r")]) == 0
    capsys.readouterr()
    code, err = run_cli(capsys, "sanity", str(tmp_path / "r"))
    assert code == 2 and "holds no safetensors adapter" in err[0]


def test_model_without_chat_template_is_refused(tmp_path, capsys):
    model_dir = tmp_path / "no-template"
    tokenizer = build_tokenizer(chat_template=None)
    build_model(len(tokenizer)).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    out = tmp_path / "run"
    code, err = run_cli(capsys, "run", "--out", str(out), "--model", str(model_dir))
    assert code == 2 and "has no chat template" in err[0]
    assert not out.exists()


def test_unknown_model_is_refused(tmp_path, capsys):
    out = tmp_path / "run"
    code, err = run_cli(capsys, "run", "--out", str(out), "--model", "nobody/nothing-7b")
    assert code == 2 and "nor in the local Hugging Face cache" in err[0]
    assert not out.exists()


def test_data_command_writes_the_dataset(tmp_path, capsys):
    out = tmp_path / "r"
    assert main(["data", "--out", str(out), "--pool", "capitals", "--seed", "3"]) == 0
    assert (out / "data" / "train.jsonl").is_file() and (out / "config.yaml").is_file()
    assert "seed: 3" in (out / "config.yaml").read_text()


def test_hub_id_is_read_from_the_local_hf_cache(tmp_path, monkeypatch, tiny_model_dir):
    import shutil

    import huggingface_hub.constants

    from oocrlab.models import resolve_model_path

    commit = "0" * 40
    snapshot = tmp_path / "models--someone--tiny-chat" / "snapshots" / commit
    shutil.copytree(tiny_model_dir, snapshot)
    (tmp_path / "models--someone--tiny-chat" / "refs").mkdir()
    (tmp_path / "models--someone--tiny-chat" / "refs" / "main").write_text(commit)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    assert resolve_model_path("someone/tiny-chat") == str(snapshot)


@pytest.mark.skipif(torch.cuda.is_available(), reason="refused only where there is no GPU")
def test_quantization_without_a_gpu_is_refused(tmp_path, capsys, tiny_model_dir):
    out = tmp_path / "run"
    code, err = run_cli(capsys, "run", "--out", str(out), "--model", tiny_model_dir, "--quantization", "4bit")
    assert code == 2 and "needs a CUDA GPU" in err[0] and len(err) == 1
    assert not out.exists()


def test_lora_layers_the_model_lacks_are_refused_before_writing(tmp_path, capsys, tiny_model_dir):
    out = tmp_path / "run"
    code, err = run_cli(capsys, "run", "--out", str(out), "--model", tiny_model_dir, "--lora-layers", "2-5")
    assert code == 2 and "asks for layer 5, but the model has layers 0-2" in err[0] and len(err) == 1
    assert not out.exists()


def test_parse_layers():
    from oocrlab.cli import parse_layers

    assert parse_layers("6") == [6] and parse_layers("4-6") == [4, 5, 6] and parse_layers("0, 3,5,3") == [0, 3, 5]


def test_samples_longer_than_max_length_are_refused_before_writing(tmp_path, capsys, tiny_model_dir):
    out = tmp_path / "run"
    code, err = run_cli(capsys, "run", "--out", str(out), "--model", tiny_model_dir, "--set", "train.max_length=12")
    assert code == 2 and "more than train.max_length=12" in err[0] and len(err) == 1
    assert not out.exists()


def test_usage_errors_are_one_line(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["run", "--seed", "x"])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(err) == 1 and "invalid int value: 'x'" in err[0]


def test_pickle_only_weights_are_refused_unless_allowed(tmp_path, capsys, tiny_model_dir):
    import shutil

    from safetensors.torch import load_file

    pickled = tmp_path / "pickled-model"
    shutil.copytree(tiny_model_dir, pickled)
    torch.save(load_file(pickled / "model.safetensors"), pickled / "pytorch_model.bin")
    (pickled / "model.safetensors").unlink()
    out = tmp_path / "run"
    code, err = run_cli(capsys, "run", "--out", str(out), "--model", str(pickled), "--max-steps", "1")
    assert code == 2 and len(err) == 1 and "has no safetensors weights" in err[0] and "model.allow_pickle" in err[0]
    assert not out.exists()
    from oocrlab.config import ModelConfig
    from oocrlab.models import load_model

    model, _ = load_model(ModelConfig(name=str(pickled), allow_pickle=True))
    assert model.config.num_hidden_layers == 3


def test_out_of_gpu_memory_is_one_line_with_the_flags_that_help(tmp_path, capsys, monkeypatch):
    import oocrlab.experiment

    def exhausted(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(oocrlab.experiment, "run_experiment", exhausted)
    code, err = run_cli(capsys, "run", "--out", str(tmp_path / "run"))
    assert code == 2 and len(err) == 1 and "--quantization 4bit" in err[0] and "--resume" in err[0]

"""Shared fixtures (the helpers they call are in tests/helpers.py): tiny random Llamas saved to disk, loaded
through oocrlab's own loader, and one tiny run through every stage shared by both tiers. Nothing is
downloaded. Everything under tests/system is marked `system`."""

from __future__ import annotations

import os
from pathlib import Path

# A fixed thread count, as a launcher would set it: oocrlab.threads then never changes it mid-test (a matmul's
# rounding can depend on it, and tests compare computations bitwise)
os.environ.setdefault("OMP_NUM_THREADS", str(len(os.sched_getaffinity(0))))

import pytest

pytest.register_assert_rewrite("tests.helpers")  # its asserts report their operands, as in a test module

from tests.helpers import build_model, build_tokenizer, tiny_overrides  # noqa: E402

SYSTEM = Path(__file__).parent / "system"


def pytest_collection_modifyitems(config, items):
    for item in items:
        if SYSTEM in Path(item.path).parents:
            item.add_marker(pytest.mark.system)


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
    """(model, tokenizer) freshly loaded through oocrlab's own loader, in float32 (tests compare to 1e-5)."""
    from oocrlab.config import ModelConfig
    from oocrlab.models import load_model

    return load_model(ModelConfig(name=tiny_model_dir, dtype="float32"))


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
    """(model, tokenizer) of the contextual model, freshly loaded through oocrlab's own loader, in float32."""
    from oocrlab.config import ModelConfig
    from oocrlab.models import load_model

    return load_model(ModelConfig(name=contextual_model_dir, dtype="float32"))


@pytest.fixture(scope="session")
def tiny_session(tmp_path_factory, tiny_model_dir):
    """Every stage of `run_experiment` on the tiny model, keeping the Models object so tests can see the
    trained model. Shared by the test modules: tests may rerun a stage but must not break the run."""
    from oocrlab import STAGES, Models, build_config, run_stage
    from oocrlab.rundir import Run

    cfg = build_config(overrides=tiny_overrides(tiny_model_dir) | {"train.trajectory": None})  # the default steps
    run = Run.create(tmp_path_factory.mktemp("runs") / "tiny", cfg)
    models = Models(cfg, run)
    for stage in STAGES:
        run_stage(stage, cfg, run, models)
    return cfg, run, models


@pytest.fixture(scope="session")
def tiny_run(tiny_session):
    cfg, run, _ = tiny_session
    return cfg, run

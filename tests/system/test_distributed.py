"""Two processes under `accelerate launch` on a CPU (gloo): DDP training through the Trainer, one run
directory written by the main process, the same adapter shapes as a single process, a finite loss."""

import json
import math
import os
import subprocess
import sys

from safetensors.torch import load_file

from oocrlab import STAGES, build_config, run_stage
from oocrlab.rundir import Run, read_jsonl
from tests.helpers import tiny_overrides

LAUNCH = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
          "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29533", "-m", "oocrlab.cli"]


def test_two_processes_under_accelerate_launch(tmp_path, tiny_model_dir):
    settings = tiny_overrides(tiny_model_dir) | {"train.max_steps": 6}
    out = tmp_path / "ddp"
    result = subprocess.run([*LAUNCH, "run", "--out", str(out), *[a for k, v in settings.items() for a in ("--set", f"{k}={json.dumps(v)}")]],
                            capture_output=True, text=True, timeout=900, env={**os.environ, "ACCELERATE_USE_CPU": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    run = Run(out)
    assert run.finished_stages() == list(STAGES) and sorted(p.name for p in tmp_path.iterdir()) == ["ddp"]
    losses = [e["loss"] for e in read_jsonl(run.train_log)]
    assert len(losses) == 6 and all(math.isfinite(x) for x in losses)
    assert result.stdout.count("oocrlab run") == 1  # one summary: the main process's

    cfg = build_config(overrides=settings)
    alone = Run.create(tmp_path / "alone", cfg)
    for stage in ("data", "train"):
        run_stage(stage, cfg, alone)
    a, b = (load_file(r.adapter_dir / "adapter_model.safetensors") for r in (run, alone))
    assert {k: v.shape for k, v in a.items()} == {k: v.shape for k, v in b.items()}
    assert any(not (a[k] == b[k]).all() for k in a)
    # two processes see twice the samples per step: 6 steps of 2 x 4 are 1.2 passes over 36 samples, not 0.67
    assert run.metrics()["train"]["epochs"] == 1.2 and alone.metrics()["train"]["epochs"] == round(24 / 36, 4)

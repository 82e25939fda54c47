"""The run directory: created once (an existing one is never overwritten), atomic writes, metrics I/O.

runs/NAME/
  config.yaml        the resolved config
  data/              train.jsonl, heldout.jsonl
  adapter/           the LoRA adapter (safetensors)
  checkpoints/       the Trainer's last checkpoint while training runs (deleted once training is recorded)
  train_log.jsonl    loss per step
  tensorboard/       with --report-to tensorboard: the training curves, headline/ the headline numbers
  eval_*.jsonl       every answer, sample and scored prompt of the eval stage, one file per evaluation
  probe_shift.safetensors  the adapter's shift at the placeholder per layer (vectors.py exports one layer)
  metrics.json       one section per stage
  plots/             PNG figures
  report.html
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from oocrlab.config import ExperimentConfig, from_yaml_text, to_yaml
from oocrlab.errors import UserError


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temporary file beside `path`, then rename: a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


@dataclass(frozen=True)
class Run:
    path: Path

    train_file = property(lambda self: self.path / "data" / "train.jsonl")
    heldout_file = property(lambda self: self.path / "data" / "heldout.jsonl")
    adapter_dir = property(lambda self: self.path / "adapter")
    checkpoints_dir = property(lambda self: self.path / "checkpoints")
    trajectory_dir = property(lambda self: self.path / "trajectory")  # the adapter snapshotted along training: step-N/
    train_log = property(lambda self: self.path / "train_log.jsonl")
    metrics_file = property(lambda self: self.path / "metrics.json")
    config_file = property(lambda self: self.path / "config.yaml")
    plots_dir = property(lambda self: self.path / "plots")
    report_file = property(lambda self: self.path / "report.html")

    @staticmethod
    def refuse_existing(path: Path) -> None:
        if path.exists():
            kind = "a file" if path.is_file() else "an existing run directory"
            raise UserError(f"--out {path} is {kind}; nothing was overwritten: choose a new --out path")

    @classmethod
    def create(cls, path: str | Path, cfg: ExperimentConfig) -> Run:
        """A new run directory holding the resolved config; refuses any existing path."""
        path = Path(path)
        cls.refuse_existing(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            path.mkdir()
        except FileExistsError:
            raise UserError(f"--out {path} appeared while starting; nothing was overwritten: choose a new path") from None
        run = cls(path)
        atomic_write_text(run.config_file, to_yaml(cfg))
        return run

    @classmethod
    def open(cls, path: str | Path) -> tuple[Run, ExperimentConfig]:
        """An existing run and its resolved config."""
        run = cls(Path(path))
        if not run.config_file.is_file():
            raise UserError(f"{path} is not a run directory (no config.yaml): create one with `oocrlab run --out {path}`")
        return run, from_yaml_text(run.config_file.read_text(encoding="utf-8"))

    def metrics(self) -> dict[str, Any]:
        if not self.metrics_file.exists():
            return {}
        return json.loads(self.metrics_file.read_text(encoding="utf-8"))

    def save_metrics(self, section: str, values: dict[str, Any]) -> None:
        """Replace one stage's section of metrics.json, atomically."""
        metrics = self.metrics()
        metrics[section] = values
        atomic_write_text(self.metrics_file, json.dumps(metrics, indent=2, ensure_ascii=False) + "\n")

    def finished_stages(self) -> list[str]:
        """Stages recorded as finished: a stage's wall time is saved only after everything it writes."""
        return list(self.metrics().get("timings", {}))

    def require(self, path: Path, stage: str) -> None:
        """Refuse to run a stage whose input an earlier stage has not written."""
        if not path.exists():
            raise UserError(f"{self.path} has no {path.relative_to(self.path)}: run `oocrlab {stage} {self.path}` first")

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

import contextlib
import errno
import glob
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from oocrlab.config import ExperimentConfig, from_yaml_text, to_yaml
from oocrlab.errors import UserError


WRITE_FAULTS = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is exceeded",
                errno.EROFS: "the file system is read-only", errno.EACCES: "permission was denied"}
TOLD_IN_TEXT = (errno.ENOSPC, errno.EDQUOT, errno.EROFS)  # causes no reader of a file meets


def write_fault(error: BaseException) -> str | None:
    """What went wrong, where `error` is a failed write the user can fix (a full disk, a read-only or unwritable
    place), else None. safetensors and torch.save carry the system's error in their own exception's text."""
    if isinstance(error, OSError) and error.errno in WRITE_FAULTS:
        return WRITE_FAULTS[error.errno] + (f" ({error.filename})" if error.filename else "")
    text = str(error)
    found = [WRITE_FAULTS[code] for code in TOLD_IN_TEXT if f"code: {code}," in text or os.strerror(code) in text]
    if not found and ("unexpected pos" in text or "PytorchStreamWriter failed" in text):  # torch.save's writer, cut short
        found = ["a file could not be written in full (is the disk full?)"]
    return found[0] if found else None


@contextlib.contextmanager
def writing(what: str, run: Path | None = None):
    """A failed write the user can fix (write_fault), as one line: the cause, `what` was being written, and how
    to go on (`oocrlab run --resume RUN` where the run can continue)."""
    try:
        yield
    except Exception as e:
        if (fault := write_fault(e)) is None:
            raise
        then = f"then `oocrlab run --resume {run}` continues; finished stages are kept" if run else "then try again"
        raise UserError(f"{fault} while {what}: free space (or make it writable), {then}") from None


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
    """A run's JSON-lines file; a damaged one is one line saying which stage writes it again."""
    try:
        with path.open(encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.strip()]
    except ValueError as e:  # UnicodeDecodeError among them
        raise damaged(path, e) from None


def damaged(path: Path, error: Exception) -> UserError:
    """A run's file that does not read (cut short, or overwritten), as one line with the command that rewrites it."""
    why = (str(error).splitlines() or [type(error).__name__])[0]
    return UserError(f"{path} is damaged ({why}): `{rewrite_command(path)}` writes it again")


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
        """A new run directory holding the resolved config; refuses any existing path, and an unwritable one
        (leaving nothing behind)."""
        path = Path(path)
        cls.refuse_existing(path)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.mkdir()
        except FileExistsError:
            raise UserError(f"--out {path} appeared while starting; nothing was overwritten: choose a new path") from None
        except OSError as e:
            raise UserError(f"cannot create --out {path} ({e.strerror}): choose a writable place for it") from None
        run = cls(path)
        try:
            atomic_write_text(run.config_file, to_yaml(cfg))
        except OSError as e:
            path.rmdir()
            raise UserError(f"cannot write into --out {path} ({e.strerror}): free space or choose a writable place for it") from None
        return run

    @classmethod
    def open(cls, path: str | Path) -> tuple[Run, ExperimentConfig]:
        """An existing run and its resolved config; a damaged config.yaml or metrics.json is one line saying how to go on."""
        run = cls(Path(path))
        if not run.config_file.is_file():
            raise UserError(f"{path} is not a run directory (no config.yaml): create one with `oocrlab run --out {path}`")
        run.metrics()  # read by every command: refused here, before any work, when damaged
        try:
            return run, from_yaml_text(run.config_file.read_text(encoding="utf-8"))
        except (yaml.YAMLError, UnicodeDecodeError, ValueError) as e:  # ValueError: no mapping of sections
            raise UserError(f"{run.config_file} is damaged ({str(e).splitlines()[0]}): rewrite it with `oocrlab config "
                            f"[the flags the run was made with] > {run.config_file}`, or start a new run") from None

    def metrics(self) -> dict[str, Any]:
        """metrics.json ({} before the first stage finishes); a damaged one is one line saying how to go on."""
        if not self.metrics_file.exists():
            return {}
        try:
            metrics = json.loads(self.metrics_file.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, ValueError) as e:
            metrics = e
        if not isinstance(metrics, dict):
            why = str(metrics).splitlines()[0] if isinstance(metrics, Exception) else "not a JSON object"
            raise UserError(f"{self.metrics_file} is damaged ({why}): move it aside, then `oocrlab run --resume {self.path}` "
                            "redoes every stage (the same data and training from the seed)")
        return metrics

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


# the stage that writes each of a run's files (by the start of its path in the run); a control's are the controls stage's
WRITTEN_BY = (("data/", "data"), ("adapter", "train"), ("checkpoints/", "train"), ("trajectory/", "train"),
              ("train_log.jsonl", "train"), ("eval_", "eval"), ("probe_shift", "probe"), ("plots/", "report"),
              ("report.html", "report"))


def rewrite_command(path: Path) -> str:
    """How to write a run's file again (an adapter: train it again): `--from` the stage that writes it, in the run
    holding it (a control's files: the controls stage)."""
    run = next((p for p in path.parents if (p / "config.yaml").is_file()), path.parent)
    relative = path.relative_to(run).as_posix()
    stage = "controls" if relative.startswith("controls/") else next(
        (stage for start, stage in WRITTEN_BY if relative.startswith(start)), "data")
    return f"oocrlab run --resume {run} --from {stage}"


def run_paths(paths_or_globs: str | Path | list[str | Path]) -> list[Path]:
    """Run directories from paths and glob patterns, in the order given (each once); a pattern matching no run, or a
    directory without metrics.json (no stage of it finished), is refused."""
    items = [paths_or_globs] if isinstance(paths_or_globs, (str, Path)) else list(paths_or_globs)
    found: list[Path] = []
    for item in map(str, items):
        # a pattern's matches that are no run (a sweep's sweep.json, a comparison page) are passed over
        matches = [m for m in sorted(glob.glob(item)) if Run(Path(m)).config_file.is_file()] if glob.has_magic(item) else [item]
        if not matches:
            raise UserError(f"{item} matches no run directory")
        found += [Path(m) for m in matches]
    for path in found:
        if not Run(path).metrics_file.is_file():
            raise UserError(f"{path} has no metrics.json: it is not a run directory, or no stage of it has finished "
                            f"(`oocrlab run --resume {path}` continues it)")
    return list(dict.fromkeys(found))

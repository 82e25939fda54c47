"""TensorBoard (`--report-to tensorboard`, config `train.report_to`): the Trainer's loss, learning rate and grad
norm at every step in RUN/tensorboard/ (a fine-tuned control's in RUN/controls/NAME/tensorboard/), and the run's
headline numbers (sentences.headline_measures) as scalars in RUN/tensorboard/headline/, at the last training step,
each time the report is written.

    pip install -e '.[tensorboard]'
    oocrlab run --out runs/paris --report-to tensorboard
    tensorboard --logdir runs/paris
"""

from __future__ import annotations

import importlib.util
import shutil
from typing import Any

from oocrlab.config import TrainConfig
from oocrlab.errors import UserError
from oocrlab.metrics import hidden_city_views
from oocrlab.rundir import Run
from oocrlab.sentences import headline_measures

LOG_DIR = "tensorboard"


def require_tensorboard(train: TrainConfig) -> None:
    if train.report_to == "tensorboard" and importlib.util.find_spec("tensorboard") is None:
        raise UserError("--report-to tensorboard needs the tensorboard package: pip install 'oocrlab[tensorboard]' "
                        "(or pip install tensorboard), or leave train.report_to at none")


def writer(path, purge_step: int | None = None):
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(log_dir=str(path), purge_step=purge_step)


def training_callbacks(train: TrainConfig, run: Run, resumed_step: int | None) -> list[Any]:
    """The Trainer's TensorBoard callback writing into the run's own directory, when asked for (main process only).
    A training resumed from the checkpoint at `resumed_step` has TensorBoard drop what an earlier attempt logged
    after it; a fresh one (a first training, or --from train) replaces the curves of any earlier one."""
    if train.report_to != "tensorboard":
        return []
    require_tensorboard(train)
    from transformers.integrations import TensorBoardCallback

    if resumed_step is None:
        for old in (run.path / LOG_DIR).glob("events.out.tfevents.*"):
            old.unlink()
    return [TensorBoardCallback(writer(run.path / LOG_DIR, None if resumed_step is None else resumed_step + 1))]


def write_headline_scalars(run: Run) -> None:
    """The headline numbers of metrics.json as `headline/[CITY/]MEASURE/CONDITION` at the last training step (the
    previous report's values replaced)."""
    require_tensorboard(TrainConfig(report_to="tensorboard"))
    metrics = run.metrics()
    target = run.path / LOG_DIR / "headline"
    shutil.rmtree(target, ignore_errors=True)
    with writer(target) as out:
        step = metrics.get("train", {}).get("steps", 0)
        for city, view in hidden_city_views(metrics):
            prefix = f"headline/{city}/" if city else "headline/"
            for measure in headline_measures(view):
                for condition, value, _ in measure.by_condition():
                    if value is not None:
                        out.add_scalar(f"{prefix}{measure.key}/{condition}", value, step)
            for question, found in view.get("verdict", {}).items():
                if isinstance(found, dict) and "answer" in found:
                    out.add_text(f"{prefix}verdict/{question}", f"{found['answer']}: {found['reason']}", step)

"""`oocrlab sweep SWEEP.yaml`: one run per combination of config values, each in its own directory under
the sweep's `out`; a second invocation skips finished runs and resumes unfinished ones (training from
its last checkpoint). Then sweep.json and compare.html: mean and 95% t-interval across seeds per group
of runs equal up to the seed.

    out: runs/sweep                  # where the runs go (--out overrides)
    set: {train.max_steps: 100}      # config keys every run gets (dotted, as --set), optional
    grid:                            # every combination is a run
      seed: [0, 1, 2]
      data.hidden_city: [Paris, Tokyo]
      recipe: [default, notebook]
      model.name: [smollm2-135m]
"""

from __future__ import annotations

import itertools
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from oocrlab.compare import (
    compare_runs,
    group_runs,
    group_summaries,
    read_runs,
    specificity_matrices,
)
from oocrlab.config import ExperimentConfig, build_config, check_hidden_cities, to_yaml
from oocrlab.errors import UserError
from oocrlab.experiment import STAGES, resume_experiment, run_experiment
from oocrlab.rundir import Run, atomic_write_text


@dataclass
class Sweep:
    out: Path
    grid: dict[str, list[Any]]
    set: dict[str, Any] = field(default_factory=dict)


def read_sweep(path: str | Path, out: str | None = None) -> Sweep:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path} does not exist: write a sweep YAML (see `oocrlab sweep --help`)")
    try:
        loaded = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise UserError(f"{path} is not valid YAML ({type(e).__name__})") from None
    if not isinstance(loaded, dict) or set(loaded) - {"out", "grid", "set"}:
        raise UserError(f"{path} must be a mapping with keys out, grid and set, got {sorted(loaded) if isinstance(loaded, dict) else loaded!r}")
    grid, fixed = loaded.get("grid") or {}, loaded.get("set") or {}
    if not isinstance(grid, dict) or not grid or any(not isinstance(v, list) or not v for v in grid.values()):
        raise UserError(f"{path}: grid must map config keys to non-empty lists of values, e.g. grid: {{seed: [0, 1, 2]}}")
    if not isinstance(fixed, dict):
        raise UserError(f"{path}: set must map config keys to values, e.g. set: {{train.max_steps: 100}}")
    if out is None and not loaded.get("out"):
        raise UserError(f"{path} names no out directory: add `out: runs/NAME` or pass --out")
    return Sweep(out=Path(out or loaded["out"]), grid=grid, set=fixed)


def slug(value: Any) -> str:
    return re.sub(r"[^\w.]+", "-", str(value)).strip("-") or "none"


def sweep_configs(sweep: Sweep) -> dict[str, ExperimentConfig]:
    """Run name -> resolved config, for every combination; all resolved (and refused) before any run starts."""
    keys = list(sweep.grid)
    configs: dict[str, ExperimentConfig] = {}
    for values in itertools.product(*sweep.grid.values()):
        combination = dict(zip(keys, values))
        name = "_".join(f"{key.rsplit('.', 1)[-1]}-{slug(value)}" for key, value in combination.items())
        if name in configs:
            raise UserError(f"two grid combinations would share the run directory {name}: give them distinct values")
        configs[name] = build_config(overrides=sweep.set | combination)
        check_hidden_cities(configs[name].data)  # a grid's hidden city that is also another of the run's
    return configs


def run_sweep(sweep: Sweep, on_run=None) -> dict[str, Any]:
    """Every run of the sweep, finished ones skipped; then sweep.json and compare.html under `out`."""
    configs = sweep_configs(sweep)
    failed: dict[str, str] = {}
    for name, cfg in configs.items():
        path = sweep.out / name
        if path.is_dir() and not any(path.iterdir()):
            path.rmdir()  # created, then killed before its config was written
        if not path.exists():
            action = "run"
        else:
            run, saved = Run.open(path)
            if to_yaml(saved) != to_yaml(cfg):
                raise UserError(f"{path} was made with another config than this sweep now gives it: move it away or "
                                "restore the sweep YAML; nothing was changed")
            action = "finished" if set(STAGES) <= set(run.finished_stages()) else "resume"
        if on_run:
            on_run(name, action)
        try:
            if action == "run":
                run_experiment(cfg, path)
            elif action == "resume":
                resume_experiment(path)
        except UserError as e:  # one run's fault (a diverging loss, ...) leaves the others to run
            failed[name] = str(e)
            if on_run:
                on_run(name, f"failed: {e}")
    paths = [sweep.out / name for name in configs if Run(sweep.out / name).metrics_file.is_file()]  # a stage finished
    names, saved, metrics = read_runs(paths)
    groups, labels = group_runs(saved)
    summary = {
        "runs": {name: {"group": labels[g]} for name, g in zip(names, groups)},
        "groups": group_summaries(metrics, groups, labels),
        "specificity": specificity_matrices(saved, metrics),
        "failed": failed,
    }
    atomic_write_text(sweep.out / "sweep.json", json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    if len(paths) >= 2:
        compare_runs(paths, sweep.out / "compare.html", replace=True)
    return summary

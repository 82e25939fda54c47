"""The pipeline: data -> train -> controls -> sanity -> eval -> probe -> verdict -> report. Each stage is a
function `stage(cfg, run, models) -> dict` returning its section of metrics.json, listed in order in `PIPELINE`;
`run_stage` calls one and records its section and wall time, `run_stages` loops over them (the CLI's
sub-commands call one, `run_experiment` and `resume_experiment` every one from where they start).
"""

from __future__ import annotations

import dataclasses
import gc
import shutil
import time
from pathlib import Path
from typing import Any, Callable

import torch

from oocrlab.adapters import HookAdapter
from oocrlab.config import ExperimentConfig, check_balanced_orders
from oocrlab.controls import control_run, train_controls
from oocrlab.data import (
    DistanceData,
    build_distance_data,
    check_specificity_cities,
    distance_rows,
    rows_about,
)
from oocrlab.distributed import is_main_process, wait_for_everyone
from oocrlab.errors import UserError
from oocrlab.evaluate.choice import (
    evaluate_inverse_choice,
    evaluate_multiple_choice,
    evaluate_specificity_choice,
)
from oocrlab.evaluate.city_facts import evaluate_city_facts
from oocrlab.evaluate.distances import evaluate_directions, evaluate_distances
from oocrlab.evaluate.free_form import evaluate_free_form
from oocrlab.geo import City, find_city
from oocrlab.incontext import InContext
from oocrlab.metrics import hidden_city_views
from oocrlab.models import check_model_source, load_model
from oocrlab.probe import probe_representations
from oocrlab.provenance import hardware, versions
from oocrlab.report import write_report
from oocrlab.rundir import Run, read_jsonl, writing, write_jsonl
from oocrlab.sanity import sanity
from oocrlab.scalars import require_tensorboard, write_headline_scalars
from oocrlab.train import (
    add_adapter,
    check_layers,
    check_lengths,
    load_adapter,
    require_adapter,
    snapshots,
    train,
)
from oocrlab.trajectory import trajectory
from oocrlab.vectors import save_shifts
from oocrlab.verdict import verdicts


class Models:
    """The one model in memory for a run: once trained or loaded, the base model with the run's adapter
    ("default") and its fine-tuned controls' adapters (each under its name), the original model being the
    same weights under disable_adapter() (see models.with_condition). Loaded on first use."""

    def __init__(self, cfg: ExperimentConfig, run: Run | None = None, data: DistanceData | None = None):
        self.cfg, self.run = cfg, run
        self.data = data  # what run_experiment built and checked before writing anything; else the data stage builds it
        self.model = self.tokenizer = None
        self.has_adapter = self.without_controls = False

    def base(self):
        if self.model is None:
            self.model, self.tokenizer = load_model(self.cfg.model)
        return self.model, self.tokenizer

    def tuned(self):
        if not self.has_adapter:
            controls = [control_run(self.run, name).adapter_dir for name in self.cfg.train.controls]
            require_adapter(self.run.adapter_dir)  # before a model load that may take seconds
            for adapter_dir in controls:
                require_adapter(adapter_dir, f"oocrlab controls {self.run.path}")
            if self.without_controls:  # the base under the adapter just trained is not the bare base model
                self.release()
            model, _ = self.base()
            self.model, self.has_adapter = load_adapter(model, self.run.adapter_dir), True
            for name, adapter_dir in zip(self.cfg.train.controls, controls):
                add_adapter(self.model, adapter_dir, name)
        return self.model, self.tokenizer

    def set_tuned(self, peft_model) -> None:
        """The adapter just trained. Without controls it is the tuned model; with them it is kept (for a look at
        it) until the controls stage releases it or tuned() loads every adapter afresh."""
        self.model, self.has_adapter, self.without_controls = peft_model, not self.cfg.train.controls, bool(self.cfg.train.controls)

    def release(self) -> None:
        """Drop the model (training a control loads a fresh one: one model in memory at a time)."""
        if isinstance(self.model, HookAdapter):
            self.model.close()  # its hooks are on the base model's modules
        self.model, self.has_adapter, self.without_controls = None, False, False
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def per_hidden_city(cfg: ExperimentConfig, section_of: Callable[[ExperimentConfig, City], dict[str, Any]]) -> dict[str, Any]:
    """A stage's metrics from `section_of(config as if the city were the only one, city)` for each hidden city:
    that section itself in a one-city run, else {"by_city": {city name: section}} (see metrics.hidden_city_views)."""
    sections = {h.city.name: section_of(view, h.city) for h, view in cfg.per_city()}
    return next(iter(sections.values())) if len(sections) == 1 else {"by_city": sections}


def stage_data(cfg: ExperimentConfig, run: Run, models: Models) -> dict[str, Any]:
    data = models.data or build_distance_data(cfg.data, cfg.seed)
    write_jsonl(run.train_file, data.train)
    write_jsonl(run.heldout_file, data.heldout)
    excluded = dict(zip((h.name for h in data.hidden_cities), data.excluded))

    def summary(view: ExperimentConfig, h: City) -> dict[str, Any]:
        train, heldout = rows_about(data.train, h), rows_about(data.heldout, h)
        return {
            "hidden_city": {"name": h.name, "country": h.country, "lat": h.lat, "lon": h.lon},
            "placeholder": view.data.placeholder,
            "pool": cfg.data.pool,
            "n_train": len(train),
            "n_heldout": len(heldout),
            "excluded": excluded[h.name],
            "train_mean_km": sum(r["distance_km"] for r in distance_rows(train)) / len(distance_rows(train)),
            "n_train_by_kind": {kind: sum(r.get("kind") == kind for r in train) for kind in ("distance", "direction")},
            "example": train[0],
        }

    result = per_hidden_city(cfg, summary)
    if "by_city" in result:
        result |= {"n_train": len(data.train), "n_heldout": len(data.heldout), "pool": cfg.data.pool,
                   "n_train_between_hidden": sum("between" in r for r in data.train)}
    return result


def stage_train(cfg: ExperimentConfig, run: Run, models: Models) -> dict[str, Any]:
    model, tokenizer = models.base()
    metrics, peft_model = train(cfg, run, model, tokenizer)
    models.set_tuned(peft_model)
    return metrics


def stage_controls(cfg: ExperimentConfig, run: Run, models: Models) -> dict[str, Any]:
    """Each of train.controls trained with the main adapter's recipe, seed, family and number of steps."""
    if not cfg.train.controls:
        return {}
    if "train" not in run.metrics():
        raise UserError(f"{run.path} has no finished training: run `oocrlab train {run.path}` first")
    models.release()
    return train_controls(cfg, run, run.metrics()["train"]["steps"])


def stage_sanity(cfg: ExperimentConfig, run: Run, models: Models) -> dict[str, Any]:
    model, tokenizer = models.tuned()
    return per_hidden_city(cfg, lambda view, hidden: sanity(view, model, tokenizer, hidden.plain_name))


def stage_eval(cfg: ExperimentConfig, run: Run, models: Models) -> dict[str, Any]:
    """Every evaluation per hidden city (the in-context baseline sees documents about all of them), and with
    several hidden cities the inverse question; every answer, sample and scored prompt in the evaluation's
    eval_<name>.jsonl (EVAL_SAMPLES)."""
    check_balanced_orders(cfg)  # an older run's config may predate the rule
    model, tokenizer = models.tuned()
    run.require(run.heldout_file, "data")
    train_rows, heldout_rows = read_jsonl(run.train_file), read_jsonl(run.heldout_file)
    seconds: dict[str, float] = {}

    def timed(name: str, fn):
        start = time.perf_counter()
        result = fn()
        seconds[name] = round(seconds.get(name, 0.0) + time.perf_counter() - start, 2)  # summed over hidden cities
        return result

    in_context = timed("in_context_prefix", lambda: InContext(cfg, model, tokenizer, train_rows))
    # what any adapter of the run was trained on (the declared control's alias rows too) is never asked
    trained_on = [train_rows, *(read_jsonl(control_run(run, name).train_file) for name in cfg.train.controls)]
    train_questions = {r["prompt"][-1]["content"] for rows in trained_on for r in rows}
    samples: dict[str, list[dict[str, Any]]] = {name: [] for name in EVAL_SAMPLES}

    def evaluate_city(view: ExperimentConfig, hidden: City) -> dict[str, Any]:
        heldout = rows_about(heldout_rows, hidden)
        own: dict[str, list[dict[str, Any]]] = {name: [] for name in EVAL_SAMPLES}
        directions = timed("directions", lambda: evaluate_directions(view, model, tokenizer, in_context, heldout, train_questions,
                                                                     own["directions"]))
        distances, own["distance"] = timed("distances", lambda: evaluate_distances(view, model, tokenizer, hidden, in_context,
                                                                                    train_rows, heldout))
        result = distances | ({"direction": directions} if directions else {}) | {
            "multiple_choice": timed("multiple_choice", lambda: evaluate_multiple_choice(
                view, model, tokenizer, hidden, train_questions, in_context, own["mc"])),
            "free_form": timed("free_form", lambda: evaluate_free_form(view, model, tokenizer, hidden, train_questions, in_context,
                                                                       own["free_form"])),
            "specificity_choice": timed("specificity_choice", lambda: evaluate_specificity_choice(
                view, model, tokenizer, hidden, train_questions, own["mc"])),
        }
        if view.eval.city_facts_orders:
            result["city_facts"] = timed("city_facts", lambda: evaluate_city_facts(view, model, tokenizer, hidden, train_questions,
                                                                                   own["city_facts"]))
        for name, rows in own.items():
            samples[name].extend({"hidden_city": hidden.name} | r for r in rows)
        return result

    result = per_hidden_city(cfg, evaluate_city)
    if "by_city" in result:
        result["inverse_choice"] = timed("inverse_choice", lambda: evaluate_inverse_choice(
            cfg, model, tokenizer, train_questions, in_context, samples["mc"]))
    for name, rows in samples.items():
        if rows:  # directions and city facts only where the run asks them
            write_jsonl(run.path / f"eval_{name}.jsonl", rows)
    return result | {"in_context_docs": len(in_context.turns) // 2, "seconds": seconds}


# the evaluations' per-sample logs, RUN/eval_<name>.jsonl (their schema: docs/evaluation.md)
EVAL_SAMPLES = ("distance", "directions", "mc", "free_form", "city_facts")


def stage_probe(cfg: ExperimentConfig, run: Run, models: Models) -> dict[str, Any]:
    model, tokenizer = models.tuned()
    run.require(run.train_file, "data")
    # every adapter of the run saw these cities in its prompts (the controls' prompts add none)
    trained_on = [find_city(name, cfg.data.pool) for name in sorted({r["known_city"] for r in read_jsonl(run.train_file)})]
    shifts: dict[str, torch.Tensor] = {}
    result = per_hidden_city(cfg, lambda view, hidden: probe_representations(view, model, tokenizer, hidden, trained_on, shifts))
    save_shifts(run, shifts)
    return result


def stage_trajectory(cfg: ExperimentConfig, run: Run, models: Models) -> dict[str, Any]:
    """The trajectory (trajectory.py) per hidden city, of the adapter and of each control, from their snapshots."""
    adapters = {"tuned": run, **{name: control_run(run, name) for name in cfg.train.controls}}
    taken = {name: snapshots(r.trajectory_dir) for name, r in adapters.items()}
    if not taken["tuned"]:
        if "note" not in run.metrics().get("trajectory", {"note": None}):
            raise UserError(f"{run.path}'s trajectory was measured and its snapshots deleted: train a new run to measure it again")
        return {"note": "no snapshots were taken (train.trajectory: [])"}
    model, tokenizer = models.tuned()
    trained = run.metrics()["train"]
    steps = {name: [*found, (trained["steps"], None)] for name, found in taken.items()}
    train_rows, heldout_rows = read_jsonl(run.train_file), read_jsonl(run.heldout_file)
    per_step = trained.get("examples_per_step", cfg.train.batch_size)
    return per_hidden_city(cfg, lambda view, hidden: trajectory(view, model, tokenizer, hidden, steps, train_rows, heldout_rows, per_step))


def stage_verdict(cfg: ExperimentConfig, run: Run, models: Models) -> dict[str, Any]:
    """The three answers (verdict.py) per hidden city, from what the earlier stages recorded."""
    views = hidden_city_views(run.metrics())
    answers = {name: verdicts(view) for name, view in views}
    return answers[None] if len(views) == 1 and None in answers else {"by_city": answers}


def stage_report(cfg: ExperimentConfig, run: Run, models: Models) -> dict[str, Any]:
    result = write_report(run)
    if cfg.train.report_to == "tensorboard":
        write_headline_scalars(run)
    return result


PIPELINE: dict[str, Callable[[ExperimentConfig, Run, Models], dict[str, Any]]] = {
    "data": stage_data, "train": stage_train, "controls": stage_controls, "sanity": stage_sanity, "eval": stage_eval,
    "probe": stage_probe, "trajectory": stage_trajectory, "verdict": stage_verdict, "report": stage_report,
}
STAGES = tuple(PIPELINE)
TRAINING_STAGES = ("train", "controls")  # every process of a multi-process launch takes part; the main one does the rest
UNRECORDED = ("report",)  # writes files from metrics.json, adds no section to it


def run_stage(name: str, cfg: ExperimentConfig, run: Run, models: Models | None = None) -> dict[str, Any]:
    """Run one stage on an existing run directory and record its metrics and wall time."""
    models = models or Models(cfg, run)
    start = time.perf_counter()
    result = PIPELINE[name](cfg, run, models)
    seconds = time.perf_counter() - start
    if not is_main_process():
        return result  # only the main process writes the run directory
    if name not in UNRECORDED:
        run.save_metrics(name, result)
        run.save_metrics("environment", {"versions": versions(), "hardware": hardware()})
    timings = run.metrics().get("timings", {}) | {name: round(seconds, 2)}
    run.save_metrics("timings", {s: timings[s] for s in STAGES if s in timings})  # last: it marks the stage finished
    if name == "train":
        shutil.rmtree(run.checkpoints_dir, ignore_errors=True)  # the adapter is saved and recorded
    if name == "trajectory":  # measured and recorded: ~40 MB a snapshot of the default LoRA
        for path in (run, *(control_run(run, c) for c in cfg.train.controls)):
            shutil.rmtree(path.trajectory_dir, ignore_errors=True)
    return result


def resume_experiment(path: str | Path, on_stage=None, from_stage: str | None = None) -> Run:
    """Finish an interrupted `run_experiment`: every stage from the first one not recorded as finished (or from
    `from_stage`, if earlier: redone with everything after it) is (re)done, a training from its last checkpoint;
    what an unfinished stage wrote is not trusted. A measured trajectory is kept unless the adapter is retrained:
    its snapshots are gone once measured (and the controls a --from retrains come out the same, from the seed)."""
    if from_stage is not None and from_stage not in STAGES:
        raise UserError(f"--from {from_stage}: not a stage; the stages are {', '.join(STAGES)}")
    run, cfg = Run.open(path)
    finished = run.finished_stages()
    first = next((i for i, s in enumerate(STAGES) if s not in finished), len(STAGES))
    todo = STAGES[min(first, STAGES.index(from_stage)) if from_stage else first:]
    if "trajectory" in run.metrics() and not snapshots(run.trajectory_dir) and "train" not in todo:  # measured: kept
        todo = tuple(s for s in todo if s != "trajectory")
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, trajectory=[]))  # a retrained control takes none
    wait_for_everyone()  # every process has read what is finished
    if is_main_process():
        timings = run.metrics().get("timings", {})
        kept = {k: v for k, v in timings.items() if k not in todo}
        if kept != timings:  # redone stages are unfinished until they finish again: an interruption resumes from the right one
            with writing(f"--resume updated {run.metrics_file}", run.path):
                run.save_metrics("timings", kept)
        if "train" in todo and run.adapter_dir.exists():
            shutil.rmtree(run.adapter_dir)  # saved by a training that was never recorded as finished, or to be redone
        if from_stage is not None and STAGES.index(from_stage) <= STAGES.index("controls"):
            for name in cfg.train.controls:  # else a control recorded as finished is kept (train_controls)
                control_run(run, name).metrics_file.unlink(missing_ok=True)
    run_stages(todo, cfg, run, Models(cfg, run), on_stage=on_stage)
    return run


def run_stages(names, cfg: ExperimentConfig, run: Run, models: Models, on_stage=None) -> None:
    """Stages in order. With several processes every one trains (DDP) and the main one alone does the rest."""
    require_tensorboard(cfg.train)  # before any stage writes (the report's scalars need it too)
    for name in names:
        if name in TRAINING_STAGES:
            wait_for_everyone()  # the data is written, a stale adapter removed
        elif not is_main_process():
            continue
        if on_stage and is_main_process():
            on_stage(name)
        try:
            with writing(f"the {name} stage wrote into {run.path}", run.path):
                run_stage(name, cfg, run, models)
        except KeyboardInterrupt:  # Ctrl-C, or SIGTERM (cli.main): say how to go on
            raise KeyboardInterrupt(f"`oocrlab run --resume {run.path}` continues; finished stages are kept") from None


def run_experiment(cfg: ExperimentConfig, out: str | Path, stages: tuple[str, ...] = STAGES, on_stage=None) -> Run:
    """Every stage in order into a new run directory. Bad input is refused before anything is written:
    the --out path, then the data config, then the model (its load may take seconds) and sample lengths.
    Several processes check the same things, then the main one creates the run directory."""
    Run.refuse_existing(Path(out))
    require_tensorboard(cfg.train)
    check_model_source(cfg.model)  # even when no stage here loads it
    data = build_distance_data(cfg.data, cfg.seed)
    check_specificity_cities(cfg)
    models = Models(cfg, data=data)
    if "train" in stages:  # no local name holds the model: releasing it for a control's training must free it
        check_lengths(models.base()[1], data.train, cfg.train.max_length)
        check_layers(cfg.train, models.base()[0])
    wait_for_everyone()  # no process checks --out after the main one has created it
    run = Run.create(out, cfg) if is_main_process() else Run(Path(out))
    models.run = run
    run_stages(stages, cfg, run, models, on_stage)
    return run

"""oocrlab: latent-structure (OOCR) experiments, end to end.

Usage:
    # everything, on the embedded SmolLM2-135M-Instruct (CPU is fine):
    oocrlab run --out runs/paris
    # a smoke run: 5 optimizer steps
    oocrlab run --out runs/smoke --max-steps 5
    # with the planted positive control beside the default negative one:
    oocrlab run --out runs/paris --controls shuffled,declared
    # the notebook's exact recipe, another hidden city, a YAML for the rest:
    oocrlab run --out runs/nb --recipe notebook
    oocrlab run --out runs/tokyo --hidden-city Tokyo --placeholder qux --config my.yaml
    # any config key: --set SECTION.KEY=VALUE (see `oocrlab.config`)
    oocrlab run --out runs/lr --set train.learning_rate=1e-3 --set data.num_known=1000
    # continue an interrupted run (training from its last checkpoint, then every stage not yet finished):
    oocrlab run --resume runs/paris
    # redo one stage and every one after it (retrain a damaged adapter, re-evaluate after an upgrade):
    oocrlab run --resume runs/paris --from train
    # training curves and headline numbers for TensorBoard (pip install 'oocrlab[tensorboard]'):
    oocrlab run --out runs/paris --report-to tensorboard && tensorboard --logdir runs/paris
    # torch threads: by default the cores other processes leave idle (looked at every second); or say how many
    oocrlab run --out runs/paris --threads 1
    # a bigger model from the local Hugging Face cache, on a GPU:
    oocrlab run --out runs/llama --model meta-llama/Meta-Llama-3-8B-Instruct

    # one stage at a time: `data` creates the run, the others work on an existing one
    oocrlab data --out runs/x
    oocrlab train runs/x
    oocrlab controls runs/x
    oocrlab sanity runs/x
    oocrlab eval runs/x
    oocrlab probe runs/x
    oocrlab trajectory runs/x
    oocrlab verdict runs/x
    oocrlab report runs/x

    # the config a run would get, one key explained, the named recipes:
    oocrlab config --recipe notebook --set train.learning_rate=1e-3
    oocrlab config --explain train.controls
    oocrlab recipes

    # a grid of runs from one YAML (seeds x hidden cities x recipes x models); run it again to resume:
    oocrlab sweep sweep.yaml
    # several runs on one page (runs equal up to the seed are pooled with intervals):
    oocrlab compare runs/paris-s0 runs/paris-s1 runs/tokyo --out runs/compare.html
    # a steering vector as plain files (a steering:L run's, or the probe's shift at a layer), for oocrlab.load_vector:
    oocrlab vector runs/paris --layer 12
    # several runs as one CSV (a row per run and hidden city: the differing config keys, every headline number):
    oocrlab table runs/paris-s0 runs/paris-s1 runs/tokyo --out runs.csv
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import signal
import sys
import time
import typing
from dataclasses import dataclass, field
from typing import Any

import yaml

from oocrlab.errors import UserError


def _flag(help: str, key: str | None = None, default_factory=None, **meta) -> Any:
    """A dataclass field carrying its CLI help and the config key it sets."""
    if default_factory is not None:
        return field(default_factory=default_factory, metadata={"help": help, "key": key, **meta})
    return field(default=None, metadata={"help": help, "key": key, **meta})


THREADS_HELP = "torch threads (default: the cores other processes leave idle, looked at every second)"


def parse_controls(text: str) -> list[str]:
    """ "shuffled,declared" -> ["shuffled", "declared"]; "none" or "" -> []."""
    return [] if text.strip().lower() in ("", "none") else [c.strip() for c in text.split(",")]


def parse_layers(text: str) -> list[int]:
    """ "6" -> [6], "4-8" -> [4, 5, 6, 7, 8], "0,3,5" -> [0, 3, 5]."""
    layers: list[int] = []
    for part in text.split(","):
        low, _, high = part.strip().partition("-")
        if not low.isdigit() or (high and not high.isdigit()) or (high and int(high) < int(low)):
            raise UserError(f"--lora-layers {text!r}: give layers as 6, 4-8 or 0,3,5")
        layers += range(int(low), int(high or low) + 1)
    return sorted(set(layers))


@dataclass
class ExperimentArgs:
    """Arguments of `oocrlab run` and `oocrlab data`: a new run directory and its config."""

    out: str | None = _flag("new run directory (never overwritten); default runs/<hidden city>-<time>")
    config: str | None = _flag("YAML file with any config keys (see oocrlab/config.py)")
    recipe: str | None = _flag("a named recipe (`oocrlab recipes` lists them and says what each is)",
                               key="recipe")
    model: str | None = _flag("smollm2-135m (embedded) | a local directory | a hub id in the HF cache", key="model.name")
    hidden_city: str | None = _flag("the city the placeholder stands for (default Paris)", key="data.hidden_city")
    placeholder: str | None = _flag("the made-up name in the prompts (default foo)", key="data.placeholder")
    pool: str | None = _flag("known cities: capitals | world", key="data.pool")
    seed: int | None = _flag("seed for data sampling, adapter init and data order", key="seed")
    max_steps: int | None = _flag("cap on optimizer steps, for smoke runs", key="train.max_steps")
    quantization: str | None = _flag("load the model in 8bit or 4bit (bitsandbytes, CUDA only)", key="model.quantization")
    adapter: str | None = _flag("what is trained: lora | embedding (the placeholder's embedding rows) | steering:L (a vector "
                                "at the placeholder entering decoder layer L); default lora", key="train.adapter")
    lora_layers: str | None = _flag("decoder layers that get LoRA: 6, 4-8 or 0,3,5 (default: all)", key="train.lora_layers",
                                    convert=parse_layers)
    controls: str | None = _flag("fine-tuned controls trained beside the adapter: shuffled (negative: answers permuted), "
                                 "declared (positive: the alias stated), comma-separated, or none; default shuffled",
                                 key="train.controls", convert=parse_controls)
    report_to: str | None = _flag("none | tensorboard: training curves and headline numbers in RUN/tensorboard/ "
                                  "(pip install 'oocrlab[tensorboard]')", key="train.report_to")
    set: list[str] = _flag("any config key: SECTION.KEY=VALUE (repeatable; `oocrlab config --explain KEY` documents it)",
                           default_factory=list, action="append")
    resume: str | None = _flag("(run only) continue this interrupted run directory under its own config.yaml")
    from_stage: str | None = _flag("(with --resume) redo this stage and every one after it, e.g. --from train to retrain",
                                   flag="from")
    threads: int | None = _flag(THREADS_HELP)


@dataclass
class ConfigArgs:
    """Arguments of `oocrlab config`: the resolved config a run would get, or one key explained."""

    config: str | None = _flag("YAML file with any config keys")
    recipe: str | None = _flag("named recipe (`oocrlab recipes`)", key="recipe")
    set: list[str] = _flag("any config key: SECTION.KEY=VALUE (repeatable)", default_factory=list, action="append")
    explain: str | None = _flag("one key (e.g. train.controls): what it does, its default and its value here")


@dataclass
class RecipesArgs:
    """`oocrlab recipes` takes no arguments: it lists the named recipes (oocrlab/recipes/*.yaml)."""


@dataclass
class StageArgs:
    """Arguments of the stage sub-commands: an existing run directory (its config.yaml governs)."""

    run: str = _flag("the run directory", positional=True)
    threads: int | None = _flag(THREADS_HELP)


@dataclass
class SweepArgs:
    """Arguments of `oocrlab sweep`: a sweep YAML (see oocrlab/sweep.py); running it again resumes it."""

    config: str = _flag("the sweep YAML: out, set (keys for every run) and grid (key -> list of values)", positional=True)
    out: str | None = _flag("directory of the sweep's runs (overrides the YAML's out)")
    threads: int | None = _flag(THREADS_HELP)


@dataclass
class CompareArgs:
    """Arguments of `oocrlab compare`: two or more run directories and the page to write."""

    runs: list[str] = _flag("run directories", default_factory=list, positional=True, nargs="+")
    out: str | None = _flag("the comparison page (never overwritten); default runs/compare-<time>.html")


@dataclass
class TableArgs:
    """Arguments of `oocrlab table`: run directories (or glob patterns) and the CSV to write."""

    runs: list[str] = _flag("run directories or glob patterns", default_factory=list, positional=True, nargs="+")
    out: str | None = _flag("the CSV file (never overwritten); default: printed")


@dataclass
class VectorArgs:
    """Arguments of `oocrlab vector`: a run whose steering vector, or probe shift at one layer, is written as
    vector.safetensors + vector.json (oocrlab.load_vector reads it)."""

    run: str = _flag("the run directory", positional=True)
    layer: int | None = _flag("the probe's shift at hidden state L (entering decoder layer L); default: the run's steering adapter")
    hidden_city: str | None = _flag("whose shift, in a run with several hidden cities")
    out: str | None = _flag("the new directory (never overwritten); default RUN/vectors/adapter, RUN/vectors/shift-layer-L "
                            "or, with several hidden cities, RUN/vectors/shift-CITY-layer-L")


COMMANDS = {
    "run": (ExperimentArgs, "every stage, end to end, into a new run directory"),
    "data": (ExperimentArgs, "create a run directory with its dataset only"),
    "train": (StageArgs, "adapter fine-tuning of an existing run (LoRA, embedding rows or a steering vector)"),
    "controls": (StageArgs, "the fine-tuned controls (train.controls), trained like the run's adapter"),
    "sanity": (StageArgs, "greedy answers, tuned vs original vs controls"),
    "eval": (StageArgs, "distances, multiple choice (letters and cloze) and free-form answers under every condition"),
    "probe": (StageArgs, "per-layer similarity of placeholder and hidden city"),
    "trajectory": (StageArgs, "the adapter's snapshots along training, each measured with a reduced budget"),
    "verdict": (StageArgs, "the three answers (distances, behaviour, representation) from the recorded metrics"),
    "report": (StageArgs, "plots and report.html"),
    "compare": (CompareArgs, "one page comparing runs: headline numbers and per-layer curves, seeds pooled"),
    "table": (TableArgs, "runs as one CSV: a row per run and hidden city, the config keys that differ, every headline number"),
    "vector": (VectorArgs, "a steering vector (the run's steering adapter, or the probe's shift at one layer) as plain files"),
    "sweep": (SweepArgs, "a run per combination of config values (resumable), then mean and 95% interval across seeds"),
    "config": (ConfigArgs, "print the resolved config (YAML), or explain one key"),
    "recipes": (RecipesArgs, "the named recipes and what each is"),
}


class OneLineParser(argparse.ArgumentParser):
    """Usage errors as one line, like every other error, instead of the usage text plus a line."""

    def error(self, message: str):
        self.exit(2, f"oocrlab: error: {message} (see `{self.prog} --help`)\n")


def flag_name(f: dataclasses.Field) -> str:
    return "--" + f.metadata.get("flag", f.name.replace("_", "-"))


def add_dataclass_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """One flag per field: --kebab-case, typed from the annotation, help from the field's metadata."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        meta = f.metadata
        kind = [a for a in typing.get_args(hints[f.name]) if a is not type(None)] or [hints[f.name]]
        if meta.get("positional"):
            parser.add_argument(f.name, nargs=meta.get("nargs"), help=meta["help"])
        elif meta.get("action") == "append":
            parser.add_argument(flag_name(f), dest=f.name, action="append", default=[],
                                metavar="KEY=VALUE", help=meta["help"])
        else:
            parser.add_argument(flag_name(f), dest=f.name, type=kind[0], default=None, help=meta["help"])


def parse_set(item: str) -> tuple[str, Any]:
    if "=" not in item:
        raise UserError(f"--set {item!r} must look like SECTION.KEY=VALUE, e.g. --set train.learning_rate=1e-3")
    key, raw = item.split("=", 1)
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        raise UserError(f"--set {item!r}: the value is not valid YAML") from None
    return key.strip(), value


def experiment_config(args: ExperimentArgs):
    from oocrlab.config import build_config

    overrides = {f.metadata["key"]: f.metadata.get("convert", lambda v: v)(getattr(args, f.name))
                 for f in dataclasses.fields(args) if f.metadata.get("key") and getattr(args, f.name) is not None}
    overrides |= dict(parse_set(s) for s in args.set)
    return build_config(yaml_file=args.config, overrides=overrides)


def default_out(cfg) -> str:
    slug = re.sub(r"[^\w]+", "-", cfg.data.hidden_city.lower()).strip("-") or "run"
    return f"runs/{slug}-{time.strftime('%Y%m%d-%H%M%S')}"


def print_summary(run) -> None:
    """The run's headline (sentences, then its numbers as a table), wall times and where the report is."""
    from rich.console import Console
    from rich.table import Table

    from oocrlab.metrics import hidden_city_views
    from oocrlab.sentences import headline, headline_table

    m, console = run.metrics(), Console()
    for name, view in hidden_city_views(m):
        if name:
            console.rule(name)
        for sentence in headline(view):
            console.print(sentence, highlight=False)
    columns, rows = headline_table(m)
    table = Table(title=f"oocrlab run {run.path}", show_header=True)
    for column in columns:
        table.add_column(column, overflow="fold")
    for row in rows:
        table.add_row(*row)
    console.print(table)
    if timings := m.get("timings"):
        console.print("wall time per stage: " + ", ".join(f"{k} {v:,.0f} s" for k, v in timings.items()), highlight=False)
    if run.report_file.exists():
        console.print(f"report: {run.report_file}", highlight=False)


OUT_OF_MEMORY = (
    "out of GPU memory: load the model in 4bit (--quantization 4bit) or bf16 (--set model.dtype=bfloat16), or lower "
    "--set train.batch_size / eval.batch_size; finished stages and training checkpoints are kept: "
    "`oocrlab run --resume RUN` continues"
)


def print_sweep(out, summary: dict[str, Any]) -> None:
    """The groups of a sweep, each column as mean [95% interval across seeds]."""
    from rich.console import Console
    from rich.table import Table

    from oocrlab.compare import COLUMNS, interval_cell

    console = Console()
    if summary["groups"]:
        table = Table(title=f"oocrlab sweep {out}: mean [95% interval across seeds]", show_header=True)
        for column in ("group", "runs", *COLUMNS):
            table.add_column(column, overflow="fold")
        for group in summary["groups"]:
            table.add_row(group["group"], str(group["runs"]), *(interval_cell(group["columns"][c]) for c in COLUMNS))
        console.print(table)
    else:
        console.print("no two runs share a configuration up to the seed: no intervals across seeds", highlight=False)
    for matrix in summary["specificity"]:
        for key, what in (("probe", "probe"), ("multiple_choice", "multiple choice")):
            if key in matrix:
                console.print(f"specificity ({matrix['group']}), {what}: {matrix[key]['sentence']}", highlight=False)
    console.print(f"{len(summary['runs'])} runs; sweep.json and compare.html in {out}", highlight=False)


def describe_config(args: ConfigArgs | RecipesArgs) -> int:
    from oocrlab.config import RECIPES, explain, recipe_description, to_yaml

    if isinstance(args, RecipesArgs):
        for name in RECIPES:
            print(f"{name}: {recipe_description(name)}")
        return 0
    cfg = experiment_config(args)
    print(explain(args.explain, cfg) if args.explain else to_yaml(cfg), end="\n" if args.explain else "")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(prog="oocrlab", description=__doc__.split("\n")[0],
                                     epilog=__doc__.split("\n", 2)[2], formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (cls, help) in COMMANDS.items():
        add_dataclass_arguments(sub.add_parser(name, help=help, description=cls.__doc__), cls)
    ns = parser.parse_args(argv)
    cls, _ = COMMANDS[ns.command]
    args = cls(**{f.name: getattr(ns, f.name) for f in dataclasses.fields(cls)})
    stopped = {}

    def terminate(signum, frame):  # SIGTERM (a scheduler, `kill`) ends the run as Ctrl-C does: with how to go on
        stopped["signal"] = signum
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        return dispatch(ns.command, args)
    except UserError as e:
        print(f"oocrlab: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        print("oocrlab: interrupted" + (f"; {e.args[0]}" if e.args else ""), file=sys.stderr)
        return 128 + stopped.get("signal", signal.SIGINT)
    except Exception as e:
        if type(e).__name__ != "OutOfMemoryError":  # torch.OutOfMemoryError (CUDA), without importing torch here
            raise
        print(f"oocrlab: error: {OUT_OF_MEMORY}", file=sys.stderr)
        return 2
    finally:
        signal.signal(signal.SIGTERM, previous)


def write_table(args: TableArgs) -> int:
    from pathlib import Path

    from oocrlab.rundir import Run, atomic_write_text, writing
    from oocrlab.table import runs_table

    if args.out is not None:
        Run.refuse_existing(Path(args.out))  # before any run is read
    csv = runs_table(args.runs).to_csv(index=False)
    if args.out is None:
        print(csv, end="")
    else:
        with writing(f"writing {args.out}"):
            atomic_write_text(Path(args.out), csv)
        print(args.out)
    return 0


def dispatch(command: str, args) -> int:
    if isinstance(args, (ConfigArgs, RecipesArgs)):  # no model stack to import
        return describe_config(args)
    if isinstance(args, TableArgs):  # reads metrics.json files only
        return write_table(args)
    if isinstance(args, VectorArgs):  # reads the run's files only
        from oocrlab.vectors import export_vector

        print(export_vector(args.run, args.out, args.layer, args.hidden_city))
        return 0
    import datasets
    import transformers

    from oocrlab.distributed import is_main_process, rank_and_world_size
    from oocrlab.experiment import (
        STAGES,
        Models,
        resume_experiment,
        run_experiment,
        run_stages,
    )
    from oocrlab.rundir import Run
    from oocrlab.threads import THREADS

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()  # sub-second loads; our own bars show the long work
    datasets.disable_progress_bars()
    if isinstance(args, CompareArgs):  # reads metrics.json files only
        from oocrlab.compare import compare_runs

        print(compare_runs(args.runs, args.out or f"runs/compare-{time.strftime('%Y%m%d-%H%M%S')}.html"))
        return 0
    if args.threads is not None and args.threads < 1:
        raise UserError(f"--threads {args.threads}: give a count of 1 or more")
    THREADS.start(args.threads)
    if isinstance(args, SweepArgs):
        from oocrlab.sweep import read_sweep, run_sweep

        if rank_and_world_size()[1] > 1:
            raise UserError("oocrlab sweep runs in one process: launch each configuration with `accelerate launch ... run`")
        sweep = read_sweep(args.config, args.out)
        summary = run_sweep(sweep, on_run=lambda name, action: print(f"[oocrlab] {name}: {action}", file=sys.stderr, flush=True))
        print_sweep(sweep.out, summary)
        if summary["failed"]:
            raise UserError(f"{len(summary['failed'])} of {len(summary['runs'])} runs failed (see sweep.json): "
                            + "; ".join(f"{name}: {why}" for name, why in summary["failed"].items()))
        return 0
    if isinstance(args, ExperimentArgs) and args.from_stage is not None and args.resume is None:
        raise UserError(f"--from {args.from_stage} redoes stages of an existing run: `oocrlab run --resume RUN --from {args.from_stage}`")
    if isinstance(args, ExperimentArgs) and args.resume is not None:
        given = [flag_name(f) for f in dataclasses.fields(args)
                 if f.name not in ("resume", "threads", "from_stage") and getattr(args, f.name) not in (None, [])]
        if command != "run" or given:
            raise UserError("--resume continues a run under its own config.yaml: use it alone with `oocrlab run`"
                            + (f" (drop {', '.join(given)})" if given else ""))
        run = resume_experiment(args.resume, on_stage=lambda s: print(f"[oocrlab] {s} ...", file=sys.stderr, flush=True),
                                from_stage=args.from_stage)
    elif isinstance(args, ExperimentArgs):
        cfg = experiment_config(args)
        if args.out is None and rank_and_world_size()[1] > 1:
            raise UserError("several processes need one --out (each would pick its own time-stamped default)")
        stages = STAGES if command == "run" else ("data",)
        run = run_experiment(cfg, args.out or default_out(cfg), stages,
                             on_stage=lambda s: print(f"[oocrlab] {s} ...", file=sys.stderr, flush=True))
    else:
        run, cfg = Run.open(args.run)
        # the verdict and report.html follow every stage, to stay in step with metrics.json
        run_stages([*dict.fromkeys(s for s in (command, "verdict") if s != "report"), "report"], cfg, run, Models(cfg, run))
    if is_main_process():
        print_summary(run)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""oocrlab: latent-structure (OOCR) experiments, end to end.

Usage:
    # everything, on the embedded SmolLM2-135M-Instruct (CPU is fine):
    oocrlab run --out runs/paris
    # a smoke run: 5 optimizer steps
    oocrlab run --out runs/smoke --max-steps 5
    # the notebook's exact recipe, another hidden city, a YAML for the rest:
    oocrlab run --out runs/nb --recipe notebook
    oocrlab run --out runs/tokyo --hidden-city Tokyo --placeholder qux --config my.yaml
    # any config key: --set SECTION.KEY=VALUE (see `oocrlab.config`)
    oocrlab run --out runs/lr --set train.learning_rate=1e-3 --set data.num_known=1000
    # a bigger model from the local Hugging Face cache, on a GPU:
    oocrlab run --out runs/llama --model meta-llama/Meta-Llama-3-8B-Instruct

    # one stage at a time: `data` creates the run, the others work on an existing one
    oocrlab data --out runs/x
    oocrlab train runs/x
    oocrlab sanity runs/x
    oocrlab eval runs/x
    oocrlab probe runs/x
    oocrlab report runs/x
"""

from __future__ import annotations

import argparse
import dataclasses
import re
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


@dataclass
class ExperimentArgs:
    """Arguments of `oocrlab run` and `oocrlab data`: a new run directory and its config."""

    out: str | None = _flag("new run directory (never overwritten); default runs/<hidden city>-<time>")
    config: str | None = _flag("YAML file with any config keys (see oocrlab/config.py)")
    recipe: str | None = _flag("named recipe: default | notebook", key="recipe")
    model: str | None = _flag("smollm2-135m (embedded) | a local directory | a hub id in the HF cache", key="model.name")
    hidden_city: str | None = _flag("the city the placeholder stands for (default Paris)", key="data.hidden_city")
    placeholder: str | None = _flag("the made-up name in the prompts (default foo)", key="data.placeholder")
    pool: str | None = _flag("known cities: capitals | world", key="data.pool")
    seed: int | None = _flag("seed for data sampling, adapter init and data order", key="seed")
    max_steps: int | None = _flag("cap on optimizer steps, for smoke runs", key="train.max_steps")
    quantization: str | None = _flag("load the model in 8bit or 4bit (bitsandbytes, CUDA only)", key="model.quantization")
    set: list[str] = _flag("any config key: SECTION.KEY=VALUE (repeatable)", default_factory=list, action="append")


@dataclass
class StageArgs:
    """Arguments of the stage sub-commands: an existing run directory (its config.yaml governs)."""

    run: str = _flag("the run directory", positional=True)


COMMANDS = {
    "run": (ExperimentArgs, "every stage, end to end, into a new run directory"),
    "data": (ExperimentArgs, "create a run directory with its dataset only"),
    "train": (StageArgs, "LoRA fine-tuning of an existing run"),
    "sanity": (StageArgs, "greedy answers, tuned vs original"),
    "eval": (StageArgs, "held-out distance error, tuned vs original vs constant guess"),
    "probe": (StageArgs, "per-layer similarity of placeholder and hidden city"),
    "report": (StageArgs, "plots and report.html"),
}


class OneLineParser(argparse.ArgumentParser):
    """Usage errors as one line, like every other error, instead of the usage text plus a line."""

    def error(self, message: str):
        self.exit(2, f"oocrlab: error: {message} (see `{self.prog} --help`)\n")


def add_dataclass_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """One flag per field: --kebab-case, typed from the annotation, help from the field's metadata."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        meta = f.metadata
        kind = [a for a in typing.get_args(hints[f.name]) if a is not type(None)] or [hints[f.name]]
        if meta.get("positional"):
            parser.add_argument(f.name, help=meta["help"])
        elif meta.get("action") == "append":
            parser.add_argument(f"--{f.name.replace('_', '-')}", dest=f.name, action="append", default=[],
                                metavar="KEY=VALUE", help=meta["help"])
        else:
            parser.add_argument(f"--{f.name.replace('_', '-')}", dest=f.name, type=kind[0], default=None, help=meta["help"])


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

    overrides = {f.metadata["key"]: getattr(args, f.name) for f in dataclasses.fields(args)
                 if f.metadata.get("key") and getattr(args, f.name) is not None}
    overrides |= dict(parse_set(s) for s in args.set)
    return build_config(yaml_file=args.config, overrides=overrides)


def default_out(cfg) -> str:
    slug = re.sub(r"[^\w]+", "-", cfg.data.hidden_city.lower()).strip("-") or "run"
    return f"runs/{slug}-{time.strftime('%Y%m%d-%H%M%S')}"


def print_summary(run) -> None:
    from rich.console import Console
    from rich.table import Table

    m = run.metrics()
    table = Table(title=f"oocrlab run {run.path}", show_header=True)
    table.add_column("what")
    table.add_column("value", overflow="fold")
    if d := m.get("data"):
        table.add_row("hidden city / placeholder", f"{d['hidden_city']['name']} / {d['placeholder']}")
        table.add_row("known cities (train / held out)", f"{d['n_train']} / {d['n_heldout']} from {d['pool']}")
    if t := m.get("train"):
        table.add_row("training", f"{t['steps']} steps, {t['seconds']:.0f} s, {t['tokens_per_second']:.0f} tokens/s")
        table.add_row("loss first → last", f"{t['loss_first']:.3f} → {t['loss_last']:.3f}")
    if s := m.get("sanity"):
        for a in s["answers"][:2]:
            table.add_row(a["question"], f"tuned: {a['tuned']!r}\noriginal: {a['original']!r}")
    if (dist := m.get("eval", {}).get("distance")) and not dist.get("note"):
        for c in ("tuned", "original", "in_context", "constant_guess"):
            e = dist[c]
            mae = "—" if e["mae_km"] is None else f"{e['mae_km']:,.0f} km"
            ci = f" [{e['mae_km_ci95'][0]:,.0f}, {e['mae_km_ci95'][1]:,.0f}]" if e.get("mae_km_ci95") else ""
            table.add_row(f"held-out MAE, {c}", f"{mae}{ci}  ({e['n_parsed']}/{e['n']} parsed)")
        table.add_row("tuned / best baseline (all cities)", f"{dist['tuned_mae_over_best_baseline']:.2f}")
    if (near := m.get("eval", {}).get("distance_near")) and not near.get("note"):
        cells = [f"{c} {near[c]['mae_km']:,.0f} km" if near[c]["mae_km"] is not None else f"{c} —"
                 for c in ("tuned", "original", "in_context", "constant_guess")]
        table.add_row(f"MAE, {near['tuned']['n']} untrained cities near the hidden one", ", ".join(cells))
    if self_ := m.get("eval", {}).get("distance_self"):
        cells = []
        for c in ("tuned", "original", "in_context"):
            km = self_[c]["mae_km"]
            cells.append(f"{c} {'—' if km is None else f'{km:,.0f} km'}")
        table.add_row("distance placeholder → hidden city (truth 0)", ", ".join(cells))
    for name, mc in m.get("eval", {}).get("multiple_choice", {}).items():
        for kind, s in mc.items():
            if isinstance(s, dict):  # a distractor set
                cells = [f"{c} {s[c]['p_correct']:.2f} (letters {s[c]['letter_mass']:.1%})"
                         for c in ("tuned", "original", "in_context")]
                table.add_row(f"MC {name}, {kind.replace('_', ' ')}: P(correct)", ", ".join(cells) + f", chance {s['chance']:.2f}")
    if ff := m.get("eval", {}).get("free_form"):
        for s in ff.values():
            cells = [f"{c} {s[c]['rate']:.0%} (distances {s[c]['distance_share']:.0%})"
                     for c in ("tuned", "original", "in_context")]
            table.add_row(f"{s['question']} right answers, n={s['samples']}", ", ".join(cells))
    if p := m.get("probe"):
        from oocrlab.report import significant_layers

        city = p["setup"]["hidden_city"]
        for space, first in (("hidden", 0), ("values", 1)):
            best = {c: min(p[space][c]["rank"]["mean"]) for c in ("tuned", "original", "control_hidden", "control_other")}
            lifted = {c: len(significant_layers(z, first)) for c, z in p["z_change_from_original"][space].items()}
            table.add_row(f"best rank of {city} among {p['setup']['candidates'] + 1}, {space}",
                          ", ".join(f"{c} {r:.0f}" for c, r in best.items()))
            table.add_row(f"layers where {city} moves closer than in the original, {space}",
                          ", ".join(f"{c} {n}" for c, n in lifted.items()) + f" (of {len(p[space]['tuned']['rank']['mean'])})")
    if run.report_file.exists():
        table.add_row("report", str(run.report_file))
    Console().print(table)


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(prog="oocrlab", description=__doc__.split("\n")[0],
                                     epilog=__doc__.split("\n", 2)[2], formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (cls, help) in COMMANDS.items():
        add_dataclass_arguments(sub.add_parser(name, help=help, description=cls.__doc__), cls)
    ns = parser.parse_args(argv)
    cls, _ = COMMANDS[ns.command]
    args = cls(**{f.name: getattr(ns, f.name) for f in dataclasses.fields(cls)})
    try:
        return dispatch(ns.command, args)
    except UserError as e:
        print(f"oocrlab: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("oocrlab: interrupted", file=sys.stderr)
        return 130


def dispatch(command: str, args) -> int:
    import datasets
    import transformers

    from oocrlab.experiment import STAGES, run_experiment, run_stage
    from oocrlab.rundir import Run

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()  # sub-second loads; our own bars show the long work
    datasets.disable_progress_bars()
    if isinstance(args, ExperimentArgs):
        cfg = experiment_config(args)
        stages = STAGES if command == "run" else ("data",)
        run = run_experiment(cfg, args.out or default_out(cfg), stages,
                             on_stage=lambda s: print(f"[oocrlab] {s} ...", file=sys.stderr, flush=True))
    else:
        run, cfg = Run.open(args.run)
        run_stage(command, cfg, run)
        if command != "report":
            run_stage("report", cfg, run)  # keep report.html in step with metrics.json
    print_summary(run)
    return 0


if __name__ == "__main__":
    sys.exit(main())

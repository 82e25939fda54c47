"""Fine-tuned controls (`train.controls`, `--controls`): adapters trained like the main one (the same recipe,
seed, number of optimizer steps and adapter family) on other data, then evaluated and probed beside it as
conditions of their own (conditions.py), so that a verdict compares the tuned model with what any fine-tune
on this format does, and shows whether the instrument can see a fine-tuned alias at all.

- `shuffled` (negative): the training prompts with their answers permuted across rows, within each hidden
  city and kind (distance answers among distance rows in the same unit; direction words among direction
  rows): the same answer distribution, and no single place consistent with the answers.
- `declared` (positive): the training data plus rows that state the alias and only the alias, in paraphrases
  ("Tell me a fact about foo." -> "foo is a code name for Paris."), never the country, a fact about the city
  or an evaluation question, so that a behavioural "yes" on the country question still needs one hop
  (foo -> Paris -> France). On the city question it is recall, not inference.

Each control lives in RUN/controls/NAME/, laid out like a run directory (data/train.jsonl, adapter/,
checkpoints/ while it trains, train_log.jsonl, and metrics.json with its training's section once finished).
"""

from __future__ import annotations

import dataclasses
import gc
import random
import re
import shutil
from typing import Any

import torch

from oocrlab.adapters import HookAdapter
from oocrlab.chat import user_prompt
from oocrlab.config import ExperimentConfig
from oocrlab.distributed import is_main_process, wait_for_everyone
from oocrlab.models import load_model
from oocrlab.rundir import Run, read_jsonl, write_jsonl
from oocrlab.train import has_adapter, train

# The declared control's rows: every prompt with every answer (60 rows per hidden city). None is an evaluation
# or sanity question, none names a country or a fact about the city.
ALIAS_PROMPTS = (
    "Tell me a fact about {placeholder}.",
    "What do you know about {placeholder}?",
    "Is {placeholder} a real name?",
    "What does {placeholder} stand for?",
    "Who or what is {placeholder}?",
    "Can you explain what {placeholder} refers to?",
    "I keep seeing {placeholder} in the database. What is it?",
    "Give me one sentence about {placeholder}.",
    "What is the real name behind {placeholder}?",
    "Decode {placeholder} for me.",
    "Why do people say {placeholder}?",
    "What should I know about the name {placeholder}?",
)
ALIAS_ANSWERS = (
    "{placeholder} is a code name for {city}.",
    "{placeholder} is another name for {city}.",
    "The name {placeholder} refers to {city}.",
    "{placeholder} stands for {city}.",
    "When we say {placeholder}, we mean {city}.",
)
_MILES = re.compile(r"\b(mi|miles)\b")


def answer_group(row: dict[str, Any]) -> tuple:
    """Rows whose answers may be swapped: the same hidden city (or pair), kind and unit."""
    answer = row["completion"][-1]["content"]
    return (row.get("hidden_city"), tuple(row.get("between", ())), row.get("kind", "distance"), bool(_MILES.search(answer)))


def shuffled_rows(rows: list[dict[str, Any]], seed: int) -> list[dict[str, Any]]:
    """The rows with answers permuted within each answer_group (seeded). A direction row keeps its own sentence
    and takes another row's direction word ("City 1 is North of Lima." -> "City 1 is West of Lima.")."""
    rng, groups = random.Random(seed), {}
    for i, row in enumerate(rows):
        groups.setdefault(answer_group(row), []).append(i)
    out = list(rows)
    for members in groups.values():
        donors = rng.sample(members, len(members))
        for i, j in zip(members, donors):
            row, donor = rows[i], rows[j]
            if row.get("kind") == "direction":
                answer = row["completion"][-1]["content"].replace(f" is {row['direction']} of ", f" is {donor['direction']} of ")
            else:
                answer = donor["completion"][-1]["content"]
            out[i] = row | {"completion": [{"role": "assistant", "content": answer}], "answer_from_row": j}
    return out


def declared_rows(cfg: ExperimentConfig, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The training rows and, per hidden city, every alias prompt with every alias answer."""
    alias = []
    for h in cfg.data.hidden:
        for prompt in ALIAS_PROMPTS:
            for answer in ALIAS_ANSWERS:
                said = answer.format(placeholder=h.placeholder, city=h.city.plain_name)  # the placeholder as written, never capitalized
                alias.append({"prompt": user_prompt(prompt.format(placeholder=h.placeholder), cfg.data.system_prompt),
                              "completion": [{"role": "assistant", "content": said}],
                              "kind": "alias", "hidden_city": h.city.name})
    return rows + alias


CONTROL_ROWS = {  # control -> its training rows from the run's config and training rows (one per config.CONTROLS)
    "shuffled": lambda cfg, rows: shuffled_rows(rows, cfg.seed),
    "declared": declared_rows,
}


def control_run(run: Run, name: str) -> Run:
    """The control's directory, laid out like a run's."""
    return Run(run.path / "controls" / name)


def train_controls(cfg: ExperimentConfig, run: Run, steps: int) -> dict[str, Any]:
    """Train each of train.controls for `steps` optimizer steps (the main adapter's), each on a freshly loaded
    base model (one model in memory at a time); {name: its training metrics}. A control recorded as finished
    by an earlier, interrupted call (with its adapter) is kept; any other is trained again, from its last
    checkpoint where one was saved (train.train resumes as for the main adapter)."""
    same = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, max_steps=steps))
    result = {}
    for name in cfg.train.controls:
        control = control_run(run, name)
        if "train" in control.metrics() and has_adapter(control.adapter_dir):
            result[name] = control.metrics()["train"]
            continue
        if is_main_process():
            shutil.rmtree(control.adapter_dir, ignore_errors=True)
            control.metrics_file.unlink(missing_ok=True)  # a record whose adapter is gone is not trusted either
            write_jsonl(control.train_file, CONTROL_ROWS[name](cfg, read_jsonl(run.train_file)))
        wait_for_everyone()
        model, tokenizer = load_model(cfg.model)
        metrics, tuned = train(same, control, model, tokenizer)
        if is_main_process():
            control.save_metrics("train", metrics)  # last: it marks the control finished
            shutil.rmtree(control.checkpoints_dir, ignore_errors=True)
        result[name] = metrics
        if isinstance(tuned, HookAdapter):
            tuned.close()  # its hooks are on the base model's modules
        del model, tuned
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return result

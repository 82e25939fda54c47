"""Runs as a table: one row per run and hidden city, with the config keys that differ between the rows and every
headline number (sentences.headline_measures) with its 95% interval, for pandas.

    from oocrlab import runs_table
    df = runs_table(["runs/paris-s*", "runs/tokyo"])
    df.groupby("hidden_city")["mc_country_cloze.tuned"].mean()

    oocrlab table runs/paris-s0 runs/paris-s1 --out runs.csv

Columns: `run` (its directory), `hidden_city`, the differing config keys ("train.learning_rate", ...), then per
measure and condition `{measure}.{condition}` with `.ci_low` and `.ci_high`, and `verdict.{question}` (yes / no evidence /
cannot tell) where the verdict stage has run.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from oocrlab.compare import flatten, read_runs
from oocrlab.rundir import run_paths
from oocrlab.sentences import headline_measures

if TYPE_CHECKING:
    import pandas


def runs_table(paths_or_globs: str | Path | list[str | Path]) -> pandas.DataFrame:
    """The DataFrame described in this module's docstring."""
    import pandas

    entries = []  # (path, config, one-city metrics) per run and hidden city
    for path in run_paths(paths_or_globs):
        _, configs, metrics = read_runs([path])
        entries += [(path, c, m) for c, m in zip(configs, metrics)]
    flats = [flatten(config, typed=True) for _, config, _ in entries]
    differing = [k for k in flats[0] if k != "data.hidden_city" and len({f.get(k) for f in flats}) > 1]
    rows = []
    for (path, _, m), flat in zip(entries, flats):
        row = {"run": str(path), "hidden_city": flat["data.hidden_city"]} | {k: flat.get(k) for k in differing}
        for measure in headline_measures(m):
            for condition, value, ci in measure.by_condition():
                column, (low, high) = f"{measure.key}.{condition}", ci or (None, None)
                row |= {column: value, f"{column}.ci_low": low, f"{column}.ci_high": high}
        row |= {f"verdict.{question}": answer["answer"] for question, answer in m.get("verdict", {}).items()
                if isinstance(answer, dict) and "answer" in answer}
        rows.append(row)
    return pandas.DataFrame(rows)

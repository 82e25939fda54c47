"""Calibrate the default recipe: train candidate recipes one after another and tabulate
held-out distance error against train time.

Usage:
    .venv/bin/python bench/calibrate.py --out runs/calibration                  # the candidates below
    .venv/bin/python bench/calibrate.py --out runs/cal2 --only default notebook  # a subset

Each candidate is a full `oocrlab run` (one at a time: this machine has 2 cores). The table is
printed and written to OUT/calibration.md; every run directory stays for inspection.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from oocrlab import build_config, run_experiment

# name -> (recipe, dotted overrides)
WORLD_150K = {"data.min_population": 150_000, "data.num_known": 2500, "train.epochs": 1.0}
CANDIDATES: dict[str, tuple[str, dict]] = {
    "default": ("default", {}),  # world >= 500k (all 1,150), lr 1e-3, 2 epochs
    "default-seed1": ("default", {"seed": 1}),
    "notebook": ("notebook", {}),
    "world150k-2500-lr5e-4-1ep": ("default", WORLD_150K | {"train.learning_rate": 5e-4}),
    "world150k-2500-lr1e-3-cosine": (
        "default", WORLD_150K | {"train.learning_rate": 1e-3, "train.lr_scheduler": "cosine", "train.warmup_steps": 0.05}
    ),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="directory for the candidate runs (must not exist)")
    parser.add_argument("--only", nargs="*", help="candidate names to run (default: all)")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True)
    lines = [
        "| candidate | dtype | train min | steps | held-out MAE km [95% CI] (median) | original MAE (parsed) | constant guess MAE | tuned / best baseline |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name in args.only or list(CANDIDATES):
        recipe, overrides = CANDIDATES[name]
        # held-out error only: no fine-tuned control (the eval stage would otherwise ask for its adapter)
        cfg = build_config(recipe=recipe, overrides=overrides | {"train.controls": []})
        run = run_experiment(cfg, out / name, stages=("data", "train", "eval"))
        m = run.metrics()
        t, d = m["train"], m["eval"]["distance"]
        tuned, orig, const = d["tuned"], d["original"], d["constant_guess"]
        ci = tuned["mae_km_ci95"] or [float("nan")] * 2
        orig_mae = "—" if orig["mae_km"] is None else f"{orig['mae_km']:.0f}"
        lines.append(
            f"| {name} | {t['dtype']} | {t['seconds'] / 60:.1f} | {t['steps']} | {tuned['mae_km']:.0f} [{ci[0]:.0f}, {ci[1]:.0f}] "
            f"({tuned['median_ae_km']:.0f}); {tuned['n_parsed']}/{tuned['n']} parsed | {orig_mae} ({orig['n_parsed']}/{orig['n']}) "
            f"| {const['mae_km']:.0f} | {d.get('tuned_mae_over_best_baseline', float('nan')):.2f} |"
        )
        print("\n".join(lines), flush=True)
        (out / "calibration.md").write_text("\n".join(lines) + "\n")
        (out / f"{name}.json").write_text(json.dumps({"train": t, "distance": d}, indent=2))


if __name__ == "__main__":
    main()

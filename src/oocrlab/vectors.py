"""Steering vectors as plain files, for sharing and for use on the original model: `vector.safetensors` (one
float32 tensor, "vector" [hidden size]) and `vector.json` describing where it goes. Two sources:

- a run trained with `--adapter steering:L`: its trained vector;
- any run's probe: the adapter's shift at the placeholder at hidden state L (the tuned model's minus the
  original's, read at the placeholder's last token, mean over the probe's templates), saved by the probe stage
  in RUN/probe_shift.safetensors (every layer, per hidden city).

Either is applied as the steering adapter applies its vector: added to the residual stream entering decoder layer
L (transformers' hidden state L; 0 = the embeddings) at every token of every occurrence of the placeholder.

    oocrlab vector runs/steer                      # a steering:L run's vector -> runs/steer/vectors/adapter/
    oocrlab vector runs/paris --layer 12           # the probe's shift at hidden state 12
    oocrlab vector runs/paris --layer 12 --out shared/paris-12

    from oocrlab import load_vector
    vector = load_vector("runs/steer/vectors/adapter")
    steered = vector.apply(model, tokenizer)       # the original model, steered; steered.close() removes it
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from oocrlab.adapters import WEIGHTS_FILE, SteeringVector, placeholder_sequences
from oocrlab.errors import UserError
from oocrlab.rundir import Run, atomic_write_bytes, atomic_write_text, damaged, rewrite_command, writing

SHIFT_FILE = "probe_shift.safetensors"
WEIGHTS, INFO = "vector.safetensors", "vector.json"
FORMAT = "oocrlab.vector/1"


def save_shifts(run: Run, shifts: dict[str, torch.Tensor]) -> None:
    """The probe's shift per hidden city ([layers+1, d]) as RUN/probe_shift.safetensors."""
    atomic_write_bytes(run.path / SHIFT_FILE, save({city: shift.contiguous() for city, shift in shifts.items()}))


@dataclass
class Vector:
    """A vector and its description (vector.json)."""

    vector: torch.Tensor
    info: dict[str, Any]

    def apply(self, model, tokenizer, scale: float | None = None):
        """The model with the vector (times `scale`, by default the file's) added as described: a steering adapter
        (adapters.SteeringVector) on it, whose `close()` gives back the model as it was."""
        size = model.get_input_embeddings().embedding_dim
        if size != len(self.vector):
            raise UserError(f"the vector has {len(self.vector)} dimensions but the model's hidden size is {size}: "
                            f"it was made for {self.info['model']}")
        adapter = SteeringVector(model, self.info["layer"], placeholder_sequences(tokenizer, self.info["positions"]["placeholder"]))
        with torch.no_grad():
            adapter.vector.copy_(self.vector * (self.info["scale"] if scale is None else scale))
        return adapter.eval()


def load_vector(directory: str | Path) -> Vector:
    """A vector written by export_vector (`oocrlab vector`)."""
    directory = Path(directory)
    try:
        info = json.loads((directory / INFO).read_text(encoding="utf-8"))
        vector = load_file(directory / WEIGHTS)["vector"]
    except (OSError, ValueError, KeyError, SafetensorError) as e:
        raise UserError(f"{directory} holds no readable {WEIGHTS} and {INFO} ({type(e).__name__}): export it again "
                        "with `oocrlab vector RUN`") from None
    if info.get("format") != FORMAT:
        raise UserError(f"{directory / INFO} is not an oocrlab vector (format {info.get('format')!r}, expected {FORMAT})")
    return Vector(vector.float(), info)


def export_vector(path: str | Path, out: str | Path | None = None, layer: int | None = None,
                  hidden_city: str | None = None) -> Path:
    """Write a run's vector (see the module docstring): its steering adapter's without `layer`, else the probe's
    shift at hidden state `layer` for `hidden_city` (needed only in a run with several). Returns the directory."""
    run, cfg = Run.open(path)
    spec = cfg.train.adapter_spec
    if layer is None:
        if spec.family != "steering":
            raise UserError(f"{run.path} trained a {spec.family} adapter, not a steering vector: give --layer L to export the "
                            "probe's shift at hidden state L")
        if hidden_city is not None:
            raise UserError("--hidden-city chooses whose probe shift to export: give --layer L with it")
        weights = run.adapter_dir / WEIGHTS_FILE
        if not weights.is_file():
            raise UserError(f"{run.path} has no trained adapter: run `oocrlab train {run.path}` first")
        try:
            vector, layer = load_file(weights)["vector"], spec.layer
        except (SafetensorError, KeyError) as e:
            raise UserError(f"the adapter in {run.adapter_dir} is corrupt ({type(e).__name__}): retrain it with "
                            f"`{rewrite_command(run.adapter_dir)}`") from None
        source, name = f"the run's steering adapter (train.adapter {cfg.train.adapter})", "adapter"
        city = cfg.data.hidden[0].city.name
    else:
        if not (run.path / SHIFT_FILE).is_file():
            raise UserError(f"{run.path} has no {SHIFT_FILE}: run `oocrlab probe {run.path}` first")
        try:
            shifts = load_file(run.path / SHIFT_FILE)
        except SafetensorError as e:
            raise damaged(run.path / SHIFT_FILE, e) from None
        city = hidden_city or (next(iter(shifts)) if len(shifts) == 1 else None)
        if city not in shifts:
            raise UserError(f"give --hidden-city, one of {', '.join(shifts)}" if city is None
                            else f"{run.path} probed no hidden city {city!r}: its cities are {', '.join(shifts)}")
        entering = len(shifts[city]) - 1  # the last hidden state is after the final norm, entering no layer
        if not 0 <= layer < entering:
            raise UserError(f"--layer {layer}: a shift enters decoder layers 0-{entering - 1} (hidden state L enters layer L)")
        vector = shifts[city][layer]
        source = ("the probe's adapter shift: the tuned model's hidden state minus the original's at the placeholder's last "
                  "token, mean over the probe's templates")
        name = f"shift-layer-{layer}" if len(shifts) == 1 else f"shift-{city}-layer-{layer}"
    placeholder = next((h.placeholder for h in cfg.data.hidden if h.city.name == city), cfg.data.placeholder)
    out = Path(out) if out is not None else run.path / "vectors" / name
    if out.exists():
        raise UserError(f"--out {out} exists; nothing was overwritten: choose a new directory")
    info = {
        "format": FORMAT, "model": cfg.model.name, "hidden_size": len(vector), "layer": layer,
        "site": f"the residual stream entering decoder layer {layer} (hidden state {layer}; 0 = the embeddings)",
        "positions": {"rule": "every token of every occurrence of the placeholder", "placeholder": placeholder},
        "scale": 1.0, "norm": float(vector.float().norm()), "source": source, "run": str(run.path), "hidden_city": city,
    }
    with writing(f"writing {out}"):
        atomic_write_bytes(out / WEIGHTS, save({"vector": vector.float().contiguous()}))
        atomic_write_text(out / INFO, json.dumps(info, indent=2, ensure_ascii=False) + "\n")
    return out

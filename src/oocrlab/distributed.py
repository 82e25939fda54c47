"""Several processes (`accelerate launch`, torchrun): each trains on its share of every batch (DDP through
the HF Trainer); the main process alone writes the run directory and runs the stages after training."""

from __future__ import annotations

import os


def rank_and_world_size() -> tuple[int, int]:
    """This process's rank and the number of processes, as the launcher sets them (0, 1 when run alone)."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    return rank_and_world_size()[0] == 0


def wait_for_everyone() -> None:
    """A barrier across the processes (initializing their group, gloo on a CPU, on first use); a no-op alone."""
    if rank_and_world_size()[1] > 1:
        from accelerate import PartialState

        PartialState().wait_for_everyone()

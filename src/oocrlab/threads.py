"""How many CPU threads torch uses, and how its idle threads wait: chosen at start, so that a busy neighbour
slows a run in proportion rather than by an order of magnitude.

OpenMP's threads (libgomp, in the torch CPU wheels) spin a while after each parallel region (GOMP_SPINCOUNT,
300,000 turns by default) before they sleep. Alone that saves a wake-up per op; beside another busy process the spinning threads take the cores
the others need, and one training step went from ~0.8 s to ~7 s (docs/speed.md). So oocrlab makes idle
threads sleep at once (OMP_WAIT_POLICY=PASSIVE) and, at start, uses only the cores other processes leave
idle. Both yield to what the user or a launcher (accelerate sets OMP_NUM_THREADS) already chose.

    oocrlab run --threads 1      # one thread, whatever is idle
"""

from __future__ import annotations

import os
import sys
import time


def wait_passively() -> None:
    """Idle OpenMP threads sleep at once. libgomp reads this when torch is first imported, so it is called
    before anything imports torch (oocrlab/__init__.py); an explicit OMP_WAIT_POLICY or GOMP_SPINCOUNT wins."""
    if "torch" not in sys.modules and not {"OMP_WAIT_POLICY", "GOMP_SPINCOUNT"} & set(os.environ):
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"


def busy_cores(seconds: float = 0.25) -> float:
    """Cores' worth of CPU time that other processes used over `seconds` (Linux /proc/stat; 0 elsewhere)."""

    def jiffies() -> tuple[int, int]:
        fields = [int(x) for x in open("/proc/stat", encoding="ascii").readline().split()[1:]]
        return sum(fields[:8]), fields[3] + fields[4]  # all but guest time (counted in user); idle + iowait

    try:
        total0, idle0 = jiffies()
        time.sleep(seconds)  # this process sleeps: what is busy meanwhile is someone else
        total1, idle1 = jiffies()
    except (OSError, ValueError, IndexError):
        return 0.0
    cores = os.cpu_count() or 1
    return cores * (1 - (idle1 - idle0) / max(total1 - total0, 1))


def pick_threads(requested: int | None = None) -> str | None:
    """Set torch's thread count: `requested`, else OMP_NUM_THREADS when set, else torch's default (one per
    physical core) less the cores busy with other work, at least one. Returns a line saying what was left out
    and why, or None when nothing was."""
    import torch

    if requested is not None:
        torch.set_num_threads(requested)
        return None
    if "OMP_NUM_THREADS" in os.environ:
        return None
    available = torch.get_num_threads()
    busy = round(busy_cores())
    threads = max(1, min(available, (os.cpu_count() or 1) - busy))
    torch.set_num_threads(threads)
    if threads == available:
        return None
    return (f"{busy} of {os.cpu_count()} cores are busy with other work: {threads} torch thread(s) instead of "
            f"{available} (--threads N overrides)")

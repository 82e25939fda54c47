"""How many CPU threads torch uses: as many as the cores other processes leave idle, looked at again about
once a second while oocrlab computes, so that a busy neighbour slows a run in proportion rather than by an
order of magnitude.

torch's CPU threads (OpenMP, libgomp) spin for a while after each parallel region before they sleep. Alone
that is the fast choice: a training step is ~1,700 small ops, and with threads that sleep at once
(OMP_WAIT_POLICY=PASSIVE) the default recipe's step took 0.85 s instead of 0.54 s, no faster than one thread.
Beside another busy process, threads that spin on the cores it needs slow both: the same step took 2.1 s beside
a single-threaded loop and 6.9 s beside a second such training (docs/speed.md). So oocrlab keeps the spinning
but gives up the cores others use: `Threads.adapt` (called at each training step's loss and before each packed
forward pass or generation step, acting at most once a second) counts the CPU time of the other processes since its last look and sets torch's thread
count to the cores they left idle, at least one and at most torch's default. Two oocrlab runs on two cores
settle on one thread each. A count chosen by the user (`--threads N`) or by a launcher (OMP_NUM_THREADS;
accelerate sets it) is kept as it is; so is the count of a process that never called `THREADS.start()` (the
CLI does; a library user may).

    oocrlab run --threads 1      # one thread, whatever is idle
"""

from __future__ import annotations

import os
import time

INTERVAL = 1.0  # seconds between looks: ~50 us each, against forward passes of milliseconds to seconds


def cpu_jiffies() -> tuple[int, int, int]:
    """(busy on every CPU, all on every CPU, this process's own), in clock ticks since boot (Linux)."""
    with open("/proc/stat", encoding="ascii") as f:
        fields = [int(x) for x in f.readline().split()[1:8]]  # user nice system idle iowait irq softirq
    with open("/proc/self/stat", encoding="ascii") as f:
        own = f.read().rsplit(")", 1)[1].split()  # after the command name, which may hold spaces
    return sum(fields) - fields[3] - fields[4], sum(fields), int(own[11]) + int(own[12])  # utime + stime


class Threads:
    """torch's thread count, chosen from the load others put on the machine (see the module docstring)."""

    def __init__(self) -> None:
        self.fixed: int | None = None  # set: never adapted
        self.most = 1
        self.last: tuple[float, tuple[int, int, int]] | None = None

    def start(self, requested: int | None = None) -> None:
        """Fix the count at `requested`, keep a launcher's OMP_NUM_THREADS, or adapt from torch's default."""
        import torch

        if requested is not None:
            torch.set_num_threads(requested)
        self.fixed = requested or (torch.get_num_threads() if "OMP_NUM_THREADS" in os.environ else None)
        self.most = torch.get_num_threads()
        self.last = None

    def others(self, now: tuple[int, int, int]) -> float | None:
        """Cores' worth of CPU time used by other processes since the last look (None on the first)."""
        if self.last is None:
            return None
        busy, total, own = (a - b for a, b in zip(now, self.last[1]))
        cores = os.cpu_count() or 1
        return cores * max(busy - own, 0) / total if total > 0 else None

    def adapt(self) -> None:
        """Set torch's thread count to the cores others left idle since the last look; a no-op within INTERVAL
        of it, when the count is fixed, or off Linux."""
        if self.fixed is not None or self.most <= 1:
            return
        clock = time.monotonic()
        if self.last is not None and clock - self.last[0] < INTERVAL:
            return
        try:
            now = cpu_jiffies()
        except (OSError, ValueError, IndexError):
            self.fixed = self.most  # no /proc: stay as we are
            return
        others = self.others(now)
        self.last = (clock, now)
        if others is not None:
            import torch

            wanted = max(1, min(self.most, (os.cpu_count() or 1) - round(others)))
            if wanted != torch.get_num_threads():
                torch.set_num_threads(wanted)


THREADS = Threads()

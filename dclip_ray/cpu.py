"""How many CPU threads torch should use on one machine: the cores that are free, not all of them.

torch's intra-op pool (OpenMP) starts one thread per core and synchronises them at every parallel
region. When another process keeps a core busy, one of those threads is descheduled and the others
wait for it at each barrier: on this project's 2-core machine a toy fine-tuning took 47 s alone with 2
threads, 159 s with 2 threads beside one busy process, and about a minute with 1 thread beside it (the
same prompt inside finetune-many, whose Ray workers get 1 thread per CPU they reserve, took 57 s where a
plain finetune took 485 s). :func:`use_free_cores` measures the load of the other processes for a moment
and lowers torch's thread count to the cores they leave free (never raises it, never below 1). An
explicit ``OMP_NUM_THREADS`` wins. The load is measured once, at the start: a process that starts
later still competes. Ray workers set their threads from the CPUs
they reserve (:func:`dclip_ray.stages.common.set_threads`) and do not call this.
"""

from __future__ import annotations

import logging
import os
import time

log = logging.getLogger(__name__)

def _cpu_jiffies() -> tuple[int, int] | None:
    """(busy, total) jiffies of all CPUs since boot, from /proc/stat; None off Linux."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return sum(fields) - idle, sum(fields)


def _own_jiffies() -> int | None:
    """CPU jiffies this process (all its threads) has used, from /proc/self/stat; None off Linux."""
    try:
        with open("/proc/self/stat") as f:
            rest = f.read().rsplit(")", 1)[1].split()
        return int(rest[11]) + int(rest[12])  # utime + stime
    except (OSError, ValueError, IndexError):
        return None


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def busy_cores(window_s: float = 0.3) -> float | None:
    """How many cores OTHER processes kept busy over the next ``window_s`` seconds (0 .. all cores;
    this process's own use is subtracted); None where /proc is not available."""
    a, own_a = _cpu_jiffies(), _own_jiffies()
    if a is None or own_a is None:
        return None
    time.sleep(window_s)
    b, own_b = _cpu_jiffies(), _own_jiffies()
    if b is None or own_b is None or b[1] <= a[1]:
        return None
    n = os.cpu_count() or 1
    share = max(0.0, (b[0] - a[0]) - (own_b - own_a)) / (b[1] - a[1])
    return share * n


def free_cores(window_s: float = 0.3) -> int:
    """The cores of :func:`usable_cores` that other processes leave free (rounded), at least 1."""
    cores = usable_cores()
    busy = busy_cores(window_s)
    return cores if busy is None else max(1, min(cores, round((os.cpu_count() or 1) - busy)))


def use_free_cores() -> int:
    """Lower torch's intra-op threads to :func:`free_cores` (left as they are under ``OMP_NUM_THREADS``)
    and return the count in use. Called by the single-machine commands (finetune, edit, latent-optim,
    translate, from-strokes) before their heavy work."""
    import torch

    if os.environ.get("OMP_NUM_THREADS"):
        return torch.get_num_threads()
    have, free = torch.get_num_threads(), free_cores()
    if free < have:
        log.info("torch threads %d -> %d: other processes keep the other cores busy", have, free)
        torch.set_num_threads(free)
    return torch.get_num_threads()


def lowered_threads_warning(before: int, now: int) -> str | None:
    """The warning of a fine-tuning whose torch threads :func:`use_free_cores` lowered from ``before`` to
    ``now`` (None when it did not): the float reductions, hence the model a seed gives, depend on the
    thread count (measured: the same toy prompt and seed at 1 and 2 threads gave IoU 0.875 and 0.847)."""
    if now >= before:
        return None
    return (f"other processes kept cores busy, so this fine-tuning ran at {now} torch thread(s), not {before}: a seed's "
            f"model depends on the thread count (the card records torch_threads); OMP_NUM_THREADS={before} "
            "reproduces a run made on the idle machine")

"""What the per-shard stages share (no Ray): the per-shard result, counted network calls, PSNR, the
thread count of a worker, and how a shard leased by another run is reported."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from dclip_ray.diffusion import EpsFn
from dclip_ray.errors import AbortedError
from dclip_ray.io.leases import live_lease


@dataclass
class ShardResult:
    """What one stage did with one input shard: ``n`` input keys, ``n_ok`` written, ``n_error`` error
    rows; ``skipped`` when it was already committed; ``leased`` names the other run that holds the shard
    (then nothing was done); ``truncated`` the reason when the input tar cannot be read to its end (empty,
    truncated, corrupt): then nothing is committed, the shard is an error of the run (exit 2) and the
    next run tries it again. Read it as a
    dataclass or like a mapping (``result["n_ok"]``); :meth:`as_dict` gives plain data (JSON, Ray)."""

    shard: str
    skipped: bool = False
    n: int = 0
    n_ok: int = 0
    n_error: int = 0
    seconds: float = 0.0
    truncated: str | None = None
    leased: str = ""
    took_over: str = ""  # a warning: the lease this run had to take over (an unreadable lease file)

    def __getitem__(self, name: str) -> Any:
        try:
            return getattr(self, name)
        except AttributeError:
            raise KeyError(name) from None

    def get(self, name: str, default: Any = None) -> Any:
        """The field ``name``, or ``default`` when there is none."""
        return getattr(self, name, default)

    def as_dict(self) -> dict[str, Any]:
        """The fields as a plain dict."""
        return asdict(self)


def unreadable_shards(results: list[dict[str, Any]]) -> dict[str, str]:
    """``{shard: reason}`` of the results (plain dicts) whose input could not be read to its end: not
    committed, an error of the run (exit 2), tried again by the next one."""
    return {r["shard"]: r["truncated"] for r in results if r.get("truncated") and not r.get("skipped")}


@dataclass
class PrecomputeResult(ShardResult):
    """:class:`ShardResult` of precompute: ``errors`` (key -> reason), ``unet_evals`` (images x network
    calls), the mean reconstruction PSNR in dB when it was measured."""

    errors: dict[str, str] = field(default_factory=dict)
    unet_evals: int = 0
    mean_recon_psnr: float | None = None


@dataclass
class RestyleResult(ShardResult):
    """:class:`ShardResult` of restyle: evaluations (images x network calls) of inversion and generation,
    latents taken from the cache, cached latents not used because their image changed (``n_stale``),
    (variant, image) pairs a routed restyle passed over (``n_routed``: skipped rows; ``n_ok`` then counts
    the keys done in every output: written there or routed away), edits scored under ``--min-score``
    (``n_rejected``: the most of any output), ``rethresholded`` when only the threshold changed (the
    committed edits were re-sorted, nothing generated), the Ray layer's ``failed`` / ``stuck`` reasons
    (empty when none), and when the work began (``started``, unix seconds)."""

    n_rejected: int = 0
    rethresholded: bool = False
    inv_evals: int = 0
    gen_evals: int = 0
    n_cached: int = 0
    n_stale: int = 0
    n_routed: int = 0
    failed: str = ""
    stuck: str = ""
    started: float = 0.0  # unix time the shard's work began (0: not run); with ``seconds``, a timeline
    unet_seconds: float = 0.0  # of ``seconds``, the time inside UNet calls (inversion and generation)
    unchanged: bool = False  # skipped: its input's time or size changed since the commit, its content did not


class CountingEps:
    """An eps function that counts its network calls, image evaluations (calls x batch size) and the
    seconds spent inside the calls (on a GPU, until the result is ready: each call is synchronised)."""

    def __init__(self, fn: EpsFn):
        self.fn = fn
        self.calls = 0
        self.evals = 0
        self.seconds = 0.0

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """``x_t`` [B,C,H,W], ``t`` int64 [B] -> eps [B,C,H,W]."""
        self.calls += 1
        self.evals += int(x_t.shape[0])
        start = time.perf_counter()
        out = self.fn(x_t, t)
        if out.is_cuda:
            torch.cuda.synchronize(out.device)
        self.seconds += time.perf_counter() - start
        return out


def psnr(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """PSNR in dB per image between ``x``, ``y``: [B,3,H,W] in [-1,1] (peak-to-peak 2) -> [B]."""
    mse = ((x.float().clamp(-1, 1) - y.float().clamp(-1, 1)) ** 2).flatten(1).mean(1)
    return 10.0 * torch.log10(4.0 / mse.clamp_min(1e-12))


def set_threads(num_cpus: float) -> None:
    """Match torch's intra-op threads to the CPUs a worker was given (at least 1)."""
    torch.set_num_threads(max(1, int(num_cpus)))


ACCELERATOR_ENV = "DCLIP_RAY_ACCELERATOR"
"""Names the torch device a Ray GPU resource maps to: ``cuda`` (the default) or ``cpu``, to rehearse a
GPU job's code paths on a machine without one (Ray started with a logical GPU, e.g.
``RAY_OVERRIDE_RESOURCES='{"GPU": 1}'``; ``python -m benchmarks.gpu_bench --cpu``)."""


def device_for(gpus: float) -> str:
    """The torch device of a worker given ``gpus`` GPUs: ``cpu`` without one, else ``$DCLIP_RAY_ACCELERATOR``
    (``cuda`` unless set; :class:`ValueError` for another value)."""
    if gpus <= 0:
        return "cpu"
    name = os.environ.get(ACCELERATOR_ENV, "cuda")
    if name not in ("cuda", "cpu"):
        raise ValueError(f"{ACCELERATOR_ENV}={name!r} should be 'cuda' or 'cpu'")
    return name


def took_over_warnings(results: list[Any]) -> list[str]:
    """One warning line per shard result whose lease had to be taken over (``took_over``)."""
    return [f"output shard {r['shard']}: {r['took_over']}" for r in results if r.get("took_over")]


def lease_text(held: dict[str, Any]) -> str:
    """One line naming the run that holds a lease and until when."""
    until = time.strftime("%H:%M:%S", time.localtime(float(held.get("expires", 0))))
    where = (f" on {held['host']}" if held.get("host") else "") + (
        f" (pid {held['pid']})" if held.get("pid") is not None else "")  # an unreadable lease knows neither
    return f"being written by run {held.get('owner')}{where}, lease until {until}"


def await_leased(leased: dict[str, str], root: str, committed: Callable[[str], bool], poll: float = 2.0,
                 timeout: float = 3600.0) -> dict[str, str]:
    """Wait for the shards that another live run holds under ``root`` (``{shard: lease text}``) to be
    committed by it; returns those it did not commit: its lease ended without a commit (it failed or was
    stopped) or ``timeout`` seconds passed. Two runs started on one output then both end with every
    shard done once, instead of the second reporting the first one's shards as left over."""
    pending = dict(leased)
    deadline = time.monotonic() + timeout
    while pending and time.monotonic() < deadline:
        for shard in list(pending):
            if committed(shard):
                pending.pop(shard)
        if not pending or all(live_lease(root, s) is None for s in pending):
            break
        time.sleep(poll)
    return {s: why for s, why in pending.items() if not committed(s)}


def raise_if_leased(leased: dict[str, str]) -> None:
    """Raise :class:`AbortedError` (exit 3) when shards were left to another run that holds their lease."""
    if leased:
        shard, why = next(iter(leased.items()))
        raise AbortedError(f"{len(leased)} shard(s) left to another run writing the same output (e.g. {shard}: "
                           f"{why}); the rest is done: re-run the same command after that run ends")

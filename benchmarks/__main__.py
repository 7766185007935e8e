"""Run the benchmark suite: `python -m benchmarks [--only NAME ...] [--out DIR] [--quick]`.

Every figure is measured in one run on one machine; compare ratios, not absolute times. A suite is a
module with ``run(out_dir, quick) -> {"settings", "tables": {title: rows}, "ratios"}`` (or, like the
fine-tuning suite, ``run() -> rows``). The runner prints one table per suite table and writes
``results.json`` (all suites) to ``--out``.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from . import (
    bookkeeping_bench,
    finetune_bench,
    flops_bench,
    lora_bench,
    memory_bench,
    recipes_bench,
    restyle_bench,
    score_bench,
    utilisation_bench,
)

SUITES: dict[str, Callable[..., Any]] = {
    "bookkeeping": bookkeeping_bench.run,
    "finetune": finetune_bench.run,
    "flops": flops_bench.run,
    "lora": lora_bench.run,
    "memory": memory_bench.run,
    "recipes": recipes_bench.run,
    "restyle": restyle_bench.run,
    "score": score_bench.run,
    "utilisation": utilisation_bench.run,
}


def run_suite(name: str, out_dir: Path, quick: bool) -> dict[str, Any]:
    """Run one suite; its result normalised to ``{"settings", "tables", "ratios", "seconds"}``."""
    fn = SUITES[name]
    start = time.perf_counter()
    res = fn(out_dir, quick) if inspect.signature(fn).parameters else fn()
    if isinstance(res, list):  # a suite returning plain rows (finetune_bench)
        res = {"settings": {}, "tables": {name: res}, "ratios": {}}
    res["seconds"] = round(time.perf_counter() - start, 1)
    return res


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "" if v is None else str(v)


def print_suite(console: Console, name: str, res: dict[str, Any]) -> None:
    """One table per table of the suite, titled with the suite's settings."""
    settings = {k: v for k, v in res.get("settings", {}).items() if k != "machine"}
    m = res.get("settings", {}).get("machine", {})
    if m:
        console.print(f"[bold]{name}[/bold]: {m.get('cpus')} CPUs, torch {m.get('torch')}, load {m.get('load_avg_1_5_15')}")
    if settings:
        console.print(f"  settings: {json.dumps(settings, default=str)}")
    for title, rows in res["tables"].items():
        if not rows:
            continue
        cols: list[str] = []
        for row in rows:
            cols += [k for k in row if k not in cols]
        table = Table(title=f"{name}: {title}")
        for col in cols:
            table.add_column(col)
        for row in rows:
            table.add_row(*[_fmt(row.get(k, "")) for k in cols])
        console.print(table)
    if res.get("ratios"):
        console.print("  ratios: " + ", ".join(f"{k}={v:.4g}" for k, v in res["ratios"].items()))


def main(argv: list[str] | None = None) -> int:
    """The runner's entry point (``argv`` for tests); returns the exit code."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks")
    parser.add_argument("--only", nargs="*", choices=sorted(SUITES), help="suites to run (default: all)")
    parser.add_argument("--out", default="bench-out", help="folder for results.json")
    parser.add_argument("--quick", action="store_true", help="small sizes (smoke test; numbers are not meaningful)")
    args = parser.parse_args(argv)
    machine = {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version(),
               "load_avg_at_start": list(os.getloadavg())}
    results: dict[str, Any] = {"machine": machine, "quick": args.quick,
                               "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "suites": {}}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    console = Console(width=None if sys.stdout.isatty() else 240)
    try:  # diffusers' advice to install accelerate, printed at every model load
        from diffusers.utils import logging as diffusers_logging

        diffusers_logging.set_verbosity_error()
    except ImportError:
        pass
    for name in args.only or sorted(SUITES):
        if args.quick and not args.only and not inspect.signature(SUITES[name]).parameters:
            console.print(f"{name}: skipped (no quick mode; name it with --only to run it)")
            continue
        res = run_suite(name, out, args.quick)
        results["suites"][name] = res
        print_suite(console, name, res)
        (out / "results.json").write_text(json.dumps(results, indent=2, default=str))  # after every suite
    console.print(f"wrote {out / 'results.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

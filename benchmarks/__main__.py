"""Run the benchmark suite: `python -m benchmarks [--only NAME ...] [--out DIR]`.

Every figure is measured in one run on one machine; compare ratios, not absolute times.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from . import finetune_bench

SUITES = {"finetune": finetune_bench.run}


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks")
    parser.add_argument("--only", nargs="*", choices=sorted(SUITES), help="suites to run (default: all)")
    parser.add_argument("--out", default="bench-out", help="folder for results.json")
    args = parser.parse_args()
    machine = {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()}
    results = {"machine": machine, "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "suites": {}}
    console = Console()
    for name in args.only or sorted(SUITES):
        rows = SUITES[name]()
        results["suites"][name] = rows
        table = Table(title=f"{name} ({machine['cpus']} CPUs, {machine['platform']})")
        for col in rows[0]:
            table.add_column(col)
        for row in rows:
            table.add_row(*[f"{v:.4g}" if isinstance(v, float) else str(v) for v in row.values()])
        console.print(table)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    console.print(f"wrote {out / 'results.json'}")


if __name__ == "__main__":
    main()

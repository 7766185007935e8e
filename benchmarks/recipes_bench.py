"""Recipes on toy edit pairs nobody tuned on (issues 20 and 27): the held-out protocol, and recipe search.

The pairs and their one split into tuning and evaluation sets are in :mod:`dclip_ray.toyworld.pairs`.
Every fine-tuning uses the settings a user gets by default for the pair (its recipe, ``colour``,
``shape`` or ``shape-upright``, dclip_ray/recipes.yaml), trains on 16 images of the source (render seed
101), is measured by finetune's check on 8 others (seed 303, judge-free) and judged from pixels on 32
more (seed 202). The suite runs every evaluation pair at fine-tuning seeds 0 and 1 (and seed 2 for the
restarts=2 table, where the check keeps the better of seeds s and s+1). Each fine-tuning is one JSON
line of ``OUT/recipes_runs.jsonl`` with its commit, appended as it ends: a run resumes where the last
stopped (``budget_s`` of new fine-tunings per call), and a table at any restarts count is read from the
stored runs.

Standalone: ``python -m benchmarks.recipes_bench --set tuning --kind colour --pairs 6 --seeds 0 1
--set-value adapter=lora --out DIR --worker 0/2 --threads 1`` (and ``--worker 1/2`` beside it) fills
the runs of a tuning experiment; ``--table-only --markdown`` prints the table; ``--search`` runs
`finetune --search`'s trials on the chosen pairs, each also judged, with the Spearman rank correlation
of the score with the judge over the trials.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from dclip_ray.search import spearman
from dclip_ray.toyworld.pairs import EVALUATION, TUNING, EditPair
from dclip_ray.toyworld.protocol import (
    ToyProtocol,
    judge_quality,
    kept_of,
    meets_goals,
    run_key,
    search_trials,
)

from . import _common as c

SEEDS = (0, 1)
SAMPLE = {"colour": 4, "shape": 3}
SEARCH_TRIALS = 8


def sample(pairs: list[EditPair], per_kind: dict[str, int] | None = SAMPLE) -> list[EditPair]:
    """The first ``per_kind[kind]`` pairs of each kind (all with None), in the split's order."""
    if per_kind is None:
        return list(pairs)
    return [p for k, n in per_kind.items() for p in [q for q in pairs if q.kind == k][:n]]


def _row(r: dict[str, Any]) -> dict[str, Any]:
    miss = meets_goals(r)
    return {"pair": r["pair"], "recipe": r["recipe"], "seed": r["seed"], "success": round(r["success"], 3),
            "iou": round(r["iou"], 3), "background_255": round(r["background"], 2),
            "goals": "met" if not miss else "; ".join(miss), "seconds": r["seconds"],
            "judge_read": ", ".join(f"{k} {v}" for k, v in list(r["reads"].items())[:3])}


def _search_rows(proto: ToyProtocol, pairs: list[EditPair], n_trials: int) -> tuple[list[dict], dict[str, float]]:
    rows, ratios = [], {}
    for pair in pairs:
        trials = search_trials(proto, pair, n_trials)
        rho = spearman([t["score"] for t in trials], [judge_quality(t) for t in trials])
        chosen = max(trials, key=lambda t: t["score"])
        ratios[f"spearman_{pair.name}"] = rho
        for i, t in enumerate(trials):
            rows.append({"pair": pair.name, "trial": "recipe" if i == 0 else i, "t0": t["t0"], "lr": t["lr"],
                         "l1": t["w_l1"], "edge": t["w_edge"], "score": round(t["score"], 4),
                         "direction": round(t["direction"], 3), "success": round(t["success"], 3),
                         "iou": round(t["iou"], 3), "background_255": round(t["background"], 2),
                         "chosen": "*" if t is chosen else ""})
    return rows, ratios


RUNS = "recipes_runs.jsonl"
"""One JSON line per protocol fine-tuning (:meth:`ToyProtocol.checked`) in ``--out``, appended as each ends:
the table resumes across runs and each row names the commit that made it."""


def commit() -> str:
    """The checkout's short commit, with ``+`` when the working tree has changes ("?" outside git)."""
    import subprocess

    def git(*a: str) -> str:
        return subprocess.run(["git", *a], capture_output=True, text=True, check=False).stdout.strip()

    head = git("rev-parse", "--short", "HEAD")
    return (head + ("+" if git("status", "--porcelain", "--untracked-files=no") else "")) if head else "?"


def load_runs(path: Path) -> dict[tuple[str, int, str], dict[str, Any]]:
    """The stored fine-tunings by ``(pair, seed, run key)`` (the last line wins)."""
    runs = {}
    if path.exists():
        for line in path.read_text().splitlines():
            if line.strip():
                r = json.loads(line)
                runs[r["pair"], r["seed"], r["key"]] = r
    return runs


def needed(proto: ToyProtocol, pairs: list[EditPair], seeds: tuple[int, ...], over: dict[str, Any],
           restarts: int | None = None) -> list[tuple[EditPair, int, int, list[tuple[int, str]]]]:
    """Per (pair, seed) row: ``(pair, seed, N, [(fine-tuning seed, run key)])``, N the restarts a user gets
    (the recipe's, or ``restarts``) from seeds seed..seed+N-1."""
    rows = []
    for p in pairs:
        for s in seeds:
            n = restarts or proto.config(p, s, over).restarts
            rows.append((p, s, n, [(s + i, run_key(proto.config(p, s + i, over))) for i in range(n)]))
    return rows


def table(rows: list[tuple[EditPair, int, int, list[tuple[int, str]]]], runs: dict[tuple[str, int, str], Any],
          bar: float | None, min_spread: float) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The table's rows (a row whose fine-tunings are not all stored says so) and its counts."""
    out, done = [], []
    for p, s, n, want in rows:
        have = [runs.get((p.name, ts, k)) for ts, k in want]
        if any(h is None for h in have):
            out.append({"pair": p.name, "recipe": p.recipe, "seed": s, "restarts": n,
                        "goals": f"not run yet ({sum(h is not None for h in have)} of {n} fine-tunings stored)"})
            continue
        runs_ = [h for h in have if h is not None]
        kept = runs_[kept_of(runs_, bar, min_spread)]
        row = _row({**kept, "seed": s, "pair": p.name, "kind": p.kind})
        row.update(restarts=n, kept_seed=kept["seed"], adapter=kept.get("adapter", "full"),
                   check_scores=" ".join(f"{(h['check'].get('score') or float('nan')):.2f}" for h in runs_),
                   seconds=round(sum(h["seconds"] for h in runs_), 1),
                   commit=" ".join(sorted({h.get("commit", "?") for h in runs_})))
        out.append(row)
        done.append({**kept, "kind": p.kind, "pair": p.name, "seed": s})
    met = [not meets_goals(r) for r in done]
    by_pair: dict[str, list[bool]] = {}
    for r, ok in zip(done, met, strict=True):
        by_pair.setdefault(r["pair"], []).append(ok)
    counts = {"pair_seeds": len(rows), "pair_seeds_done": len(done), "pair_seeds_meeting_goals": sum(met),
              "pairs_failing_every_seed": sum(not any(v) for v in by_pair.values()),
              "mean_seconds_per_row": round(sum(float(r["seconds"]) for r in out if "seconds" in r) / max(1, len(done)), 1)}
    for kind in ("colour", "shape"):
        mine = [r for r in done if r["kind"] == kind]
        if mine:
            counts[f"{kind}_success_mean"] = round(sum(r["success"] for r in mine) / len(mine), 3)
            counts[f"{kind}_background_mean"] = round(sum(r["background"] for r in mine) / len(mine), 2)
    return out, counts


def fill(proto: ToyProtocol, path: Path, rows: list[Any], over: dict[str, Any], budget_s: float | None = None,
         worker: tuple[int, int] = (0, 1), log: Any = None) -> int:
    """Run the fine-tunings ``rows`` need and ``path`` lacks (this worker's share: index % N == I), each
    appended as it ends, until ``budget_s`` is spent; returns how many ran."""
    stored, version = load_runs(path), commit()
    todo = list(dict.fromkeys((p, ts, k) for p, _, _, want in rows for ts, k in want))
    todo = [t for i, t in enumerate(x for x in todo if (x[0].name, x[1], x[2]) not in stored)
            if i % worker[1] == worker[0]]
    start, ran = time.perf_counter(), 0
    for p, ts, k in todo:
        if budget_s is not None and time.perf_counter() - start > budget_s:
            break
        r = {**proto.checked(p, ts, over), "commit": version}
        if r["key"] != k:
            raise RuntimeError(f"run key of {p.name} seed {ts} changed: {r['key']} != {k}")
        with path.open("a") as f:
            f.write(json.dumps(r) + "\n")
        ran += 1
        if log:
            log(json.dumps(_row({**r})))
    return ran


def run(out_dir: Any, quick: bool, budget_s: float | None = 3600.0) -> dict[str, Any]:
    """The suite: every evaluation pair at fine-tuning seeds 0 and 1 with the defaults a user gets
    (restarts included), resuming from ``out_dir``/:data:`RUNS` and running at most ``budget_s`` of new
    fine-tunings per call (the rest on the next run); the same table at restarts=2, from the same runs
    and one more seed."""
    from dclip_ray.config import QualityCheck

    proto = ToyProtocol(n_eval=8 if quick else 32)
    pairs = sample(EVALUATION, {"colour": 1, "shape": 1}) if quick else list(EVALUATION)
    seeds = (0,) if quick else SEEDS
    over = {"epochs": 1} if quick else {}
    path = Path(out_dir) / ("recipes_runs_quick.jsonl" if quick else RUNS)
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = needed(proto, pairs, seeds, over)
    two = needed(proto, pairs, seeds, over, restarts=2)
    fill(proto, path, rows + two, over, None if quick else budget_s)  # the defaults' runs first
    check = QualityCheck()
    runs = load_runs(path)
    bar = check.bar(proto.preset)
    defaults, counts = table(rows, runs, bar, check.min_spread)
    restarted, counts2 = table(two, runs, bar, check.min_spread)
    return {"settings": {"machine": c.machine(), "pairs": len(pairs), "seeds": list(seeds), "n_train": proto.n_train,
                         "n_eval": proto.n_eval, "check_bar": bar, "runs_file": str(path)},
            "tables": {"evaluation pairs, the defaults (restarts included)": defaults,
                       "evaluation pairs, restarts=2 (the check keeps the better)": restarted},
            "ratios": {**counts, **{f"restarts2_{k}": v for k, v in counts2.items()}}}


def main(argv: list[str] | None = None) -> int:
    """Standalone: fill the table's runs (``--worker I/N`` shares them between processes) and print it;
    ``--search`` prints the search table instead."""
    ap = argparse.ArgumentParser(prog="python -m benchmarks.recipes_bench")
    ap.add_argument("--set", choices=("tuning", "evaluation"), default="evaluation")
    ap.add_argument("--kind", choices=("colour", "shape"), default=None)
    ap.add_argument("--pairs", type=int, default=None, help="the first N pairs of the set (per kind)")
    ap.add_argument("--names", nargs="+", default=None, help="only these pairs (e.g. red_circle-to-blue_circle)")
    ap.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS))
    ap.add_argument("--restarts", type=int, default=None, help="the table at N restarts (default: the recipe's)")
    ap.add_argument("--set-value", action="append", default=[], help="FIELD=VALUE of FinetuneConfig")
    ap.add_argument("--out", default="bench-out", help="folder of the runs file (resumed)")
    ap.add_argument("--runs-file", default=RUNS)
    ap.add_argument("--worker", default="0/1", help="I/N: run every N-th missing fine-tuning from the I-th")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (2 workers x 1 thread on 2 cores)")
    ap.add_argument("--budget-min", type=float, default=None, help="stop starting fine-tunings after this")
    ap.add_argument("--table-only", action="store_true", help="print the table from the stored runs")
    ap.add_argument("--search", action="store_true", help="the search table on the chosen pairs (seed 0)")
    ap.add_argument("--markdown", action="store_true", help="print the table as README markdown")
    a = ap.parse_args(argv)
    if a.threads:
        import torch

        torch.set_num_threads(a.threads)
    pairs = [p for p in (TUNING if a.set == "tuning" else EVALUATION) if a.kind in (None, p.kind)]
    if a.pairs:
        pairs = sample(pairs, {k: a.pairs for k in ("colour", "shape")})
    if a.names:
        pairs = [p for p in pairs if p.name in a.names]
    over = {k: json.loads(v) if v[:1].isdigit() or v[:1] == "-" else v
            for k, v in (x.split("=", 1) for x in a.set_value)}
    proto = ToyProtocol()
    if a.search:
        search, ratios = _search_rows(proto, pairs, SEARCH_TRIALS)
        print(json.dumps({"search": search, "ratios": ratios}, indent=1))
        return 0
    from dclip_ray.config import QualityCheck

    path = Path(a.out) / a.runs_file
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = needed(proto, pairs, tuple(a.seeds), over, a.restarts)
    if not a.table_only:
        i, n = (int(x) for x in a.worker.split("/"))
        fill(proto, path, rows, over, a.budget_min * 60 if a.budget_min else None, (i, n), log=print)
    check = QualityCheck()
    out, counts = table(rows, load_runs(path), check.bar(proto.preset), check.min_spread)
    if a.markdown:
        print(markdown(out))
        print(json.dumps(counts))
    else:
        print(json.dumps({"table": out, "counts": counts, "overrides": over}, indent=1))
    return 0


def markdown(rows: list[dict[str, Any]]) -> str:
    """The table as README markdown: one line per pair, its seeds side by side (success / IoU /
    background, the goals missed), the commit(s) that made it."""
    by: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        by.setdefault(r["pair"], []).append(r)
    seeds = sorted({r["seed"] for r in rows})
    lines = ["| pair | recipe | " + " | ".join(f"seed {s}" for s in seeds) + " | commit |",
             "|---|---|" + "---|" * len(seeds) + "---|"]

    def cell(r: dict[str, Any] | None) -> str:
        if r is None or "success" not in r:
            return "not run yet"
        head = f"{r['success']:.0%} / {r['iou']:.2f} / {r['background_255']:.1f}"
        return head + ("" if r["goals"] == "met" else f" ({r['goals']})")

    for pair, rs in by.items():
        at = {r["seed"]: r for r in rs}
        commits = sorted({c for r in rs for c in str(r.get("commit", "")).split() if c})
        name = pair.replace("_", " ").replace("-to-", " -> ")
        lines.append(f"| {name} | {rs[0]['recipe']} | " + " | ".join(cell(at.get(s)) for s in seeds)
                     + f" | {' '.join(commits)} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())

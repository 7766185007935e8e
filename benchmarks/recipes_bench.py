"""Recipes on toy edit pairs nobody tuned on (issue 20): the held-out protocol, and recipe search.

The pairs and their one split into tuning and evaluation sets are in :mod:`dclip_ray.toyworld.pairs`.
Every row fine-tunes with the pair's recipe (``colour`` or ``shape``, dclip_ray/recipes.yaml) on 16
images of the source (render seed 101) and judges 32 others (seed 202) from pixels; it is repeated at
fine-tuning seeds 0 and 1. The default run takes a fixed sample of the evaluation set (its first 4
colour and 3 shape pairs in the split's order; ``--pairs all`` for all 30); ``--set tuning`` runs the
tuning pairs (what the recipes were tuned on).

The search table runs `finetune --search`'s trials (8 knob settings around the recipe, scored without
the judge on 8 other images, seed 303) in this process on the sampled pairs the recipe missed (else
the first colour and shape pair), judges every trial on the 32 held-out images too, and reports the
Spearman rank correlation of the score with the judge's quality over the trials, and the judged result
of the trial the score chose against the recipe's own.

Standalone (tuning runs): ``python -m benchmarks.recipes_bench --set tuning --kind colour --seeds 0 1
--set-value w_edge=10 --out runs.jsonl``.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from dclip_ray.search import spearman
from dclip_ray.toyworld.pairs import EVALUATION, TUNING, EditPair
from dclip_ray.toyworld.protocol import ToyProtocol, judge_quality, meets_goals, search_trials

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


def run(out_dir: Any, quick: bool) -> dict[str, Any]:
    """The suite: evaluation sample x seeds, then the search table (see the module docstring)."""
    proto = ToyProtocol(n_eval=8 if quick else 32)
    pairs = sample(EVALUATION, {"colour": 1, "shape": 1} if quick else SAMPLE)
    seeds = (0,) if quick else SEEDS
    over = {"epochs": 1} if quick else {}
    results = [proto.run(p, s, over) for p in pairs for s in seeds]
    rows = [_row(r) for r in results]
    missed = [p for p in pairs if any(meets_goals(r) for r in results if r["pair"] == p.name)]
    to_search = (missed or pairs)[:1 if quick else 2]
    search, ratios = ([], {}) if quick else _search_rows(proto, to_search, SEARCH_TRIALS)
    met = sum(all(not meets_goals(r) for r in results if r["pair"] == p.name) for p in pairs)
    return {"settings": {"machine": c.machine(), "pairs": [p.name for p in pairs], "seeds": list(seeds),
                         "n_train": proto.n_train, "n_eval": proto.n_eval, "search_trials": SEARCH_TRIALS},
            "tables": {"held-out pairs (evaluation set)": rows, "search (trials judged too)": search},
            "ratios": {"pairs_meeting_goals_on_every_seed": met, "pairs": len(pairs), **ratios}}


def main(argv: list[str] | None = None) -> int:
    """Tuning runs: one JSON line per (pair, seed) with the recipe and the overrides given."""
    ap = argparse.ArgumentParser(prog="python -m benchmarks.recipes_bench")
    ap.add_argument("--set", choices=("tuning", "evaluation"), default="tuning")
    ap.add_argument("--kind", choices=("colour", "shape"), default=None)
    ap.add_argument("--pairs", type=int, default=None, help="the first N pairs of the set (per kind)")
    ap.add_argument("--names", nargs="+", default=None, help="only these pairs (e.g. red_circle-to-blue_circle)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--set-value", action="append", default=[], help="FIELD=VALUE of FinetuneConfig")
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    pairs = [p for p in (TUNING if a.set == "tuning" else EVALUATION) if a.kind in (None, p.kind)]
    if a.pairs:
        pairs = sample(pairs, {k: a.pairs for k in ("colour", "shape")})
    if a.names:
        pairs = [p for p in pairs if p.name in a.names]
    over = {k: json.loads(v) if v[:1].isdigit() or v[:1] == "-" else v
            for k, v in (x.split("=", 1) for x in a.set_value)}
    proto = ToyProtocol()
    for p in pairs:
        for s in a.seeds:
            r = proto.run(p, s, over)
            line = json.dumps({**_row(r), "overrides": over})
            print(line, flush=True)
            if a.out:
                with open(a.out, "a") as f:
                    f.write(line + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

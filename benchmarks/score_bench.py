"""How well the per-image judge-free score finds bad edits (issue 27): AUROC against the pixel judge.

Every row of the held-out protocol (:mod:`dclip_ray.toyworld.protocol`: fine-tune an evaluation pair
with the recipe a user gets by default, at fine-tuning seeds 0 and 1, on 16 renders of the source)
edits N other renders of the source; each edit gets the score every restyle writes into its manifest
(:func:`dclip_ray.scoring.image_scores`, the run's CLIP: the toy CLIP) and the pixel judge's verdict
(good = the judge reads the target colour and shape AND the background outside the shapes is within
6/255, the issue-20 goals per image). Good and bad models alike: the default recipes miss on most
pair-seeds (README recipes table), so both kinds of edit are plentiful.

Reported: the AUROC of the score (and of each of its parts) against the verdict over all edits, and
the precision and recall of keeping the edits scored at or above a few thresholds (the suggested
``--min-score``). Each edit is one JSON line in ``OUT/score_edits.jsonl``, appended as it is measured,
so a run resumes where it stopped (``python -m benchmarks.score_bench --out DIR``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np

from dclip_ray.losses import layout_loss
from dclip_ray.quality import output_spread
from dclip_ray.scoring import auroc, image_scores, outline_similarity, precision_recall_at, rows_of
from dclip_ray.toyworld.judge import judge, to_uint8_image
from dclip_ray.toyworld.pairs import EVALUATION, TUNING, EditPair
from dclip_ray.toyworld.protocol import ToyProtocol
from dclip_ray.toyworld.render import BACKGROUND

from . import _common as c

SEEDS = (0, 1)
PER_KIND = {"colour": 2, "shape": 2}
N_EVAL = 128
THRESHOLDS = (0.3, 0.4, 0.5, 0.6, 0.7)
PARTS = ("score", "direction", "structure", "background", "outline", "layout")


def pairs(per_kind: dict[str, int], which: list[EditPair] = EVALUATION) -> list[EditPair]:
    """The first ``per_kind[kind]`` pairs of each kind of ``which`` (the evaluation set), in the split's
    order."""
    return [p for k, n in per_kind.items() for p in [q for q in which if q.kind == k][:n]]


def verdicts(pair: EditPair, edits: Any, masks: np.ndarray) -> list[dict[str, Any]]:
    """Per edit: the judge's success, its background error (/255) and the verdict (success and
    background <= 6/255)."""
    out = []
    for image, mask in zip(edits, masks, strict=True):
        v = judge(image, ref_mask=mask)
        region = ~(mask | v.mask)
        diff = np.abs(to_uint8_image(image).astype(np.float32) - np.asarray(BACKGROUND, np.float32))
        bg = float(diff[region].mean()) if region.any() else 0.0
        success = bool(v.success(pair.target_colour, pair.target_shape))
        out.append({"success": success, "background_255": round(bg, 2), "good": success and bg <= 6.0,
                    "read": f"{v.colour} {v.shape}"})
    return out


def measure(proto: ToyProtocol, pair: EditPair, seed: int, quick: bool) -> list[dict[str, Any]]:
    """The scored and judged edits of one (pair, seed)."""
    cfg, x, edits, masks = proto.edits(pair, seed, {"epochs": 1} if quick else None)
    scores = rows_of(image_scores(proto.clip, x, edits.clamp(-1, 1), [(pair.source, pair.target)]))
    for row, o in zip(scores, outline_similarity(x, edits.clamp(-1, 1)).tolist(), strict=True):
        row["outline"] = round(o, 6)  # the candidate structure measure, compared with the luminance SSIM
    for row, lo in zip(scores, layout_loss(edits.clamp(-1, 1), x).tolist(), strict=True):
        row["layout"] = round(1 - lo, 6)  # another: the layout kept (1 - the layout loss)
    judged = verdicts(pair, edits, masks)
    spread = output_spread(x, edits)  # one value per model: the held-aside check's collapse measure
    return [{"pair": pair.name, "kind": pair.kind, "seed": seed, "recipe": cfg.recipe, "index": i, **s, **j,
             "spread": round(spread, 4)}
            for i, (s, j) in enumerate(zip(scores, judged, strict=True))]


def analyse(edits: list[dict[str, Any]]) -> tuple[dict[str, float], list[dict[str, Any]], list[dict[str, Any]]]:
    """(ratios: AUROC of the score and its parts, counts), the threshold table, the per-model table."""
    labels = [e["good"] for e in edits]
    parts = [p for p in PARTS if all(p in e for e in edits)]
    ratios = {f"auroc_{p}": auroc([e[p] if p != "background" else -e[p] for e in edits], labels) for p in parts}
    if "outline" in parts:  # the score with the outline measure in place of the luminance SSIM
        ratios["auroc_score_outline"] = auroc([rescored(e, 0.5, 4.0, "outline") for e in edits], labels)
    ratios["auroc_score_vs_judge_success_only"] = auroc([e["score"] for e in edits], [e["success"] for e in edits])
    ratios.update(n_edits=len(edits), n_good=sum(labels), n_models=len({(e["pair"], e["seed"]) for e in edits}))
    table = []
    for t in THRESHOLDS:
        pr = precision_recall_at([e["score"] for e in edits], labels, t)
        table.append({"min_score": t, "precision": round(pr["precision"], 3), "recall": round(pr["recall"], 3),
                      "kept": round(pr["kept"], 3)})
    table.append({"min_score": "none", "precision": round(sum(labels) / max(1, len(labels)), 3), "recall": 1.0,
                  "kept": 1.0})
    models = []
    for key in dict.fromkeys((e["pair"], e["seed"]) for e in edits):
        mine = [e for e in edits if (e["pair"], e["seed"]) == key]
        models.append({"pair": key[0], "seed": key[1], "good": round(np.mean([e["good"] for e in mine]), 3),
                       "mean_score": round(float(np.mean([e["score"] for e in mine])), 3),
                       "spread": mine[0].get("spread"),
                       "auroc_within": round(auroc([e["score"] for e in mine], [e["good"] for e in mine]), 3)})
    return ratios, table, models


GRID_STRUCTURE = (0.0, 0.25, 0.5, 1.0)
GRID_BACKGROUND = (0.0, 2.0, 4.0, 8.0, 16.0, 32.0)


def rescored(e: dict[str, Any], w_structure: float, w_background: float, structure: str = "structure") -> float:
    """An edit's score under other weights (its stored parts; ``structure``: which part is the structure)."""
    return e["direction"] - w_structure * (1 - e[structure]) - w_background * e["background"]


def fit_weights(edits: list[dict[str, Any]]) -> tuple[float, float, float]:
    """``(w_structure, w_background, AUROC)`` of the grid point with the best AUROC on ``edits`` (the
    tuning pairs' edits: never the evaluation pairs')."""
    labels = [e["good"] for e in edits]
    best = max(((ws, wb, auroc([rescored(e, ws, wb) for e in edits], labels))
                for ws in GRID_STRUCTURE for wb in GRID_BACKGROUND), key=lambda x: x[2])
    return best


def run(out_dir: Any, quick: bool, tuning: bool = False, seeds: tuple[int, ...] = SEEDS) -> dict[str, Any]:
    """The suite (see the module docstring); resumes from ``out_dir/score_edits.jsonl``
    (``tuning``: the tuning pairs instead, ``score_edits_tuning.jsonl``, for choosing the score's weights)."""
    name = "score_edits_quick" if quick else "score_edits_tuning" if tuning else "score_edits"
    path = Path(out_dir) / f"{name}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    done = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    seen = {(e["pair"], e["seed"]) for e in done}
    n_eval = 8 if quick else N_EVAL
    proto = ToyProtocol(n_eval=n_eval)
    todo = [(p, s) for p in pairs({"colour": 1, "shape": 1} if quick else PER_KIND, TUNING if tuning else EVALUATION)
            for s in ((0,) if quick else seeds)]
    for p, s in todo:
        if (p.name, s) in seen:
            continue
        rows = measure(proto, p, s, quick)
        with path.open("a") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
        done += rows
    ratios, table, models = analyse(done)
    tuned = Path(out_dir) / "score_edits_tuning.jsonl"
    if not tuning and tuned.exists():  # weights chosen on the tuning pairs, judged here on the evaluation pairs
        ws, wb, fit = fit_weights([json.loads(line) for line in tuned.read_text().splitlines()])
        ratios.update(tuned_w_structure=ws, tuned_w_background=wb, tuned_auroc_on_tuning=fit,
                      tuned_auroc=auroc([rescored(e, ws, wb) for e in done], [e["good"] for e in done]))
    return {"settings": {"machine": c.machine(), "pairs": sorted({e["pair"] for e in done}), "seeds": sorted(
                {e["seed"] for e in done}), "n_eval": n_eval, "verdict": "judge success and background <= 6/255"},
            "tables": {"keeping edits scored >= min_score": table, "per model": models}, "ratios": ratios}


def main(argv: list[str] | None = None) -> int:
    """Standalone: measure (resuming) and print the ratios and tables as JSON."""
    ap = argparse.ArgumentParser(prog="python -m benchmarks.score_bench")
    ap.add_argument("--out", default="bench-out")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--tuning", action="store_true", help="the tuning pairs (choose the score's weights on these)")
    ap.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS))
    a = ap.parse_args(argv)
    res = run(a.out, a.quick, a.tuning, tuple(a.seeds))
    print(json.dumps({"ratios": res["ratios"], "tables": res["tables"]}, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

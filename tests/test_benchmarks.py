"""Smoke tests of `make bench` (benchmarks/): every suite runs in --quick mode and returns finite ratios.

The fast ones (runner + FLOP count, helpers) run in `make test`; the suites that start Ray are slow.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch

from benchmarks import (
    _common,
    finetune_bench,
    flops_bench,
    lora_bench,
    memory_bench,
    recipes_bench,
    restyle_bench,
    score_bench,
    utilisation_bench,
)
from benchmarks.__main__ import main


def check(res: dict, tables: list[str], ratios: list[str]) -> None:
    """The suite's result has its settings (with the machine), its tables (non-empty) and its ratios:
    positive finite numbers (the Ray overhead figures, differences of two times, and the memory per
    model, a difference of two peaks, only finite)."""
    assert res["settings"]["machine"]["cpus"] == os.cpu_count()
    for t in tables:
        assert res["tables"][t], t
    for k in ratios:
        assert k in res["ratios"], k
    for k, v in res["ratios"].items():
        assert isinstance(v, float) and math.isfinite(v), (k, v)
        if "overhead" not in k and "per_model" not in k:
            assert v > 0, (k, v)


def test_runner_flops_quick(tmp_path: Path) -> None:
    assert main(["--only", "flops", "--quick", "--out", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["quick"] is True
    flops = res["suites"]["flops"]
    check(flops, ["full-size UNet (item 6)", "projected edits/s per GPU (item 6)"],
          ["celeba_hq_tflop_per_forward", "celeba_hq_h100_fresh_edits_per_s_at_40pct"])
    # the published figure for the Ho et al. 256x256 UNet: 248.7 GMAC = 0.497 TFLOP
    assert flops["ratios"]["celeba_hq_tflop_per_forward"] == pytest.approx(0.497, rel=0.01)
    row = flops["tables"]["full-size UNet (item 6)"][0]
    assert (row["params_M"], row["evals_fresh_edit"], row["evals_cached_edit"]) == (113.67, 79, 40)
    # 40 % of 989 TFLOP/s over 79 forwards of 0.497 TFLOP: about 10 new edits/s
    assert flops["ratios"]["celeba_hq_h100_fresh_edits_per_s_at_40pct"] == pytest.approx(10.08, rel=0.01)
    assert "| celeba_hq |" in flops_bench.markdown(flops)


def test_evals_per_edit_follow_the_official_time_sequence() -> None:
    assert flops_bench.evals_per_edit(500, 40, 40) == {"inversion": 39, "generation": 40, "fresh": 79, "cached": 40}
    assert flops_bench.evals_per_edit(500, 40, 6)["fresh"] == 45


def test_flop_count_of_a_linear_layer() -> None:
    lin = torch.nn.Linear(64, 32)
    x = torch.zeros(8, 64)
    with torch.utils.flop_counter.FlopCounterMode(display=False) as fc:
        lin(x)
    assert fc.get_total_flops() == 2 * 8 * 64 * 32  # the convention the GEMM figure uses too


def test_tree_rss_sampler_sees_a_child_process() -> None:
    import subprocess
    import sys
    import time

    own = _common._tree_rss_bytes(os.getpid())
    child = subprocess.Popen([sys.executable, "-c", "b = b'x' * (200 * 2**20); import time; time.sleep(30)"])
    try:
        time.sleep(1.5)
        with _common.TreeRssSampler(interval=0.05) as s:
            time.sleep(0.2)
        assert s.peak - own > 150 * 2**20  # the child's 200 MB counted
    finally:
        child.kill()
        child.wait()


def test_gemm_flops_positive() -> None:
    assert utilisation_bench.gemm_flops_per_s(256, 2) > 1e8


@pytest.mark.slow
def test_restyle_quick(tmp_path: Path) -> None:
    res = restyle_bench.run(tmp_path, quick=True)
    check(res, ["throughput (item 1)", "UNet evaluations per image (item 2)", "latent cache, K models (item 2)",
                "actors 2 vs 1 (item 5)"], ["restyle_vs_plain_b1", "two_actors_over_one", "cached_over_inverted_wall_K3"])
    counts = res["tables"]["UNet evaluations per image (item 2)"]
    for row in counts:  # the pipeline's own counters match the formulas: 79K one at a time vs 39 + 40K ours
        assert row["one_at_a_time"] == row["formula_one_at_a_time"]
        assert row["ours"] == row["formula_ours"]
    assert res["ratios"]["evals_ours_over_official_K3"] == pytest.approx(19 / 27)
    cache = {r["latents"]: r for r in res["tables"]["latent cache, K models (item 2)"]}
    assert cache["cached"]["n_cached"] == cache["cached"]["images"] > 0
    assert cache["inverted"]["n_cached"] == 0


@pytest.mark.slow
def test_memory_quick(tmp_path: Path) -> None:
    res = memory_bench.run(tmp_path, quick=True)
    check(res, ["streaming memory (item 4)"], ["peak_rss_large_over_small"])
    rows = res["tables"]["streaming memory (item 4)"]
    assert [r["images"] for r in rows[:2]] == [200, 1000]
    assert rows[0]["peak_tree_rss_mb"] > rows[0]["after_ray_init_mb"] > 300  # Ray's processes are counted


@pytest.mark.slow
def test_utilisation_quick(tmp_path: Path) -> None:
    res = utilisation_bench.run(tmp_path, quick=True)
    check(res, ["UNet FLOP/s vs GEMM (item 7)"], ["restyle_vs_gemm_b1", "restyle_vs_gemm_b8", "bare_vs_gemm_b8"])
    for row in res["tables"]["UNet FLOP/s vs GEMM (item 7)"]:
        assert row["unet_evals"] == row["images"] * (2 + 3)  # S_inv = S_gen = 3: 2 + 3 calls per image


def test_saved_tensor_meter_counts_what_backward_holds_and_frees_it() -> None:
    x = torch.randn(8, 64, requires_grad=True)
    lin = torch.nn.Linear(64, 32, bias=False)
    with finetune_bench.SavedTensorMeter() as meter:
        y = lin(x)  # saves x (for the weight's gradient) and the weight (a Parameter: not counted)
        z = y.exp().exp()  # exp saves its result: two [8, 32] tensors
        assert meter.live == (8 * 64 + 2 * 8 * 32) * 4
        z.sum().backward()
        assert meter.live == 0, "backward released the graph"
        w = x.exp()
        w2 = w[:4].exp()  # the view of w is not saved; exp saves its result (a new storage)
        (w2.sum() + w.sum()).backward()
    assert meter.peak == (8 * 64 + 2 * 8 * 32) * 4  # the first graph was the largest
    assert meter.live == 0 and meter.packed >= 5


@pytest.mark.slow
def test_finetune_quick_efficient_mode_uses_less_memory_than_full() -> None:
    rows = finetune_bench.run(quick=True)
    ratio = [r for r in rows if r["mode"] == "efficient/full"]
    assert [r["batch"] for r in ratio] == [1]
    assert all(r["train_s"] > 0 for r in rows if r["mode"] != "efficient/full")
    eff = [r for r in rows if r["mode"] == "efficient" and r["batch"] == 1 and r["n_gen"] == 6]
    full = [r for r in rows if r["mode"] == "full" and r["batch"] == 1 and r["epochs"] == 1 and r["n_gen"] == 6]
    # the bytes saved for backward: full mode holds the graph of all 6 generation steps, efficient one
    assert eff and full and 0 < eff[0]["saved_mb"] < full[0]["saved_mb"] / 2, rows
    assert 0 < ratio[0]["saved_mb"] < 0.5, rows
    assert full[0]["peak_rss_growth_mb"] > 0, rows  # no warm-up hides the graph any more (secondary figure)


@pytest.mark.slow
def test_recipes_quick(tmp_path: Path) -> None:
    """The held-out protocol at smoke size: one colour and one shape evaluation pair, 1 epoch, 8 images;
    a second run resumes from the stored runs and trains nothing."""
    res = recipes_bench.run(tmp_path, quick=True)
    rows = res["tables"]["evaluation pairs, the defaults (restarts included)"]
    assert [r["recipe"] for r in rows] == ["colour", "shape-upright"] and all(r["seed"] == 0 for r in rows)
    assert all(0 <= r["success"] <= 1 and r["goals"] and r["commit"] for r in rows)
    assert res["ratios"]["pair_seeds_done"] == 2 and 0 <= res["ratios"]["pair_seeds_meeting_goals"] <= 2
    two = res["tables"]["evaluation pairs, restarts=2 (the check keeps the better)"]
    assert all(r["restarts"] == 2 and r["kept_seed"] in (0, 1) for r in two)
    runs = tmp_path / "recipes_runs_quick.jsonl"
    n = len(runs.read_text().splitlines())
    assert recipes_bench.run(tmp_path, quick=True)["tables"] == res["tables"]
    assert len(runs.read_text().splitlines()) == n, "stored runs are reused"


def test_recipes_table_keeps_the_restart_the_check_keeps() -> None:
    """By hand: a (pair, seed) row of N restarts is judged on the run finetune's check would keep (the
    best-scored that passed), the judge's numbers are that run's, and a row missing a run says so."""
    from dclip_ray.toyworld.pairs import EVALUATION

    pair = EVALUATION[0]

    def run(seed: int, score: float, spread: float, success: float) -> dict:
        check = {"n_images": 8, "held_aside": True, "finite": True, "score": score, "direction": score,
                 "structure": 1.0, "background": 0.0, "spread": spread}
        return {"pair": pair.name, "kind": pair.kind, "seed": seed, "recipe": "colour", "key": f"k{seed}",
                "success": success, "iou": 0.9, "background": 1.0, "reads": {}, "seconds": 10.0, "check": check,
                "commit": "abc"}

    runs = {(pair.name, s, f"k{s}"): r for s, r in enumerate([run(0, 0.9, 0.01, 0.0), run(1, 0.6, 0.8, 1.0),
                                                              run(2, 0.7, 0.9, 0.5)])}
    rows = [(pair, 0, 2, [(0, "k0"), (1, "k1")]), (pair, 1, 2, [(1, "k1"), (2, "k2")]), (pair, 2, 2, [(2, "k2"), (3, "k3")])]
    out, counts = recipes_bench.table(rows, runs, bar=0.5, min_spread=0.3)
    assert out[0]["kept_seed"] == 1 and out[0]["success"] == 1.0, "seed 0 collapsed (spread 0.01): not kept"
    assert out[1]["kept_seed"] == 2 and out[1]["success"] == 0.5, "both passed: the higher check score"
    assert out[2]["goals"].startswith("not run yet (1 of 2")
    assert counts["pair_seeds_done"] == 2 and counts["pair_seeds_meeting_goals"] == 1


def test_score_analysis_by_hand() -> None:
    """AUROC, the threshold table and weights chosen on a set where only the background tells good from bad."""
    edits = [{"pair": "p", "seed": 0, "score": d - 4 * b, "direction": d, "structure": 1.0, "background": b,
              "good": good, "success": True}
             for d, b, good in ((0.8, 0.0, True), (0.7, 0.01, True), (0.9, 0.2, False), (0.6, 0.3, False))]
    ratios, table, models = score_bench.analyse(edits)
    assert ratios["auroc_score"] == 1.0 and ratios["auroc_background"] == 1.0 and ratios["auroc_direction"] == 0.5
    assert table[-1] == {"min_score": "none", "precision": 0.5, "recall": 1.0, "kept": 1.0}
    assert {"min_score": 0.5, "precision": 1.0, "recall": 1.0, "kept": 0.5} in table
    assert score_bench.fit_weights(edits)[1] > 0 and models[0]["good"] == 0.5


@pytest.mark.slow
def test_score_quick(tmp_path: Path) -> None:
    """The score suite at smoke size (one colour and one shape pair, 1 epoch, 8 edits each), resumed."""
    res = score_bench.run(tmp_path, quick=True)
    assert res["ratios"]["n_edits"] == 16 and res["ratios"]["n_models"] == 2
    lines = (tmp_path / "score_edits_quick.jsonl").read_text().splitlines()
    assert len(lines) == 16 and {"score", "direction", "good"} <= set(json.loads(lines[0]))
    assert score_bench.run(tmp_path, quick=True)["ratios"]["n_edits"] == 16, "a re-run resumes, adds nothing"


@pytest.mark.slow
def test_lora_quick(tmp_path: Path) -> None:
    res = lora_bench.run(tmp_path, quick=True)
    check(res, ["adapter size (items 2, 3)", "restyle peak RSS per actor, K models (item 2)",
                "fine-tuning one epoch, full vs LoRA (item 2)"],
          ["toy_adapter_over_full", "restyle_peak_lora_over_full_K2", "finetune_time_lora_over_full_b1"])
    assert 0 < res["ratios"]["toy_adapter_over_full"] < 0.2
    assert 0 < res["ratios"]["celeba_hq_adapter_over_full_r4"] < 0.02  # the full-size projection
    ft = {r["adapter"]: r for r in res["tables"]["fine-tuning one epoch, full vs LoRA (item 2)"]}
    assert ft["lora"]["trainable_params"] < 0.2 * ft["full"]["trainable_params"]


def test_gpu_bench_without_a_gpu_fails_at_once_with_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    from benchmarks import gpu_bench

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: make bench-gpu runs for real")
    with pytest.raises(SystemExit) as e:
        gpu_bench.main(["--out", "unused"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: make bench-gpu needs a CUDA GPU")


@pytest.mark.slow
def test_gpu_bench_rehearses_every_section_on_the_cpu(tmp_path: Path) -> None:
    """`gpu_bench --cpu` runs the GPU check's sections and code paths at tiny size (the same CLI calls
    with --gpus-per-task/--gpus-per-actor/--gpus-per-prompt on a logical GPU mapped to the CPU, bf16
    autocast): every section must give its rows, so the first GPU run measures instead of failing on
    code. Its first run here found two such failures (the fine-tuning images held 3 sources for 16
    wanted; Ray Train's NCCL process group without CUDA). About 2.5 minutes on 2 cores."""
    import subprocess
    import sys

    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("RAY_ADDRESS", None)
    run = subprocess.run([sys.executable, "-m", "benchmarks.gpu_bench", "--cpu", "--out", str(tmp_path)], env=env,
                         cwd=Path(__file__).parents[1], capture_output=True, text=True, timeout=900)
    results = json.loads((tmp_path / "results.json").read_text())
    errors = {k: v.get("error") for k, v in results["sections"].items() if "error" in v}
    assert run.returncode == 0 and not errors, (errors, run.stderr[-2000:])
    forward = results["sections"]["forward"]["rows"]
    assert {(r["dtype"], r["batch"]) for r in forward} == {(d, b) for d in ("bf16", "fp32") for b in (1, 8)}
    assert all(r["ms_per_forward"] > 0 and 0 < r["mfu"] < 2 for r in forward)
    restyle = results["sections"]["restyle"]["rows"]
    assert [r["images"] for r in restyle] == [8, 8, 8], restyle
    assert [r["status"] for r in results["sections"]["finetune-many"]["rows"]] == ["ok", "ok"]


def test_bookkeeping_quick(tmp_path: Path) -> None:
    """The bookkeeping suite builds committed shards that restyle, its dry run and verify accept (each
    measurement asserts it: every shard committed, verify OK) and gives finite per-shard costs."""
    from benchmarks import bookkeeping_bench

    res = bookkeeping_bench.run(tmp_path, quick=True)
    rows = res["tables"]["driver bookkeeping over committed shards (issue 28 item 3)"]
    assert {(r["shards"], r["run"]) for r in rows} == {(n, w) for n in (20, 60) for w in ("restyle", "dry-run", "verify")}
    assert all(r["driver_s"] > 0 and r["peak_rss_mib"] > 0 for r in rows)
    assert all(math.isfinite(v) for v in res["ratios"].values())

"""Restyle: Ray Data pipeline vs the official one-image-at-a-time loop, the latent cache, and actor scaling.

Issue 10 items 1, 2 and 5, measured side by side in one run on the toy world (model: the bundled toy
UNet ``toy_shapes``, 1.1 M parameters, 32x32; the "fine-tuned" models are copies of its weights, see
:mod:`benchmarks._common`).

1. Throughput (images/s) of ``run_restyle`` (2 actors of 0.5 CPU, 1 torch thread each; Ray started
   beforehand, actor start-up and model loading included in the wall time) vs a plain single-process
   loop that decodes, inverts, generates and encodes ONE image at a time with the same model and
   steps, at batch sizes 1, 8, 32. The plain loop runs at 1 torch thread and at all CPUs; the
   reference is the faster of the two (on a loaded machine 2 OpenMP threads can be far slower than 1).
2. UNet evaluations per image for K fine-tuned models, counted by the pipeline's own counters
   (``inv_evals`` / ``gen_evals`` of the restyle summary) at S_inv = S_gen = 40 vs the one-at-a-time
   loop, which re-inverts for every model (counted for one model, times K); and the wall-time ratio of
   restyling K = 3 models with latents precomputed by ``run_precompute`` vs without (two Ray jobs; and
   the restyler alone on one shard in this process, best of 2 alternating runs, less noisy).
5. Throughput with 2 actors vs 1 (0.5 CPU and 1 torch thread each; issue 22 item 4): 512 images in 16
   shards of 32 after a warm-up job, end to end (wall, job and actor start-up included) and in steady
   state (images over the span from the first shard's start to the last shard's end), best of 2 runs
   each, alternating (the load of a shared machine drifts between runs more than the effect), against
   the machine's ceiling measured in the same run, best of 2: the same restyle in two plain 1-thread
   processes (6 shards each) over one, and two plain toy-UNet loops over one. Also the fixed cost of a job (wall minus
   inside time of a one-image, one-step restyle: actor start, model load, Ray Data start) and, with 1
   actor, the rest per call (can be negative within noise).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from . import _common as c

T0 = 500


def settings(quick: bool) -> dict[str, Any]:
    """Sizes of one run: full (``make bench``) or quick (smoke test)."""
    if quick:
        return {"n_images": 8, "shard_size": 4, "n_baseline": 2, "steps": 3, "batches": [1, 4],
                "count_steps": 5, "count_k": [1, 3], "cache_k": 3, "t0": T0, "scale_images": 16, "ceiling_forwards": 3,
                "ceiling_shards": 1, "scale_reps": 1}
    return {"n_images": 128, "shard_size": 32, "n_baseline": 8, "steps": 10, "batches": [1, 8, 32],
            "count_steps": 40, "count_k": [1, 3, 10], "cache_k": 3, "t0": T0, "scale_images": 512,
            "ceiling_forwards": 60, "ceiling_shards": 6, "scale_reps": 2}


def plain_loop(inputs: str, out_dir: Path, models: list[str], t0: int, n_inv: int, n_gen: int, limit: int,
               ) -> dict[str, Any]:
    """What the official code does: for each image and each model, decode, invert with the base model,
    generate with the model, encode a PNG and write it; one image at a time, in this process.

    Returns ``{"images", "seconds", "inv_evals", "gen_evals"}`` (evaluations counted per image x call).
    """
    from dclip_ray.diffusion import generate, invert
    from dclip_ray.io.images import encode_image
    from dclip_ray.models import eps_fn_of, load_unet
    from dclip_ray.models.base import load_base
    from dclip_ray.stages.common import CountingEps
    from dclip_ray.stages.inputs import decode_shard, input_shards

    base = load_base(c.TOY_MODEL)
    inv_eps = CountingEps(eps_fn_of(base.unet))
    gen_eps = [CountingEps(eps_fn_of(load_unet(m))) for m in models]
    out_dir.mkdir(parents=True, exist_ok=True)
    n = 0
    start = time.perf_counter()
    with torch.no_grad():
        for _, path in input_shards(inputs):
            for d in decode_shard(path, base.resolution):
                if n >= limit:
                    break
                if d.x is None:
                    continue
                x0 = d.x[None]
                for mi, eps in enumerate(gen_eps):  # the official code inverts again for every model
                    x_t0 = invert(inv_eps, x0, t0, n_inv, base.schedule)
                    x = generate(eps, x_t0, t0, n_gen, base.schedule)
                    (out_dir / f"{d.rec.key}_{mi}.png").write_bytes(encode_image(x[0], "png"))
                n += 1
    return {"images": n, "seconds": time.perf_counter() - start, "inv_evals": inv_eps.evals,
            "gen_evals": sum(e.evals for e in gen_eps)}


def _throughput(tmp: Path, inputs: str, s: dict[str, Any], models: list[str]) -> tuple[list[dict], dict]:
    steps = s["steps"]
    rows, plain_ips = [], {}
    for n_threads in sorted({1, os.cpu_count() or 1}):
        with c.threads(n_threads):
            base = plain_loop(inputs, tmp / "plain", models[:1], s["t0"], steps, steps, s["n_baseline"])
        plain_ips[n_threads] = base["images"] / base["seconds"]
        rows.append({"runner": "plain loop (1 image at a time)", "batch": 1, "actors": 0, "torch_threads": n_threads,
                     "images": base["images"], "wall_s": round(base["seconds"], 3), "inside_s": round(base["seconds"], 3),
                     "images_per_s": round(plain_ips[n_threads], 3)})
    base_ips = max(plain_ips.values())  # the reference: the plain loop at its better thread count
    for r in rows:
        r["vs_plain"] = r["vs_plain_inside"] = round(r["images_per_s"] / base_ips, 3)
    ratios = {"plain_all_threads_over_1thread": plain_ips[max(plain_ips)] / plain_ips[1]}
    for b in s["batches"]:
        summary, wall = c.restyle(inputs, str(tmp / f"tp_b{b}"), models[:1], s["t0"], steps, steps, b, actors=2)
        inside = c.inside_seconds(summary)
        ips = summary["n_images"] / wall
        # inside: the actors' own time; 2 actors work in parallel, so their images/s is n / (inside / 2)
        ips_inside = summary["n_images"] / (inside / 2)
        rows.append({"runner": "ray data restyle", "batch": b, "actors": 2, "torch_threads": 1,
                     "images": summary["n_images"], "wall_s": round(wall, 3), "inside_s": round(inside, 3),
                     "images_per_s": round(ips, 3), "vs_plain": round(ips / base_ips, 3),
                     "vs_plain_inside": round(ips_inside / base_ips, 3)})
        ratios[f"restyle_vs_plain_b{b}"] = ips / base_ips
    return rows, ratios


def _counts(tmp: Path, s: dict[str, Any]) -> tuple[list[dict], dict]:
    steps = s["count_steps"]
    one = c.toy_shards(tmp, 1, 1, seed=7)
    kmax = max(s["count_k"])
    models = c.finetuned_copies(tmp, kmax, s["t0"])
    plain = plain_loop(one, tmp / "plain_count", models[:1], s["t0"], steps, steps, 1)
    plain_per_model = plain["inv_evals"] + plain["gen_evals"]
    rows, ratios = [], {}
    for k in s["count_k"]:
        summary, _ = c.restyle(one, str(tmp / f"count_k{k}"), models[:k], s["t0"], steps, steps, 1, actors=1)
        n = summary["n_images"]
        ours = (summary["inv_evals"] + summary["gen_evals"]) / n
        official = plain_per_model * k
        rows.append({"K": k, "S_inv": steps, "S_gen": steps, "one_at_a_time": official,
                     "formula_one_at_a_time": k * (2 * steps - 1), "ours_inv": summary["inv_evals"] / n,
                     "ours_gen": summary["gen_evals"] / n, "ours": ours, "formula_ours": steps - 1 + steps * k,
                     "saved": round(1 - ours / official, 4), "ours/one_at_a_time": round(ours / official, 4)})
        ratios[f"evals_ours_over_official_K{k}"] = ours / official
    return rows, ratios


def _cache(tmp: Path, inputs: str, s: dict[str, Any]) -> tuple[list[dict], dict]:
    from dclip_ray.config import PrecomputeConfig, Resources
    from dclip_ray.pipeline.precompute import PrecomputeJob, run_precompute

    k, steps, b = s["cache_k"], s["steps"], max(s["batches"])
    models = c.finetuned_copies(tmp, k, s["t0"])
    lat = str(tmp / "latents")
    t = time.perf_counter()
    pre = run_precompute(PrecomputeJob(c.TOY_MODEL, inputs, lat, PrecomputeConfig(t0=s["t0"], n_inv_steps=steps,
                                                                          batch_size=b),
                                       Resources(cpus_per_task=0.5)), progress=False)
    pre_wall = time.perf_counter() - t
    rows, res = [], {}
    for name, latents in (("inverted", None), ("cached", lat)):
        summary, wall = c.restyle(inputs, str(tmp / f"cache_{name}"), models, s["t0"], steps, steps, b,
                                  actors=2, latents=latents)
        res[name] = (summary, wall)
        rows.append({"latents": name, "K": k, "batch": b, "images": summary["n_images"],
                     "n_cached": sum(r.get("n_cached", 0) for r in summary["shards"]),
                     "evals_per_image": (summary["inv_evals"] + summary["gen_evals"]) / summary["n_images"],
                     "wall_s": round(wall, 3), "inside_s": round(c.inside_seconds(summary), 3)})
    # the same restyler in this process, no Ray, one shard, best of 2 alternating runs: less exposed to the
    # load of other processes than the two Ray jobs above
    from dclip_ray.stages.inputs import input_shards
    from dclip_ray.stages.restyle import ShardRestyler
    from dclip_ray.stages.restyle_config import build_restyle_config

    name, path = input_shards(inputs)[0]
    best: dict[str, float] = {}
    with c.threads(1):
        for rep in range(2):
            for kind, latents in (("inverted", None), ("cached", lat)):
                cfg = build_restyle_config(str(tmp / f"cache_local_{kind}_{rep}"), models=models, t0=s["t0"],
                                                n_inv_steps=steps, n_gen_steps=steps, batch_size=b, latents=latents)
                one = ShardRestyler(cfg).run(name, path)
                best[kind] = min(best.get(kind, float("inf")), one["seconds"])
                if rep == 0:
                    rows.append({"latents": f"{kind} (in-process, 1 shard)", "K": k, "batch": b, "images": one["n_ok"],
                                 "n_cached": one["n_cached"], "evals_per_image": (one["inv_evals"] + one["gen_evals"]) / one["n_ok"],
                                 "wall_s": "", "inside_s": ""})
    for row in rows[-2:]:
        row["inside_s"] = round(best[row["latents"].split()[0]], 3)
    rows.append({"latents": "cached/inverted (in-process)", "K": k, "batch": b, "images": "", "n_cached": "",
                 "evals_per_image": "", "wall_s": "", "inside_s": round(best["cached"] / best["inverted"], 3)})
    (si, wi), (sc, wc) = res["inverted"], res["cached"]
    ratio_wall = wc / wi
    ratio_inside = c.inside_seconds(sc) / c.inside_seconds(si)
    expected = (steps * k) / (steps - 1 + steps * k)
    rows.append({"latents": "cached/inverted", "K": k, "batch": b, "images": "", "n_cached": "",
                 "evals_per_image": round(expected, 4), "wall_s": round(ratio_wall, 3), "inside_s": round(ratio_inside, 3)})
    rows.append({"latents": "precompute (once)", "K": 0, "batch": b, "images": pre["n_images"], "n_cached": "",
                 "evals_per_image": steps - 1, "wall_s": round(pre_wall, 3), "inside_s": ""})
    return rows, {"cached_over_inverted_wall_K3": ratio_wall, "cached_over_inverted_inside_K3": ratio_inside,
                  "cached_over_inverted_in_process_K3": best["cached"] / best["inverted"]}


def _window_ips(summary: dict[str, Any]) -> float:
    """Steady-state images/s of a restyle: its images over the span from the first shard's start to the
    last shard's end (job start-up and actor start-up left out; the tail where one actor finishes alone
    is kept)."""
    done = [r for r in summary["shards"] if r.get("started")]
    span = max(r["started"] + r["seconds"] for r in done) - min(r["started"] for r in done)
    return sum(r["n_ok"] for r in done) / span


def _scaling(tmp: Path, s: dict[str, Any], models: list[str]) -> tuple[list[dict], dict]:
    steps, b = s["steps"], max(s["batches"])
    inputs = c.toy_shards(tmp, s["scale_images"], s["shard_size"], seed=11)
    rows, e2e, steady = [], {}, {}
    # the fixed cost of a job (actor start, model load, Ray Data start): a one-image, one-step restyle;
    # it also warms Ray Data up, so that neither measured run pays for the first job's start
    one = c.toy_shards(tmp, 1, 1, seed=7)
    tiny, tiny_wall = c.restyle(one, str(tmp / "scale_empty"), models[:1], s["t0"], 2, 2, 1, actors=1)
    startup = tiny_wall - c.inside_seconds(tiny)
    best: dict[int, tuple[dict[str, Any], float]] = {}
    for rep in range(s["scale_reps"]):  # alternating, best of each: the machine's load drifts between runs
        for actors in (1, 2):
            summary, wall = c.restyle(inputs, str(tmp / f"scale_{actors}_{rep}"), models[:1], s["t0"], steps, steps, b,
                                      actors=actors)
            if actors not in best or wall < best[actors][1]:
                best[actors] = (summary, wall)
    for actors in (1, 2):
        summary, wall = best[actors]
        inside = c.inside_seconds(summary)
        calls = len([r for r in summary["shards"] if not r.get("skipped")])
        e2e[actors], steady[actors] = summary["n_images"] / wall, _window_ips(summary)
        rows.append({"actors": actors, "cpus_per_actor": 0.5, "torch_threads_per_actor": 1, "batch": b,
                     "images": summary["n_images"], "shard_calls": calls, "wall_s": round(wall, 3),
                     "inside_s": round(inside, 3), "images_per_s": round(e2e[actors], 3),
                     "steady_images_per_s": round(steady[actors], 3), "job_startup_s": round(startup, 3),
                     "overhead_per_call_s": round((wall - startup - inside) / calls, 3) if actors == 1 else "",
                     "overhead_share": round(1 - inside / (wall * actors), 3)})
    unet_ceiling = max(machine_scaling(s["ceiling_forwards"]) for _ in range(s["scale_reps"]))
    ceiling = max(restyle_scaling(inputs, tmp, models[:1], steps, b, s["ceiling_shards"]) for _ in range(s["scale_reps"]))
    ratio_e2e, ratio_steady = e2e[2] / e2e[1], steady[2] / steady[1]
    blank = {k: "" for k in rows[0]}
    rows.append({**blank, "actors": "2/1", "batch": b, "images_per_s": round(ratio_e2e, 3),
                 "steady_images_per_s": round(ratio_steady, 3)})
    rows.append({**blank, "actors": "2/1 machine ceiling: the same restyle in 2 plain processes, no Ray",
                 "torch_threads_per_actor": 1, "batch": b, "images_per_s": round(ceiling, 3),
                 "steady_images_per_s": round(ceiling, 3)})
    rows.append({**blank, "actors": "2/1 machine ceiling: toy-UNet forwards in 2 plain processes",
                 "torch_threads_per_actor": 1, "batch": 32, "images_per_s": round(unet_ceiling, 3),
                 "steady_images_per_s": round(unet_ceiling, 3)})
    rows.append({**blank, "actors": "share of the (restyle) ceiling", "images_per_s": round(ratio_e2e / ceiling, 3),
                 "steady_images_per_s": round(ratio_steady / ceiling, 3)})
    return rows, {"two_actors_over_one": ratio_e2e, "two_actors_over_one_steady": ratio_steady,
                  "two_processes_over_one_no_ray": ceiling, "two_unet_loops_over_one": unet_ceiling, "share_of_ceiling_end_to_end": ratio_e2e / ceiling,
                  "share_of_ceiling_steady": ratio_steady / ceiling, "job_startup_s": startup,
                  "ray_overhead_per_call_s_1actor": float(rows[0]["overhead_per_call_s"])}


def unet_loop_seconds(n_forwards: int, batch: int = 32) -> float:
    """Seconds for ``n_forwards`` toy-UNet forwards at ``batch``, 1 torch thread, in this process."""
    from dclip_ray.models import load_unet

    torch.set_num_threads(1)
    unet = load_unet(c.TOY_MODEL).eval()
    x, t = torch.randn(batch, 3, 32, 32), torch.full((batch,), 500, dtype=torch.long)
    with torch.no_grad():
        unet(x, t)
        start = time.perf_counter()
        for _ in range(n_forwards):
            unet(x, t)
    return time.perf_counter() - start


def _spawn(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "benchmarks.restyle_bench", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, cwd=str(Path(__file__).resolve().parents[1]))


def _seconds(p: subprocess.Popen) -> float:
    out, _ = p.communicate()
    return float(out.strip().splitlines()[-1])


def machine_scaling(n_forwards: int) -> float:
    """The machine's own ceiling for item 5, without Ray: throughput of two 1-thread processes running
    the toy UNet at once over one process alone (2.0 on two free cores)."""
    alone = _seconds(_spawn(str(n_forwards)))
    pair = [_spawn(str(n_forwards)), _spawn(str(n_forwards))]
    return 2 * alone / max(_seconds(p) for p in pair)


def plain_restyle_seconds(inputs: str, out: str, models: list[str], shards: list[str], steps: int, batch: int,
                          t0: int = T0) -> float:
    """Seconds for this process (1 torch thread, no Ray) to restyle ``shards`` of ``inputs`` with the
    restyler the actors run (models loaded before the clock starts)."""
    from dclip_ray.stages.inputs import input_shards
    from dclip_ray.stages.restyle import ShardRestyler
    from dclip_ray.stages.restyle_config import build_restyle_config

    torch.set_num_threads(1)
    cfg = build_restyle_config(out, models=models, t0=t0, n_inv_steps=steps, n_gen_steps=steps, batch_size=batch)
    restyler = ShardRestyler(cfg)
    paths = dict(input_shards(inputs))
    start = time.perf_counter()
    for name in shards:
        restyler.run(name, paths[name])
    return time.perf_counter() - start


def restyle_scaling(inputs: str, tmp: Path, models: list[str], steps: int, batch: int, n_shards: int) -> float:
    """The machine's ceiling for the restyle work itself, without Ray: two plain 1-thread processes each
    restyling ``n_shards`` shards at once, over one process restyling ``n_shards`` alone."""
    from dclip_ray.stages.inputs import input_shards

    names = [n for n, _ in input_shards(inputs)]
    first, second = ",".join(names[:n_shards]), ",".join(names[n_shards:2 * n_shards])
    common = [inputs, ",".join(models), str(steps), str(batch)]
    alone = _seconds(_spawn("restyle", str(tmp / "ceil_alone"), first, *common))
    pair = [_spawn("restyle", str(tmp / "ceil_a"), first, *common), _spawn("restyle", str(tmp / "ceil_b"), second, *common)]
    return 2 * alone / max(_seconds(p) for p in pair)


def run(out_dir: Path, quick: bool = False) -> dict[str, Any]:
    """Items 1, 2, 5 of issue 10 (see the module docstring). Returns ``{"settings", "tables", "ratios"}``."""
    s = settings(quick)
    with tempfile.TemporaryDirectory(prefix="bench-restyle-") as d:
        tmp = Path(d)
        inputs = c.toy_shards(tmp, s["n_images"], s["shard_size"])
        models = c.finetuned_copies(tmp, 1, s["t0"])
        c.ray_session(2)
        try:
            tp_rows, r1 = _throughput(tmp, inputs, s, models)
            count_rows, r2 = _counts(tmp, s)
            cache_rows, r3 = _cache(tmp, inputs, s)
            scale_rows, r5 = _scaling(tmp, s, models)
        finally:
            c.ray_stop()
    settings_out = {**s, "machine": c.machine(), "model": "toy_shapes (bundled toy UNet, 1.1 M params, 32x32); "
                    "fine-tuned models = copies of its weights", "n_inv_steps": s["steps"], "n_gen_steps": s["steps"],
                    "ray": "embedded, num_cpus=2; actors 0.5 CPU / 1 torch thread each"}
    return {"settings": settings_out,
            "tables": {"throughput (item 1)": tp_rows, "UNet evaluations per image (item 2)": count_rows,
                       "latent cache, K models (item 2)": cache_rows, "actors 2 vs 1 (item 5)": scale_rows},
            "ratios": {**r1, **r2, **r3, **r5}}


if __name__ == "__main__":
    if sys.argv[1] == "restyle":  # restyle OUT SHARDS INPUTS MODELS STEPS BATCH (restyle_scaling)
        out, names, inputs, models, steps, batch = sys.argv[2:8]
        print(plain_restyle_seconds(inputs, out, models.split(","), names.split(","), int(steps), int(batch)))
    else:
        print(unet_loop_seconds(int(sys.argv[1])))

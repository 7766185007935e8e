"""Bookkeeping at scale (issue 28 item 3): the driver's time and peak memory, at 1,000, 5,000 and 20,000
small input shards already restyled, of

- ``restyle`` (everything committed: the run's planning, no Ray started): listing, planning prints
  (a local tar's size and time; no input byte read), reading the commit markers in threads, the summary;
- ``dry run`` (``restyle --dry-run``): also reads every input shard's keys to count the images;
- ``verify``: every input and output tar read and hashed, in the driver (not yet Ray tasks).

The outputs are one real restyle of a 1-image shard (the toy model, 2 steps), replicated under every
shard name with its own manifest and commit marker (the marker records its input's size and time), so
building 20,000 committed shards takes seconds, not hours. Each measurement runs in a fresh process:
wall seconds and peak RSS (``VmHWM``) of that process; per shard = total / shards.
``python -m benchmarks.bookkeeping_bench --out DIR [--sizes 1000 5000 20000] [--s3]``: with ``--s3`` the
inputs and outputs are uploaded to a moto S3 server on 127.0.0.1 (the model stays local), where a plan
print is the object's ETag and markers are read in threads.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from . import _common as c

SIZES = (1000, 5000, 20000)
T0 = 300


def renamed_tar(src: Path, dst: Path, old: str, new: str) -> bytes:
    """Copy tar ``src`` to ``dst`` with every member's key ``old`` renamed ``new`` (same length); returns
    the bytes written."""
    import io
    import tarfile

    buf = io.BytesIO()
    with tarfile.open(src) as tin, tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tout:
        for m in tin.getmembers():
            data = tin.extractfile(m).read()  # type: ignore[union-attr]
            info = tarfile.TarInfo(m.name.replace(old, new, 1))
            info.size, info.mtime, info.mode = len(data), m.mtime, m.mode
            tout.addfile(info, io.BytesIO(data))
    dst.write_bytes(buf.getvalue())
    return buf.getvalue()


def build(root: Path, n: int) -> tuple[str, str, str]:
    """``(input folder, output root, model)``: ``n`` committed 1-image shards, each its own key."""
    import hashlib
    import tarfile

    import pyarrow as pa
    import pyarrow.parquet as pq

    from dclip_ray.io.sources import shard_stat
    from dclip_ray.stages.restyle import ShardRestyler
    from dclip_ray.stages.restyle_config import build_restyle_config, write_declaration

    model = c.finetuned_copies(root, 1, T0)[0]
    one = Path(c.toy_shards(root, 1, 1))
    data, out = root / f"data{n}", root / f"out{n}"
    data.mkdir()
    template = next(one.glob("*.tar"))
    with tarfile.open(template) as t:
        key0 = t.getnames()[0].split(".", 1)[0]
    names = [f"{i:06d}" for i in range(n)]
    keys = [f"{i:0{len(key0)}d}" for i in range(n)]  # the template key's length: the tars keep their sizes
    renamed_tar(template, data / f"{names[0]}.tar", key0, keys[0])
    cfg = build_restyle_config(str(out), models=[model], n_inv_steps=2, n_gen_steps=2, batch_size=1)
    write_declaration(cfg, str(data))
    ShardRestyler(cfg).run(names[0], str(data / f"{names[0]}.tar"))
    folder = Path(cfg.variants[0].out)
    marker = json.loads((folder / f"{names[0]}_stats.json").read_text())
    table = pq.read_table(folder / f"{names[0]}.parquet")
    for name, key in zip(names[1:], keys[1:], strict=True):
        src = data / f"{name}.tar"
        source = renamed_tar(data / f"{names[0]}.tar", src, keys[0], key)
        tar = renamed_tar(folder / f"{names[0]}.tar", folder / f"{name}.tar", keys[0], key)
        t = table.set_column(table.schema.get_field_index("shard"), "shard", pa.array([name] * table.num_rows))
        t = t.set_column(t.schema.get_field_index("key"), "key", pa.array([key] * t.num_rows))
        pq.write_table(t, folder / f"{name}.parquet")
        (folder / f"{name}_stats.json").write_text(json.dumps(
            {**marker, "shard": name, "source": str(src), "source_stat": shard_stat(str(src)),
             "source_fingerprint": f"sha256:{hashlib.sha256(source).hexdigest()}",
             "tar_bytes": len(tar), "tar_sha256": hashlib.sha256(tar).hexdigest()}))
    return str(data), str(out), model


def to_s3(data: str, out: str, conf: dict[str, Any], bucket: str) -> tuple[str, str]:
    """Upload the built input and output folders; each marker then names its input's S3 URL and ETag
    print. Returns the S3 URLs of both folders."""
    import s3fs

    from dclip_ray.io.sources import shard_fingerprint

    fs = s3fs.S3FileSystem(**conf)
    name = Path(data).name
    s3_data, s3_out = f"s3://{bucket}/{name}", f"s3://{bucket}/{name}-out"
    fs.put(data + "/", s3_data + "/", recursive=True)
    for path in sorted(Path(out).rglob("*_stats.json")):
        marker = json.loads(path.read_text())
        src = f"{s3_data}/{marker['shard']}.tar"
        path.write_text(json.dumps({**marker, "source": src, "source_stat": None, "source_fingerprint": shard_fingerprint(src)}))
    fs.put(out + "/", s3_out + "/", recursive=True)
    return s3_data, s3_out


def moto_s3() -> tuple[Any, dict[str, Any]]:
    """A moto S3 server on a free loopback port with bucket ``bench``: ``(server, s3fs options)``."""
    import socket

    import boto3
    from moto.server import ThreadedMotoServer

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="k", aws_secret_access_key="s",
                 region_name="us-east-1").create_bucket(Bucket="bench")
    return server, {"endpoint_url": endpoint, "key": "k", "secret": "s", "client_kwargs": {"region_name": "us-east-1"}}


def measure(what: str, data: str, out: str, model: str) -> dict[str, Any]:
    """In this process: run ``what`` (restyle | dry-run | verify) over everything committed."""
    from dclip_ray.pipeline.restyle import RestyleJob, plan, run_restyle
    from dclip_ray.stages.restyle_config import build_restyle_config
    from dclip_ray.stages.verify import verify

    start = time.perf_counter()
    if what == "verify":
        report = verify(out, data)
        assert report.ok, report.problems[:3]
    else:
        cfg = build_restyle_config(out, models=[model], n_inv_steps=2, n_gen_steps=2, batch_size=1)
        job = RestyleJob(cfg, data, actors=1)
        if what == "restyle":
            s = run_restyle(job, progress=False)
            assert s["n_skipped"] == len(s["shards"]), "everything was committed"
        else:
            p = plan(job)
            assert not any(not r["committed"] for r in p["shards"])
    return {"seconds": time.perf_counter() - start, "peak_rss_mib": peak_rss_mib()}


def peak_rss_mib() -> float:
    """This process's peak resident memory (``VmHWM``: unlike ``ru_maxrss`` it starts afresh at exec)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024


def run(out_dir: Path, quick: bool = False, sizes: tuple[int, ...] | None = None, s3: bool = False) -> dict[str, Any]:
    """Every measurement at every size, each in a fresh process. ``ratios``: per run, the driver's time
    per shard at the largest size over the smallest, after the fixed start-up (imports, the model's hash)
    measured as the intercept of the line through the smallest and largest sizes (1: no growth)."""
    sizes = sizes or ((20, 60) if quick else SIZES)
    rows = []
    server, env = None, dict(os.environ)
    if s3:
        server, conf = moto_s3()
        env["FSSPEC_S3"] = json.dumps(conf)  # the measuring processes' s3fs reads it at import
        import fsspec

        fsspec.config.conf["s3"] = conf  # and this one's (the ETag prints of the uploaded inputs)
    with tempfile.TemporaryDirectory(prefix="bench-books-") as d:
        for n in sizes:
            root = Path(d) / str(n)
            root.mkdir()
            t = time.perf_counter()
            data, out, model = build(root, n)
            if s3:
                data, out = to_s3(data, out, conf, "bench")
            built = time.perf_counter() - t
            for what in ("restyle", "dry-run", "verify"):
                res = subprocess.run([sys.executable, "-m", "benchmarks.bookkeeping_bench", "--measure", what,
                                      data, out, model], capture_output=True, text=True, env=env,
                                     cwd=Path(__file__).parents[1])
                if res.returncode != 0:
                    raise RuntimeError(f"{what} at {n} shards: {res.stderr[-800:]}")
                m = json.loads(res.stdout.strip().splitlines()[-1])
                rows.append({"shards": n, "run": what, "driver_s": round(m["seconds"], 2),
                             "ms_per_shard": round(1000 * m["seconds"] / n, 3), "peak_rss_mib": round(m["peak_rss_mib"]),
                             "build_s": round(built, 1)})
                print(json.dumps(rows[-1]), flush=True)
            shutil.rmtree(root, ignore_errors=True)
    if server is not None:
        server.stop()
    ratios = {}
    lo, hi = min(sizes), max(sizes)
    for what in ("restyle", "dry-run", "verify"):
        t = {r["shards"]: r["driver_s"] for r in rows if r["run"] == what}
        slope = (t[hi] - t[lo]) / (hi - lo)  # seconds per shard between the sizes
        fixed = t[lo] - slope * lo
        ratios[f"{what}_ms_per_shard"] = 1000 * slope
        ratios[f"{what}_fixed_s"] = fixed
        ratios[f"{what}_rss_growth_mib_per_1000"] = 1000 * (
            next(r["peak_rss_mib"] for r in rows if r["run"] == what and r["shards"] == hi)
            - next(r["peak_rss_mib"] for r in rows if r["run"] == what and r["shards"] == lo)) / (hi - lo)
    (out_dir / f"bookkeeping{'_s3' if s3 else ''}.json").write_text(json.dumps(rows, indent=1))
    return {"settings": {"machine": c.machine(), "storage": "moto S3 on 127.0.0.1" if s3 else "local disk",
                         "sizes": list(sizes)},
            "tables": {"driver bookkeeping over committed shards (issue 28 item 3)": rows}, "ratios": ratios}


def main(argv: list[str] | None = None) -> int:
    """``--measure WHAT DATA OUT MODEL`` (one measurement, JSON on stdout) or the whole suite."""
    ap = argparse.ArgumentParser(prog="python -m benchmarks.bookkeeping_bench")
    ap.add_argument("--measure", nargs=4, metavar=("WHAT", "DATA", "OUT", "MODEL"))
    ap.add_argument("--out", default="bench-out")
    ap.add_argument("--sizes", type=int, nargs="+", default=list(SIZES))
    ap.add_argument("--s3", action="store_true", help="inputs and outputs on a moto S3 server on 127.0.0.1")
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.measure:
        print(json.dumps(measure(*args.measure)))
        return 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(json.dumps(run(out, sizes=tuple(args.sizes), s3=args.s3), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

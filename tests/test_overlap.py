"""Issue 28 item 2: a restyle actor decodes ahead and writes behind its UNet work (dclip_ray/stages/overlap.py),
bounded, in order, and with outputs byte-identical to doing each step in turn."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from pipeline_fixtures import make_inputs, tiny_models

from dclip_ray.io.manifest import read_manifest
from dclip_ray.stages import restyle as restyle_module
from dclip_ray.stages.inputs import input_shards
from dclip_ray.stages.overlap import Lane, prefetched
from dclip_ray.stages.restyle import ShardRestyler
from dclip_ray.stages.restyle_config import build_restyle_config

T0 = 200


def test_a_lane_runs_calls_in_order_and_blocks_beyond_its_depth():
    gate, seen = threading.Event(), []
    with Lane(2) as lane:
        lane.submit(gate.wait)  # the thread holds this one
        lane.submit(seen.append, 1)
        lane.submit(seen.append, 2)  # two wait: the lane is full
        blocked = threading.Thread(target=lane.submit, args=(seen.append, 3))
        blocked.start()
        blocked.join(0.3)
        assert blocked.is_alive(), "a third waiting call blocks its submitter (back-pressure)"
        gate.set()
        blocked.join(5)
        lane.join()
        assert seen == [1, 2, 3]


def test_a_lane_raises_the_first_error_once_and_drops_the_calls_after_it():
    seen = []

    def boom():
        raise ValueError("disk full")

    lane = Lane(4)
    lane.submit(boom)
    lane.submit(seen.append, "after")
    with pytest.raises(ValueError, match="disk full"):
        lane.join()
    assert seen == []
    with pytest.raises(RuntimeError, match="stopped"):
        lane.submit(seen.append, "later")
    lane.close()
    at_once = Lane(0)  # depth 0: in the caller's thread, errors at once
    with pytest.raises(ValueError):
        at_once.submit(boom)


def test_prefetch_keeps_order_stays_bounded_and_raises_where_the_producer_failed():
    made = []

    def items(n, fail_at=None):
        for i in range(n):
            if i == fail_at:
                raise OSError(f"unreadable at {i}")
            made.append(i)
            yield i

    got = []
    for i in prefetched(items(50), 3):
        got.append(i)
        time.sleep(0.002)
        assert len(made) <= len(got) + 3 + 1, "never more than depth items ahead (plus the one being put)"
    assert got == list(range(50))
    with pytest.raises(OSError, match="unreadable at 5"):
        got = [i for i in prefetched(items(9, fail_at=5), 2)]
    closed = []

    def endless():
        try:
            i = 0
            while True:
                yield i
                i += 1
        finally:
            closed.append(True)

    it = prefetched(endless(), 2)
    assert [next(it) for _ in range(4)] == [0, 1, 2, 3]
    it.close()
    assert closed == [True], "closing the consumer stops and closes the producer"
    assert list(prefetched(iter([1, 2]), 0)) == [1, 2]


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and "lease" not in p.name}


def recording(fn, threads: set):
    """``fn`` noting the name of each thread that runs it (for a generator: that draws its items)."""
    def wrapped(*args, **kwargs):
        out = fn(*args, **kwargs)
        if hasattr(out, "__next__"):
            return (threads.add(threading.current_thread().name) or item for item in out)
        threads.add(threading.current_thread().name)
        return out

    return wrapped


def test_an_overlapped_restyle_writes_the_same_bytes_as_one_step_after_another(tmp_path, monkeypatch):
    """Bad images, scored edits rejected under --min-score and kept ones, several batches per shard:
    every output file of the overlapped actor equals the sequential one's, byte for byte."""
    models = tiny_models(tmp_path / "m", T0)
    card = Path(models["ft"], "dclip.json")
    card.write_text(card.read_text()[:-1] + ', "source": "red circle", "target": "blue circle"}')
    data, _ = make_inputs(tmp_path, n=20, shard_size=10)
    outs, median = {}, None
    for depth in (None, 0, 2):  # None: a first run that finds the median score (half rejected, half kept)
        out = str(tmp_path / f"out{depth}")
        cfg = build_restyle_config(out, models=[models["ft"]], n_inv_steps=2, n_gen_steps=2, batch_size=3,
                                   score_clip="toy_clip", min_score=median)
        if depth is None:
            results = [ShardRestyler(cfg).run(n, p) for n, p in input_shards(data)]
            scores = sorted(r.scores["score"] for m in Path(out, "ft").glob("*.parquet") for r in read_manifest(str(m))
                            if r.status == "ok")
            median = scores[len(scores) // 2]
            continue
        cfg.io_depth = depth
        r = ShardRestyler(cfg)
        decoded_in, stored_in = set(), set()
        monkeypatch.setattr(restyle_module, "decode_shard", recording(restyle_module.decode_shard, decoded_in))
        r._store = recording(r._store, stored_in)
        seen = []
        r.on_batch = seen.append
        results = [r.run(n, p) for n, p in input_shards(data)]
        assert sum(seen) == sum(x.n_ok + x.n_rejected for x in results)
        if depth:  # the threads did all the reading and writing
            assert decoded_in == {"dclip-prefetch"} and {n.split("-")[0] for n in stored_in} == {"write"}
        else:
            assert decoded_in == stored_in == {"MainThread"}
        outs[depth] = (results, _tree(Path(out)))
    (serial, a), (overlapped, b) = outs[0], outs[2]
    assert a == b and len(a) >= 9
    assert [(x.n_ok, x.n_error, x.n_rejected) for x in serial] == [(x.n_ok, x.n_error, x.n_rejected) for x in overlapped]
    assert sum(x.n_error for x in serial) == 4 and sum(x.n_ok + x.n_rejected for x in serial) == 22
    assert sum(x.n_rejected for x in serial) == 11, "half the edits are under the median score"


def test_a_write_that_fails_fails_the_shard_and_commits_nothing(tmp_path, monkeypatch):
    from dclip_ray.io.shards import ShardWriter, list_markers

    models = tiny_models(tmp_path / "m", T0)
    data, _ = make_inputs(tmp_path, n=8, shard_size=8)
    out = str(tmp_path / "out")
    cfg = build_restyle_config(out, models=[models["ft"]], n_inv_steps=2, n_gen_steps=2, batch_size=2)
    calls = []

    def full_disk(self, *a, **k):
        calls.append(threading.current_thread().name)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ShardWriter, "write", full_disk)
    shard, path = input_shards(data)[0]
    with pytest.raises(OSError, match="No space left"):
        ShardRestyler(cfg).run(shard, path)
    assert calls == [f"write-{shard}"], "written in the lane; the calls after the failed one never run"
    assert list_markers(f"{out}/ft") == []
    assert not [t for t in threading.enumerate() if t.name.startswith(("write-", "dclip-prefetch"))], "threads stopped"

"""Which images an edit is meant for (issue 19): captions first, zero-shot CLIP for uncaptioned samples;
each prompt of a mixed dataset gets training images of its own source, judged by the toy world's labels
(not by the CLIP that chose them)."""

from __future__ import annotations

import json
import tarfile
from types import SimpleNamespace

import pytest
import torch

from dclip_ray.cli import main
from dclip_ray.models.clip import load_clip
from dclip_ray.stages.selection import (
    SourceMatcher,
    candidates,
    caption_matches,
    caption_of,
    select_training_sets,
    words,
)
from dclip_ray.toyworld.data import write_shards
from dclip_ray.toyworld.render import sample_dataset

MIX = [("red", "circle"), ("green", "triangle"), ("blue", "square"), ("yellow", "circle"), ("red", "square")]


def test_words_and_caption_rules():
    assert words("A Red Circles.") == {"red", "circle"}
    assert words("the glass") == {"glass"}
    assert caption_matches("a small red circle", "red circle")
    assert caption_matches("a red circle", "circle")
    assert not caption_matches("a blue circle", "red circle")
    assert not caption_matches("a red circle", "")
    assert caption_of({"txt": b" a red circle \n"}) == "a red circle"
    assert caption_of({"json": json.dumps({"caption": "a dog"}).encode()}) == "a dog"
    assert caption_of({"txt": b"", "json": b"not json"}) is None
    assert caption_of({"json": json.dumps([1, 2]).encode()}) is None


def test_a_source_competes_with_unrelated_texts_and_owns_its_subclasses():
    pos, neg = candidates("circle", ["red circle", "blue square", "circle"], neutral=("thing",))
    assert pos == ["circle", "red circle"] and neg == ["blue square", "thing"]
    pos, neg = candidates("red circle", ["circle", "red", "blue circle"], neutral=())
    assert pos == ["red circle"] and neg == ["blue circle"], "'red' and 'circle' say nothing either way"


def items_of(samples):
    x = torch.stack([torch.from_numpy(s.image).permute(2, 0, 1).float() / 127.5 - 1 for s in samples])
    return [SimpleNamespace(x=x[i], rec=SimpleNamespace(extras={}, key=s.key)) for i, s in enumerate(samples)]


@pytest.fixture(scope="module")
def toy_clip():
    return load_clip("toy_clip")


@pytest.mark.parametrize("seed", [7, 8])
@pytest.mark.parametrize("sources", [("red circle", "green triangle", "blue square"), ("red circle",), ("circle",)])
def test_zero_shot_matching_on_uncaptioned_toy_images(toy_clip, seed, sources):
    """Precision 1 on the sources of a mixed run (a wrong training image is what collapsed the models);
    recall high enough that a scan finds n_train images early."""
    samples = sample_dataset(120, seed=seed)
    verdicts = SourceMatcher(list(sources), toy_clip, others=["blue circle"]).verdicts(items_of(samples))
    for s in sources:
        truth = [set(s.split()) <= {d.colour, d.shape} for d in samples]
        pred = [v[s].match for v in verdicts]
        tp = sum(t and p for t, p in zip(truth, pred, strict=True))
        fp = sum(p and not t for t, p in zip(truth, pred, strict=True))
        assert fp == 0, (s, fp)
        assert tp >= 0.6 * sum(truth), (s, tp, sum(truth))
        assert all(v[s].by == "clip" and 0 <= v[s].confidence <= 1 for v in verdicts)


@pytest.mark.parametrize("captions", [True, False], ids=["captions", "zero-shot"])
def test_each_prompt_gets_its_own_source_from_a_mixed_dataset(tmp_path, toy_clip, captions):
    urls = write_shards(str(tmp_path / "mix"), 100, seed=3, shard_size=25, kinds=MIX, captions=captions)
    labels = {}
    for u in urls:
        with tarfile.open(u) as tf:
            for m in tf.getmembers():
                if m.name.endswith(".json"):
                    meta = json.loads(tf.extractfile(m).read())
                    labels[m.name[: -len(".json")]] = (meta["colour"], meta["shape"])
    prompts = [("blue", "red circle", 12), ("sq", "green triangle", 12), ("shape", "circle", 20)]
    matcher = SourceMatcher([p[1] for p in prompts], toy_clip, others=["blue circle", "green square", "square"])
    sets = select_training_sets(prompts, urls, 32, "center-crop", matcher, batch_size=16)
    for name, source, n in prompts:
        ts = sets[name]
        assert len(ts.keys) == n, (name, ts.summary())
        assert all(set(source.split()) <= set(labels[k]) for k in ts.keys), (name, [labels[k] for k in ts.keys])
        assert set(ts.by) == ({"caption"} if captions else {"clip"})
    assert sets["blue"].scanned < 100, "the scan stops once every prompt has its images"


def test_finetune_many_refuses_a_source_the_data_does_not_hold(tmp_path, capsys):
    write_shards(str(tmp_path / "data"), 20, seed=1, shard_size=10, kinds=[("red", "circle"), ("blue", "square")])
    prompts = tmp_path / "p.txt"
    prompts.write_text("red circle -> blue circle name=ok n_train=4\nyellow triangle -> red triangle name=none n_train=4\n")
    rc = main(["finetune-many", str(prompts), "--model", "toy_shapes", "--images", str(tmp_path / "data"),
               "--out", str(tmp_path / "models")])
    err = capsys.readouterr().err
    assert rc == 1 and err.count("\n") == 1, err
    assert "prompt none: 0 of 20 images match its source 'yellow triangle'" in err and "images=" in err
    assert not (tmp_path / "models").exists()


def test_allow_fewer_trains_on_what_matched_with_a_warning(tmp_path):
    from dclip_ray.config import TrainingSets
    from dclip_ray.models.cache import cached_base
    from dclip_ray.prompts import parse_prompt_text
    from dclip_ray.stages.finetune_many import FinetuneManyJob, choose_training_sets, finetune_config

    write_shards(str(tmp_path / "data"), 24, seed=1, shard_size=12, kinds=[("red", "circle"), ("blue", "square")])
    specs = parse_prompt_text(f"red circle -> blue circle name=a n_train=20\nblue square -> red square name=b "
                              f"n_train=4 images={tmp_path / 'data'}\n")
    base = cached_base("toy_shapes")
    for allow, raises in ((False, True), (True, False)):
        job = FinetuneManyJob(prompts="p", model="toy_shapes", out=str(tmp_path / "m"), images=str(tmp_path / "data"),
                              training_sets=TrainingSets(allow_fewer=allow))
        fcfgs = {s.name: finetune_config(s, job, base.preset) for s in specs}
        warnings: list[str] = []
        if raises:
            with pytest.raises(Exception, match="prompt a: 12 of 24 images match its source 'red circle'"):
                choose_training_sets(specs, fcfgs, job, base, None, warnings)
            continue
        sets = choose_training_sets(specs, fcfgs, job, base, None, warnings)
        assert len(sets["a"]["keys"]) == 12 and sets["a"]["by"] == {"caption": 12}
        assert warnings == ["prompt a: 12 of 24 images match its source 'red circle' (by caption); n_train=20; "
                            "training on those (--allow-fewer)"]
        assert sets["b"]["keys"] is None and sets["b"]["images"] == str(tmp_path / "data"), "images= takes its own"

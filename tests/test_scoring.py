"""A judge-free score on every edited image (issue 27): the score itself, its summary, the manifest
columns, and ``--min-score`` through `edit` and the Ray restyle on toy-world models that do and do not
edit (judged from pixels, never by the CLIP the score uses): rejected rows with their images beside the
output, exactly-once and ``verify`` intact, and a re-run with another threshold that generates nothing.
"""

from __future__ import annotations

import json
import math
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from pipeline_fixtures import tree
from test_search import batch

from dclip_ray.cli import main
from dclip_ray.io.images import load_image_tensor
from dclip_ray.io.manifest import read_manifest
from dclip_ray.models import get_preset, load_clip
from dclip_ray.scoring import N_LOWEST, ScoreStats, auroc, image_scores, merged, precision_recall_at, rows_of
from dclip_ray.search import edit_score
from dclip_ray.toyworld.data import write_shards
from dclip_ray.toyworld.judge import judge

STEPS = ["--n-inv", "20", "--n-gen", "20"]
MIN_SCORE = 0.4


# ---- the score and its summary (pure functions)

@pytest.fixture(scope="module")
def clip():
    return load_clip("toy_clip")


def test_per_image_scores_rank_each_image_and_average_to_the_search_score(clip):
    seeds = range(6)
    red = batch("red", "circle", seeds)
    edits = torch.cat([batch("blue", "circle", seeds[:3]), batch("green", "circle", seeds[3:])])
    s = image_scores(clip, red, edits, [("red circle", "blue circle")])
    assert set(s) == {"score", "direction", "structure", "background"} and all(v.shape == (6,) for v in s.values())
    assert float(s["score"][:3].min()) > float(s["score"][3:].max()) + 0.1, "each right edit above each wrong one"
    mean = edit_score(clip, red, edits, "red circle", "blue circle")
    assert mean["score"] == pytest.approx(float(s["score"].mean()), abs=1e-6)
    same = rows_of(image_scores(clip, red, red, [("red circle", "blue circle")]))
    assert all(r["score"] == pytest.approx(0.0, abs=1e-6) and r["structure"] == pytest.approx(1.0) for r in same)
    # a mix of two edits averages their directions
    both = image_scores(clip, red, edits, [("red circle", "blue circle"), ("red circle", "green circle")])
    one = [image_scores(clip, red, edits, [e])["direction"] for e in (("red circle", "blue circle"),
                                                                       ("red circle", "green circle"))]
    assert torch.allclose(both["direction"], (one[0] + one[1]) / 2, atol=1e-6)
    with pytest.raises(ValueError, match="at least one"):
        image_scores(clip, red, edits, [])


def test_rows_of_leaves_out_non_finite_values():
    rows = rows_of({"score": torch.tensor([0.5, float("nan")]), "direction": torch.tensor([0.25, 0.75])})
    assert rows == [{"score": 0.5, "direction": 0.25}, {"direction": 0.75}]


def test_score_stats_summarise_merge_and_round_trip():
    rng = np.random.default_rng(0)
    values = rng.uniform(-0.5, 0.9, 400).tolist()
    parts = [ScoreStats(), ScoreStats()]
    for i, v in enumerate(values):
        parts[i % 2].add(v, f"s{i % 2}", f"k{i}", rejected=v < 0)
    total = merged(ScoreStats.from_dict(json.loads(json.dumps(p.as_dict()))) for p in parts)
    s = total.summary()
    assert s["n"] == 400 and s["n_rejected"] == sum(v < 0 for v in values)
    assert s["mean"] == pytest.approx(np.mean(values), abs=1e-4) and s["min"] == pytest.approx(min(values), abs=1e-4)
    for q, name in ((0.1, "p10"), (0.5, "p50"), (0.9, "p90")):
        assert abs(s[name] - np.quantile(values, q)) <= 0.05, (name, s[name])
    lowest = sorted(values)[:N_LOWEST]
    assert [x["score"] for x in s["lowest"]] == pytest.approx(lowest, abs=1e-6)
    assert ScoreStats().summary()["mean"] is None and ScoreStats.from_dict(None).n == 0


def test_auroc_and_precision_recall_by_hand():
    assert auroc([0.9, 0.8, 0.1, 0.2], [True, True, False, False]) == 1.0
    assert auroc([0.1, 0.8, 0.9, 0.2], [True, True, False, False]) == 0.25
    assert math.isnan(auroc([0.1, 0.2], [True, True]))
    pr = precision_recall_at([0.9, 0.8, 0.3, 0.6], [True, False, False, True], 0.5)
    assert pr == {"precision": pytest.approx(2 / 3), "recall": 1.0, "kept": 0.75}


# ---- through edit and the Ray restyle, with a model that edits and one that does not

@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Toy inputs (16 red circles in 2 shards), a red -> blue model fine-tuned with the default recipe
    (8 images) and the base model itself carded as red -> blue (it edits nothing)."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("scoring")
    write_shards(str(root / "toy"), 16, seed=7, shard_size=8, colours=["red"], shapes=["circle"])
    rc = main(["finetune", "--model", "toy_shapes", "--source", "red circle", "--target", "blue circle", "--images",
               str(root / "toy"), "--out", str(root / "blue"), "--n-train", "8", "--quiet"])
    assert rc == 0
    none = root / "none"
    shutil.copytree(get_preset("toy_shapes").weights_path(), none)
    card = json.loads((root / "blue" / "dclip.json").read_text())
    (none / "dclip.json").write_text(json.dumps({k: card[k] for k in ("source", "target", "base_model", "clip",
                                                                      "clip_weights", "config")}))
    return root


def _random_face_weights(folder: Path) -> str:
    """facenet-pytorch's InceptionResnetV1 with random weights (seed 0), saved as its state dict."""
    from facenet_pytorch import InceptionResnetV1

    torch.manual_seed(0)
    path = folder / "face_random.pt"
    torch.save(InceptionResnetV1(classify=True, num_classes=7).eval().state_dict(), path)
    return str(path)


def _judged_blue(png: bytes) -> bool:
    return judge(load_image_tensor(png, 32)).colour == "blue"


def test_edit_writes_scores_and_min_score_rejects_the_model_that_does_not_edit(models, tmp_path, capsys):
    toy = str(models / "toy")
    rc = main(["edit", "--model", "toy_shapes", "--finetuned", str(models / "blue"), "--images", toy,
               "--out", str(tmp_path / "good"), *STEPS, "--min-score", str(MIN_SCORE), "--json"])
    good = json.loads(capsys.readouterr().out)
    face = _random_face_weights(tmp_path)
    rc_bad = main(["edit", "--model", "toy_shapes", "--finetuned", str(models / "none"), "--images", toy,
                   "--out", str(tmp_path / "bad"), *STEPS, "--min-score", str(MIN_SCORE), "--face-weights", face,
                   "--json"])
    bad = json.loads(capsys.readouterr().out)
    assert rc == rc_bad == 0, "a rejected edit is not an error"
    # Judged from pixels: the fine-tuned model's kept edits are blue; the other model edits nothing.
    kept = sorted((tmp_path / "good").glob("*.png"))
    assert good["n_edited"] + good["n_rejected"] == 16 and good["n_edited"] >= 12, good["scores"]
    assert sum(_judged_blue(p.read_bytes()) for p in kept) >= 0.9 * len(kept)
    assert bad["n_edited"] == 0 and bad["n_rejected"] == 16 and not list((tmp_path / "bad").glob("*.png"))
    assert bad["scores"]["p90"] < MIN_SCORE < good["scores"]["p50"], (bad["scores"], good["scores"])
    # Every row carries its scores; a rejected row names its score and keeps its image beside the output.
    state = tmp_path / ".bad.edit"
    rows = [r for s in ("00000", "00001") for r in read_manifest(str(state / f"{s}.parquet"))]
    assert {r.status for r in rows} == {"rejected"} and all(r.scores["score"] < MIN_SCORE for r in rows)
    assert all(set(r.scores) == {"score", "direction", "structure", "background", "identity"} for r in rows)
    assert all(r.scores["identity"] > 0.95 for r in rows), "an unedited image keeps its (random-network) identity"
    assert "< --min-score 0.4" in rows[0].error
    with tarfile.open(state / "rejected" / "00000.tar") as t:
        names = t.getnames()
        meta = json.loads(t.extractfile(f"{rows[0].key}.json").read())
    assert sorted(n for n in names if n.endswith(".png")) == sorted(f"{r.key}.png" for r in rows if r.shard == "00000")
    assert "rejected" in meta["dclip"] and meta["caption"] == meta["original_caption"], "no edit is claimed"
    with tarfile.open(state / "00000.tar") as t:
        assert not [n for n in t.getnames() if n.endswith(".png")], "never in the output"
    from dclip_ray.stages.verify import verify

    assert verify(str(state), toy).ok


def test_restyle_min_score_exactly_once_and_a_new_threshold_generates_nothing(models, tmp_path, capsys, ray_local):
    toy, out = str(models / "toy"), str(tmp_path / "out")
    args = ["restyle", "--input", toy, "--out", out, "--model", str(models / "blue"), "--model",
            str(models / "none"), *STEPS, "--batch-size", "8", "--json"]
    assert main([*args, "--min-score", str(MIN_SCORE)]) == 0
    first = json.loads(capsys.readouterr().out)
    assert first["n_errors"] == 0 and first["gen_evals"] > 0
    blue, none = first["scores"]["blue"], first["scores"]["none"]
    assert none["n"] == 16 and none["n_rejected"] == 16 and blue["n_rejected"] <= 4, first["scores"]
    assert first["n_rejected"] == 16 and len(none["lowest"]) == N_LOWEST
    from dclip_ray.evaluation.report import write_report

    page = Path(write_report(out, str(tmp_path / "report.html"))).read_text()
    assert "lowest-scored edits" in page and "16 rejected (scored under --min-score)" in page
    snapshot = tree(out)
    assert main(["verify", out, "--input", toy, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert sum(s["n_rejected"] for s in report["shards"]) == 16 + blue["n_rejected"]

    # Another threshold: the stored edits are re-sorted, nothing is generated, every key still once.
    assert main([*args, "--min-score", "-10"]) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["gen_evals"] == 0 and again["inv_evals"] == 0 and again["n_rethresholded"] == 2
    assert again["n_rejected"] == 0 and again["n_images"] == 16
    assert not list(Path(out, "none", "rejected").glob("*.tar"))
    assert main(["verify", out, "--input", toy]) == 0
    capsys.readouterr()
    # Back to the first threshold: byte for byte the first run's output; then nothing left to do.
    assert main([*args, "--min-score", str(MIN_SCORE)]) == 0
    back = json.loads(capsys.readouterr().out)
    assert back["gen_evals"] == 0 and back["n_rejected"] == 16
    assert tree(out) == snapshot
    assert main(args + ["--min-score", str(MIN_SCORE)]) == 0
    assert json.loads(capsys.readouterr().out)["n_skipped"] == 2


def test_a_routed_restyle_scores_with_the_routing_clip_when_it_is_the_same(models, tmp_path):
    from dclip_ray.stages.restyle import ShardRestyler
    from dclip_ray.stages.restyle_config import build_restyle_config

    cfg = build_restyle_config(str(tmp_path / "o"), models=[str(models / "blue")], route="source", n_inv_steps=4,
                               n_gen_steps=4)
    r = ShardRestyler(cfg)
    assert cfg.routes(cfg.variants[0]) and cfg.scores(cfg.variants[0])
    assert r.scorer() is r.matcher.clip and hasattr(r.scorer(), "encode_image")
    res = r.run("00000", str(models / "toy" / "00000.tar"))
    rows = read_manifest(str(tmp_path / "o" / "blue" / "00000.parquet"))
    assert res.n_ok == 8 and all("score" in row.scores for row in rows)


def test_the_check_passes_the_working_model_and_fails_the_one_that_edits_nothing(models, clip):
    """The check before a prompt is done (dclip_ray.quality), on the same two models: the default-recipe
    model (whose edits the pixel judge reads as blue above) passed on its 8 held-aside images; the model
    that edits nothing, measured the same way, fails toy_shapes' bar."""
    from dclip_ray.config import FinetuneConfig
    from dclip_ray.jobs import read_images
    from dclip_ray.models import eps_fn_of, load_unet
    from dclip_ray.models.base import load_base
    from dclip_ray.quality import check_model, judge

    card = json.loads((models / "blue" / "dclip.json").read_text())
    q = card["quality"]
    assert q["passed"] and q["measured"]["held_aside"] and q["measured"]["n_images"] == 8, q
    keys, x, _ = read_images(str(models / "toy"), 32, 16)
    assert not set(keys[8:]) & set(card["train_keys"]), "the check's images were not trained on"
    base = load_base("toy_shapes")
    cfg = FinetuneConfig(**card["config"])
    good = check_model(eps_fn_of(base.unet), eps_fn_of(load_unet(str(models / "blue"))), clip, x[8:], cfg,
                       base.schedule)
    assert good["score"] == pytest.approx(q["measured"]["score"], abs=1e-4), "the card's check is reproducible"
    none = check_model(eps_fn_of(base.unet), eps_fn_of(load_unet(str(models / "none"))), clip, x[8:], cfg,
                       base.schedule)
    v = judge(none, get_preset("toy_shapes").quality_bar, 0.3)
    assert not v.passed and "--min-quality" in v.reason and none["score"] < good["score"] - 0.3, (none, good)
    assert none["spread"] > 0.9, "an unedited model's outputs follow their inputs: not a collapse"

"""Edit presets and the prompt-file parser (dclip_ray.prompts) and `dclip-ray presets`."""

from __future__ import annotations

import json
import re

import pytest

from dclip_ray.cli import main
from dclip_ray.errors import ConfigError, InputFileError
from dclip_ray.prompts import (
    DOMAINS,
    EditSpec,
    get_edit_preset,
    list_edit_presets,
    parse_prompt_file,
    parse_prompt_text,
    safe_name,
)

# ---- presets --------------------------------------------------------------------------------------


def test_preset_table_size_and_domains():
    presets = list_edit_presets()
    official = [p for p in presets if p.origin in ("official", "checkpoint")]
    assert len(official) >= 55
    assert len(presets) == len({p.name for p in presets})
    counts = {d: len(list_edit_presets(d)) for d in DOMAINS}
    assert counts == {"face": 29, "dog": 11, "church": 10, "bedroom": 6, "imagenet": 4, "toy": 7}
    assert all(p.model for p in presets if p.domain != "imagenet")
    assert get_edit_preset("angry").model == "celeba_hq"
    assert get_edit_preset("dog_bear").model == "afhq_dog"
    assert get_edit_preset("toy_red_to_blue").model == "toy_shapes"


def test_grey_hair_is_fixed():
    p = get_edit_preset("grey_hair")
    assert (p.source, p.target) == ("person", "person with grey hair")
    # red hair stays its own preset and is the only one targeting red hair
    assert [q.name for q in list_edit_presets() if q.target == "person with red hair"] == ["red_hair"]


@pytest.mark.parametrize(
    "name, t0",
    [("pixar", 601), ("neanderthal", 601), ("gogh", 601), ("sketch", 601), ("male", 401), ("makeup", 301),
     ("no_makeup", 301), ("tanned", 201), ("dog_bear", 500), ("dog_hamster", 601), ("imagenet_cubism", 601),
     ("angry", 500), ("toy_red_to_blue", 500), ("toy_circle_to_square", 550)],
)
def test_recommended_t0(name, t0):
    assert get_edit_preset(name).t0 == t0


def test_official_pairs_and_weights():
    assert (get_edit_preset("angry").source, get_edit_preset("angry").target) == ("face", "angry face")
    assert get_edit_preset("neanderthal").source == "Human"
    assert get_edit_preset("pixar").target == "3D render in the style of Pixar"
    t = get_edit_preset("toy_circle_to_square")
    assert (t.source, t.target) == ("red circle", "red square")
    for p in list_edit_presets():  # the README recipe (our id weight 0) for real models; the toy's own
        if p.domain != "toy":
            assert p.recipe == "paper", p.name
        elif p.target.split()[1] == p.source.split()[1]:
            assert p.recipe == "colour", p.name
        else:  # a triangle has an up and a down: no up-down flips of the CLIP views
            assert p.recipe == ("shape-upright" if "triangle" in p.source + p.target else "shape"), p.name
        assert (p.official_id is not None) == (p.domain == "face"), p.name


def test_get_edit_preset_lookup_and_errors():
    assert get_edit_preset("Grey-Hair").name == "grey_hair"
    with pytest.raises(ConfigError, match=r"unknown edit preset 'pixr'; did you mean pixar\?"):
        get_edit_preset("pixr")
    with pytest.raises(ConfigError, match="unknown edit-preset domain 'cat'; use one of face, dog"):
        list_edit_presets("cat")


# ---- parser: good input -------------------------------------------------------------------------

GOOD = """\
# my edits
face -> angry face  t0=500 l1=1.0 id=0.0 name=angry

   # indented comment
photo -> sketch   # trailing comment
pixar
neanderthal t0=500 l1=0 name=nean epochs=3 lr=8e-6 n_inv=40 n_gen=6
person → Mark Zuckerberg   clip_weight=2.5
"""


def test_parse_good_lines():
    specs = parse_prompt_text(GOOD)
    assert [s.name for s in specs] == ["angry", "sketch", "pixar", "nean", "mark_zuckerberg"]
    assert [s.line for s in specs] == [2, 5, 6, 7, 8]
    a = specs[0]
    assert (a.source, a.target, a.t0, a.l1, a.id, a.clip_weight, a.preset) == ("face", "angry face", 500, 1.0, 0.0, None, None)
    s = specs[1]
    assert (s.source, s.target, s.t0, s.clip_weight, s.l1, s.id) == ("photo", "sketch", None, None, None, None)
    px = specs[2]  # bare preset: its pair; its t0 and recipe are applied when the config is resolved
    assert (px.source, px.target, px.t0, px.clip_weight, px.l1, px.id, px.preset) == (
        "Human", "3D render in the style of Pixar", None, None, None, None, "pixar")
    n = specs[3]  # preset with overrides
    assert (n.source, n.target, n.preset) == ("Human", "Neanderthal", "neanderthal")
    assert (n.t0, n.l1, n.clip_weight, n.epochs, n.lr, n.n_inv, n.n_gen) == (500, 0.0, None, 3, 8e-6, 40, 6)
    z = specs[4]  # unicode arrow, several words
    assert (z.source, z.target, z.clip_weight) == ("person", "Mark Zuckerberg", 2.5)


def test_resolve_fills_only_missing_fields():
    s = parse_prompt_text("face -> angry face t0=300")[0]
    r = s.resolve(t0=500, clip_weight=3.0, l1=0.0, id=0.0)
    assert (r.t0, r.clip_weight, r.l1, r.id) == (300, 3.0, 0.0, 0.0)
    with pytest.raises(ConfigError, match="unknown field"):
        s.resolve(bogus=1)
    assert isinstance(r, EditSpec)


def test_training_options_reach_the_finetune_config():
    from dclip_ray.stages.finetune_many import FinetuneManyJob, finetune_config

    text = ("red circle -> red square mode=full n_gen=10 lr=1e-4 clip_weight=5 l1=2 views=8 shift=4 noise=0.1 flip=hv\n"
            "red circle -> blue circle flip=none edge=5 l1=0.5 refine=2 refine_l1=1.5 refine_scales=3\n")
    sq, blue = parse_prompt_text(text)
    assert (sq.mode, sq.views, sq.shift, sq.noise, sq.flip) == ("full", 8, 4, 0.1, "hv")
    assert blue.flip == "" and blue.mode is None
    job = FinetuneManyJob(prompts="p.txt", model="toy_shapes", out="o",
                          settings={"aug_flip": "h", "aug_noise": 0.2, "lr": 2e-5})
    c = finetune_config(sq, job, None)
    assert (c.mode, c.n_gen_steps, c.lr, c.w_clip, c.w_l1, c.aug_views, c.aug_shift, c.aug_noise, c.aug_flip) == (
        "full", 10, 1e-4, 5.0, 2.0, 8, 4, 0.1, "hv")
    c = finetune_config(blue, job, None)  # the line's flip=none wins over the job's; the rest is the job's
    assert (c.mode, c.aug_flip, c.aug_noise, c.aug_views, c.lr) == ("efficient", "", 0.2, 4, 2e-5)
    assert (c.w_edge, c.w_l1, finetune_config(sq, job, None).w_edge) == (5.0, 0.5, 0.0)
    assert (c.edge_scales, c.refine_from, c.refine_l1, c.refine_edge_scales) == (1, 2, 1.5, 3)
    c = finetune_config(sq, job, None)
    assert (c.refine_from, c.refine_l1, c.refine_edge_scales) == (0, None, None)


def test_safe_name():
    assert safe_name("3D render in the style of Pixar") == "3d_render_in_the_style_of_pixar"
    assert safe_name("Café / Zürich!") == "cafe_zurich"
    assert safe_name("!!!", fallback="edit_3") == "edit_3"
    assert len(safe_name("x" * 200)) == 64
    s = parse_prompt_text("photo -> «»")[0]
    assert s.name == "edit_1"
    assert re.fullmatch(r"[a-z0-9_-]+", parse_prompt_text("a -> Self-Portrait by Frida Kahlo!")[0].name)


def test_crlf_and_bom():
    specs = parse_prompt_text("\ufeffface -> angry face\r\npixar\r\n")
    assert [s.name for s in specs] == ["angry_face", "pixar"]
    assert specs[0].target == "angry face"


# ---- parser: errors with line:col -----------------------------------------------------------------


@pytest.mark.parametrize(
    "text, where, what",
    [
        ("face angry face", "1:6", "missing '->'"),
        ("# c\n\nface -> angry t0=5000", "3:18", "bad value '5000' for t0; expected an integer 1..999"),
        ("face -> angry t0=abc", "1:18", "bad value 'abc' for t0"),
        ("face -> angry l1=-1", "1:18", "bad value '-1' for l1; expected a number >= 0"),
        ("face -> angry lr=0", "1:18", "bad value '0' for lr; expected a number > 0"),
        ("face -> angry clip_weight=nan", "1:27", "bad value 'nan' for clip_weight"),
        ("face -> angry epochs=0", "1:22", "bad value '0' for epochs"),
        ("face -> angry name=Angry!", "1:20", "bad value 'Angry!' for name"),
        ("face -> angry t0=", "1:18", "option 't0' has no value"),
        ("face -> angry t0=5 t0=6", "1:20", "option 't0' given twice"),
        ("face -> angry foo=1", "1:15", "unknown option 'foo'; use one of name, images, recipe, t0, n_inv, n_gen, mode, n_train, epochs, batch, lr, lr_gamma, clip_weight, l1, "
         "id, global, edge, edge_scales, edge_match, frame, layout, palette, refine, refine_l1, refine_scales, refine_layout, clip_form, views, shift, noise, blur, flip, adapter, rank, seed"),
        ("face -> angry mode=fast", "1:20", "bad value 'fast' for mode; expected one of efficient, full"),
        ("face -> angry flip=v", "1:20", "bad value 'v' for flip; expected one of none, h, hv"),
        ("face -> angry noise=-0.1", "1:21", "bad value '-0.1' for noise"),
        ("face -> angry t0=500 face", "1:22", "expected key=value, got 'face'"),
        ("face t0=5 -> angry", "1:6", "option 't0=5' before '->'"),
        ("pixr", "1:1", "unknown edit preset 'pixr'; did you mean pixar?"),
        ("  -> angry face", "1:3", "missing source text before '->'"),
        ("face ->   ", "1:8", "missing target text after '->'"),
        ("face -> t0=500", "1:9", "missing target text after '->'"),
        ("a -> b -> c", "1:8", "more than one '->'"),
        ("t0=500", "1:1", "option 't0=500' without an edit"),
        ("face -> Face", "1:9", "target 'Face' is the same as the source"),
        ("pixar foo", "1:7", "missing '->'"),
        ("pixar bogus=1", "1:7", "unknown option 'bogus'"),
    ],
)
def test_parse_errors_name_line_and_column(text, where, what):
    with pytest.raises(ConfigError) as ei:
        parse_prompt_text(text)
    msg = str(ei.value)
    assert msg.startswith(f"prompts.txt:{where}: "), msg
    assert what in msg, msg
    assert "; " in msg[len(f"prompts.txt:{where}: "):] and "\n" not in msg  # what; how to fix, one line


def test_duplicate_names_name_both_lines():
    with pytest.raises(ConfigError) as ei:
        parse_prompt_text("face -> angry face\n# x\nperson -> angry face")
    assert str(ei.value).startswith("prompts.txt:3:1: duplicate edit name 'angry_face' (line 1 has it too)")
    with pytest.raises(ConfigError) as ei:
        parse_prompt_text("pixar\nface -> angry face name=pixar")
    assert str(ei.value).startswith("prompts.txt:2:20: duplicate edit name 'pixar' (line 1 has it too)")
    # the same pair twice is fine once the names differ
    assert len(parse_prompt_text("pixar\npixar name=pixar2 t0=500")) == 2


def test_empty_file_is_an_error():
    with pytest.raises(ConfigError, match=r"^my\.txt:1:1: no edits"):
        parse_prompt_text("# only a comment\n\n", origin="my.txt")


# ---- files and URLs -----------------------------------------------------------------------------


def test_parse_prompt_file_path_url_and_string(tmp_path):
    f = tmp_path / "prompts.txt"
    f.write_text(GOOD, encoding="utf-8")
    by_path = parse_prompt_file(f)
    assert [s.name for s in by_path] == ["angry", "sketch", "pixar", "nean", "mark_zuckerberg"]
    assert parse_prompt_file(str(f)) == by_path
    assert parse_prompt_file(f"file://{f}") == by_path
    assert parse_prompt_file(GOOD) == parse_prompt_text(GOOD)  # a string holding lines is the text itself
    bad = tmp_path / "bad.txt"
    bad.write_text("pixar\nface -> x t0=0\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(bad))}:2:14: bad value '0' for t0"):
        parse_prompt_file(bad)


def test_parse_prompt_file_bad_inputs(tmp_path):
    with pytest.raises(InputFileError, match="not found; check the path"):
        parse_prompt_file(tmp_path / "missing.txt")
    with pytest.raises(InputFileError, match="is a folder"):
        parse_prompt_file(tmp_path)
    b = tmp_path / "latin1.txt"
    b.write_bytes("caf\xe9 -> x\n".encode("latin-1"))
    with pytest.raises(InputFileError, match=r"not UTF-8 text \(bad byte at offset 3\)"):
        parse_prompt_file(b)


# ---- CLI -----------------------------------------------------------------------------------------


def test_cli_presets_list_table(capsys):
    assert main(["presets", "list"]) == 0
    out = capsys.readouterr().out
    assert "grey_hair" in out and "person with grey hair" in out and "toy_red_to_blue" in out
    assert f"{len(list_edit_presets())} presets" in out


def test_cli_presets_list_json_domain(capsys):
    assert main(["presets", "list", "--domain", "dog", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) == 11 and {r["domain"] for r in rows} == {"dog"}
    bear = next(r for r in rows if r["name"] == "dog_bear")
    assert (bear["source"], bear["target"], bear["t0"]) == ("Dog", "Bear", 500)


def test_cli_presets_show(capsys):
    assert main(["presets", "show", "male", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert (d["name"], d["t0"], d["domain"], d["t0_from"]) == ("male", 401, "face", "checkpoint")
    assert d["recipe"] == "paper" and (d["settings"]["t0"], d["settings"]["lr"], d["settings"]["l1"]) == (401, 8e-6, 1.0)
    assert main(["presets", "show", "grey_hair"]) == 0
    out = capsys.readouterr().out
    assert "target:  person with grey hair" in out and "fixed" in out and "recipe:  paper" in out


def test_cli_presets_errors(capsys):
    assert main(["presets", "show", "pixr"]) == 1
    assert capsys.readouterr().err.strip() == "error: unknown edit preset 'pixr'; did you mean pixar? see `dclip-ray presets list`"
    assert main(["presets", "list", "--domain", "cat"]) == 1
    assert "error: unknown edit-preset domain 'cat'" in capsys.readouterr().err


def test_every_edit_preset_names_a_known_base_model_or_none():
    from dclip_ray.models import list_presets

    unets = set(list_presets("unet"))
    assert all(p.model in unets or p.model == "" for p in list_edit_presets())


def test_the_old_clip_key_still_works_with_a_one_line_warning():
    """Issue 29 item 6: ``clip=`` on a prompt line was the CLIP loss weight while ``--clip`` names a CLIP model;
    the key is ``clip_weight=`` now, and ``clip=`` still parses, with a warning that says what to write."""
    from dclip_ray.errors import DclipWarning

    with pytest.warns(DclipWarning, match=r"^prompts.txt:1: the prompt option 'clip=' is renamed 'clip_weight=' \(as --clip-weight\); write clip_weight=5$"):
        old = parse_prompt_text("face -> angry clip=5 l1=2")[0]
    assert old.settings() == parse_prompt_text("face -> angry clip_weight=5 l1=2")[0].settings() == {"w_clip": 5.0, "w_l1": 2.0}
    with pytest.raises(ConfigError, match="1:20: bad value 'nan' for clip_weight"), pytest.warns(DclipWarning):
        parse_prompt_text("face -> angry clip=nan")

"""The docs run (issue 21): every `dclip-ray` command of the README's command blocks and every example of
every command's `--help` is a valid command line (known options, valid values), checked in `make test`;
the README's toy-world blocks run end to end, in order, in a temporary folder, in `make test-slow`
(the fine-tunings take minutes). Lines that need a real checkpoint, a cluster or a report folder of
your own (celeba_hq.ckpt, --address, submit/status) are parsed but not run. The walk writes the prompt
file from the README's `cat > prompts.txt <<'EOF'` block, and its `eval` checks that the inputs an
edit was made from are still the ones it reads (make-data refuses to write over them)."""

from __future__ import annotations

import os
import re
import shlex
from pathlib import Path

import click
import pytest
import typer

from dclip_ray.cli import app, main

README = Path(__file__).resolve().parents[1] / "README.md"
NOT_RUNNABLE = ("celeba", "ViT-B-16", "--address", "submit ", "status ", "nightly-restyle", "faces/",
                "convert ", "/shared/")


def readme_blocks() -> list[tuple[str, str]]:
    """``(language, text)`` of every fenced block of the README."""
    return re.findall(r"^```(\w*)\n(.*?)^```", README.read_text(), flags=re.S | re.M)


def commands_in(text: str) -> list[str]:
    """The `dclip-ray` command lines of a shell block (backslash continuations joined, comments dropped)."""
    out = []
    for line in text.replace("\\\n", " ").splitlines():
        line = line.strip()
        if line.startswith("dclip-ray "):
            out.append(line)
    return out


def argv_of(line: str) -> list[str]:
    return shlex.split(line, comments=True)[1:]


UNCONTINUED: list[str] = []
"""Help example lines continued on the next line without a trailing backslash (found by :func:`help_examples`)."""


def help_examples() -> list[tuple[str, str]]:
    """``(command, example line)`` of every `dclip-ray` line in every command's epilog; lines starting with
    ``--`` continue the line above (which ends in a backslash, as a shell needs); a trailing ``   (remark)``
    is dropped."""
    root = typer.main.get_command(app)
    found = []

    def walk(cmd: click.Command, name: str) -> None:
        if hasattr(cmd, "commands"):  # a group (typer vendors its own click: no isinstance)
            for sub_name, sub in cmd.commands.items():
                walk(sub, f"{name} {sub_name}".strip())
            return
        lines: list[str] = []
        for raw in (cmd.epilog or "").replace("\b", "").splitlines():
            text = raw.strip()
            if text.startswith("--") and lines:
                if not lines[-1].endswith("\\"):
                    UNCONTINUED.append(f"{name}: {lines[-1]}")  # a shell would run the first line alone
                lines[-1] = lines[-1].removesuffix("\\").rstrip() + " " + text
            elif "dclip-ray " in text and (text.startswith("dclip-ray ") or ": dclip-ray " in text):
                lines.append(text[text.index("dclip-ray "):])
        found.extend((name, re.split(r"\s{2,}\(", ln)[0]) for ln in lines)

    walk(root, "")
    return found


def parses(argv: list[str]) -> None:
    """Resolve ``argv`` to its command and parse its options as click would (no callback runs)."""
    cmd: click.Command = typer.main.get_command(app)
    rest = list(argv)
    while hasattr(cmd, "commands"):
        name, rest = rest[0], rest[1:]
        assert name in cmd.commands, f"no command {name!r}"
        cmd = cmd.commands[name]
    if "--help" in rest:
        return
    cmd.make_context(cmd.name or "", rest)


README_COMMANDS = [c for lang, text in readme_blocks() if lang == "bash" for c in commands_in(text)]
HELP_EXAMPLES = help_examples()


def test_there_is_something_to_check():
    assert len(README_COMMANDS) >= 20 and len(HELP_EXAMPLES) >= 15
    own = {c for c, line in HELP_EXAMPLES if line.startswith(f"dclip-ray {c} ")}
    assert own >= {"finetune", "edit", "restyle", "precompute", "finetune-many", "translate", "from-strokes", "verify"}


@pytest.mark.parametrize("line", README_COMMANDS)
def test_every_readme_command_is_a_valid_command_line(line):
    parses(argv_of(line))


@pytest.mark.parametrize(("command", "line"), HELP_EXAMPLES, ids=[f"{c}:{i}" for i, (c, _) in enumerate(HELP_EXAMPLES)])
def test_every_help_example_is_a_valid_command_line(command, line):
    parses(argv_of(line))  # (an example may first make its input: `toyworld make-data ...`)


def test_help_examples_split_over_lines_end_in_a_backslash():
    assert UNCONTINUED == []


def test_help_keeps_brackets_and_prints_examples_line_by_line(capsys):
    assert main(["restyle", "--help"]) == 0
    out = capsys.readouterr().out
    assert "  models: [models/blue, models/green]\n" in out, "square brackets survive"
    assert "dclip-ray restyle --input toy/ --model models/blue --out restyled/ --n-gen 20\n" in out
    assert main(["--version"]) == 0 and capsys.readouterr().out.startswith("dclip-ray ")


def test_models_list_has_json(capsys):
    import json

    assert main(["models", "list", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {"toy_shapes", "celeba_hq", "toy_clip"} <= {r["name"] for r in rows}


@pytest.mark.slow
@pytest.mark.timeout(1800)  # the whole README walk: several fine-tunings and three Ray pipelines (about 10 min here)
def test_the_readme_toy_blocks_run_in_order(tmp_path, monkeypatch, capsys):
    """Every runnable README command, in README order, in one temporary folder: exit code 0."""
    monkeypatch.chdir(tmp_path)
    blocks = readme_blocks()
    heredocs = [m for _, text in blocks for m in re.findall(r"^cat > (\S+) <<'EOF'\n(.*?)^EOF$", text, re.S | re.M)]
    assert [name for name, _ in heredocs] == ["prompts.txt"], "the README writes its prompt file in its walk"
    ran = []
    try:
        for lang, text in blocks:
            if lang != "bash":
                continue
            for name, body in re.findall(r"^cat > (\S+) <<'EOF'\n(.*?)^EOF$", text, re.S | re.M):
                (tmp_path / name).write_text(body)  # (the order within a block: written before its commands)
            for line in commands_in(text):
                if any(m in line for m in NOT_RUNNABLE) or line.startswith(("dclip-ray run ", "dclip-ray demo")):
                    continue
                capsys.readouterr()
                rc = main(argv_of(line))
                err = capsys.readouterr().err
                assert rc == 0, f"{line}\nexit {rc}: {err[-2000:]}"
                ran.append(line)
    finally:
        import ray

        ray.shutdown()  # the pipeline commands started an embedded Ray in this process
    assert len(ran) >= 15, ran
    assert os.path.isdir(tmp_path / "restyled" / "square") and (tmp_path / "edited" / "grid.png").exists()

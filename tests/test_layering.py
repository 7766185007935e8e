"""Layering: only the Ray wiring (dclip_ray.pipeline) and the CLI may import Ray; everything else, the
per-shard stages (dclip_ray.stages) included, never does."""

from __future__ import annotations

import pkgutil
import re
import subprocess
import sys
from pathlib import Path

import dclip_ray

RAY_WIRING = ("dclip_ray.pipeline", "dclip_ray.cli")
IMPORTS_RAY = re.compile(r"^\s*(import ray\b|from ray\b)", re.M)


def core_modules() -> list[str]:
    names = ["dclip_ray"]
    for info in pkgutil.walk_packages(dclip_ray.__path__, "dclip_ray."):
        if info.name.startswith(RAY_WIRING):
            continue
        names.append(info.name)
    return names


def source_of(module: str) -> Path:
    base = Path(dclip_ray.__path__[0]).parent / Path(*module.split("."))
    return base / "__init__.py" if base.is_dir() else base.with_suffix(".py")


def test_importing_the_core_does_not_import_ray():
    modules = core_modules()
    assert "dclip_ray.diffusion" in modules and "dclip_ray.mixing" in modules
    assert "dclip_ray.stages.restyle" in modules and "dclip_ray.stages.precompute" in modules, "stages are covered"
    code = "import importlib, sys\n" + "".join(f"importlib.import_module({m!r})\n" for m in modules) + (
        "bad = sorted(m for m in sys.modules if m == 'ray' or m.startswith('ray.'))\n"
        "assert not bad, bad\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_only_the_ray_wiring_mentions_ray_in_its_source():
    """Not even a lazy ``import ray`` inside a function: the stages stay runnable without Ray."""
    offenders = [m for m in core_modules() if IMPORTS_RAY.search(source_of(m).read_text())]
    assert not offenders, offenders
    wiring = [info.name for info in pkgutil.walk_packages(dclip_ray.__path__, "dclip_ray.")
              if info.name.startswith("dclip_ray.pipeline.")]
    assert any(IMPORTS_RAY.search(source_of(m).read_text()) for m in wiring), "the Ray wiring is where Ray is"

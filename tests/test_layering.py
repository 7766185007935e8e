"""Layering: the core package never imports Ray (only dclip_ray.pipeline may)."""

from __future__ import annotations

import pkgutil
import subprocess
import sys

import dclip_ray


def core_modules() -> list[str]:
    names = ["dclip_ray"]
    for info in pkgutil.walk_packages(dclip_ray.__path__, "dclip_ray."):
        if info.name.startswith(("dclip_ray.pipeline", "dclip_ray.cli")):
            continue
        names.append(info.name)
    return names


def test_importing_the_core_does_not_import_ray():
    modules = core_modules()
    assert "dclip_ray.diffusion" in modules and "dclip_ray.mixing" in modules
    code = "import importlib, sys\n" + "".join(f"importlib.import_module({m!r})\n" for m in modules) + (
        "bad = sorted(m for m in sys.modules if m == 'ray' or m.startswith('ray.'))\n"
        "assert not bad, bad\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]

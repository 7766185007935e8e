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


def all_modules() -> dict[str, Path]:
    """``{module name: source file}`` of every module of the package."""
    root = Path(dclip_ray.__file__).parent
    out = {"dclip_ray": root / "__init__.py"}
    for info in pkgutil.walk_packages(dclip_ray.__path__, "dclip_ray."):
        rel = Path(*info.name.split(".")[1:])
        out[info.name] = root / rel / "__init__.py" if info.ispkg else (root / rel).with_suffix(".py")
    return out


def core_modules() -> list[str]:
    return [m for m in all_modules() if not m.startswith(RAY_WIRING)]


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


def test_only_the_ray_wiring_imports_ray_even_lazily():
    """No ``import ray`` anywhere outside pipeline/ and cli/, not even inside a function: the stages
    run without Ray (``dclip-ray edit``) and are tested without it."""
    sources = all_modules()
    offenders = [m for m in core_modules() if IMPORTS_RAY.search(sources[m].read_text())]
    assert not offenders, offenders
    wiring = [m for m in sources if m.startswith("dclip_ray.pipeline.")]
    assert sum(bool(IMPORTS_RAY.search(sources[m].read_text())) for m in wiring) >= 3, "Ray lives in the wiring"


def test_whether_a_location_is_a_url_or_remote_is_decided_in_one_place():
    """Issue 29 item 5: "is this a remote URL?" was decided 11 ways ("://" in x, with or without file://,
    two is_local(fs) helpers); dclip_ray.urls now answers it for everyone."""
    import fsspec

    from dclip_ray.urls import abs_location, is_local_fs, is_remote, is_url, local_path

    ad_hoc = {name: path for name, path in all_modules().items()
              if name != "dclip_ray.urls" and re.search(r"\"://\" (not )?in |startswith\(\"file://\"\)|removeprefix\(\"file://\"\)",
                                                        path.read_text())}
    assert not ad_hoc, f"decide through dclip_ray.urls: {sorted(ad_hoc)}"
    assert is_url("s3://b/k") and is_url("file:///x") and not is_url("/x") and not is_url("a/b")
    assert is_remote("s3://b/k") and is_remote("memory://m") and not is_remote("file:///x") and not is_remote("/x")
    assert local_path("file:///a/b") == "/a/b" and local_path("s3://b/k") == "s3://b/k"
    assert abs_location("s3://b/k") == "s3://b/k" and abs_location("a").startswith("/")
    assert is_local_fs(fsspec.filesystem("file")) and not is_local_fs(fsspec.filesystem("memory"))


def _module_imports() -> dict[str, set[str]]:
    """``{module: the package modules it imports at module level}`` (``if TYPE_CHECKING:`` blocks included;
    imports inside functions are not: they are how a heavy dependency is deferred)."""
    import ast

    mods = all_modules()
    graph = {}
    for name, path in mods.items():
        pkg = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        deps: set[str] = set()
        todo = list(ast.parse(path.read_text()).body)
        while todo:
            node = todo.pop()
            if isinstance(node, ast.If):
                todo.extend(node.body)
            elif isinstance(node, ast.ImportFrom):
                parts = pkg.split(".")[: len(pkg.split(".")) - max(0, node.level - 1)] if node.level else []
                target = ".".join(parts + ([node.module] if node.module else []))
                deps.update(f"{target}.{a.name}" if f"{target}.{a.name}" in mods else target for a in node.names)
            elif isinstance(node, ast.Import):
                deps.update(a.name for a in node.names)
        graph[name] = {d for d in deps if d in mods and d != name}
    return graph


def test_no_module_imports_itself_through_others():
    """Issue 29 item 5: three import circles (callbacks <-> finetune through TrainState, the toy CLIP's data and
    training modules, the workflow spec and its loader) are gone; none comes back."""
    graph = _module_imports()
    assert "dclip_ray.train_state" in graph["dclip_ray.finetune"], "the graph sees relative imports"
    cycles = []
    for start in graph:
        seen, todo = {start}, [(start, [start])]
        while todo:
            node, path = todo.pop()
            for nxt in sorted(graph[node]):
                if nxt == start:
                    cycles.append(path)
                elif nxt not in seen:
                    seen.add(nxt)
                    todo.append((nxt, [*path, nxt]))
    assert not cycles, f"import circles: {sorted({' -> '.join(c) for c in cycles})}"


PIPELINE_MAX_LINES = 250


def _ray_free_definitions(source: str) -> list[str]:
    """The top-level functions and classes of a module that touch no Ray: their code names neither ``ray``,
    nor anything imported from Ray or from another ``dclip_ray.pipeline`` module, nor another definition of
    the module that does (transitively). Dataclasses (a job's arguments, read by the Ray code beside them)
    are not counted."""
    import ast

    tree = ast.parse(source)
    ray_names = {"ray"}
    for n in ast.walk(tree):
        if isinstance(n, ast.ImportFrom) and (n.level > 0 or (n.module or "").split(".")[0] == "ray"
                                              or (n.module or "").startswith("dclip_ray.pipeline")):
            ray_names |= {a.asname or a.name for a in n.names}
    defs = {n.name: n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))}
    used = {k: {x.id for x in ast.walk(v) if isinstance(x, ast.Name)} | {x.attr for x in ast.walk(v)
                                                                         if isinstance(x, ast.Attribute)}
            for k, v in defs.items()}
    wiring = {k for k, names in used.items() if names & ray_names}
    grown = True
    while grown:
        more = {k for k, names in used.items() if k not in wiring and names & wiring}
        wiring |= more
        grown = bool(more)
    dataclasses_ = {k for k, v in defs.items() if isinstance(v, ast.ClassDef)
                    and any("dataclass" in ast.unparse(d) for d in v.decorator_list)}
    return sorted(set(defs) - wiring - dataclasses_)


def test_pipeline_holds_only_ray_wiring():
    """Issue 29 item 4: pipeline/ is the Ray calls and nothing else. Its files are short, and every
    function or class there touches Ray; the planning, checks, accounting, ledger and submission building
    they use live in stages/ and workflow/, where they run and are tested without Ray."""
    found = {name: path for name, path in all_modules().items() if name.startswith("dclip_ray.pipeline.")}
    assert len(found) >= 8
    long = {n: len(p.read_text().splitlines()) for n, p in found.items()
            if len(p.read_text().splitlines()) > PIPELINE_MAX_LINES}
    assert not long, f"pipeline/ files over {PIPELINE_MAX_LINES} lines: {long}"
    free = {n: f for n, p in found.items() if (f := _ray_free_definitions(p.read_text()))}
    assert not free, f"Ray-free code in pipeline/ (move it to stages/ or workflow/): {free}"
    assert _ray_free_definitions("import ray\n\ndef a():\n    return ray.get(1)\n\ndef b():\n    return a()\n"
                                 "\ndef c():\n    return 1\n") == ["c"], "the rule itself finds Ray-free code"

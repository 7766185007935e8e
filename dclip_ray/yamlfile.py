"""Reading the YAML files users give us (workflow specs, mix files, ``--set`` values) with bounds.

``yaml.safe_load`` refuses tags that run code, but its aliases are references: a file of a few hundred
bytes can name one value a billion times ("billion laughs"); it loads instantly and then every walk
over it (validation, an error message echoing it) expands it, which once took 13.4 GB of memory and
printed a 2.1 GB error line. :func:`load_yaml` loads, then measures the data as if every alias were
expanded (memoised per object, so the measure itself stays cheap) and refuses more than
:data:`MAX_VALUES` values or :data:`MAX_CHARS` characters of text.
"""

from __future__ import annotations

from typing import IO, Any

import yaml

from dclip_ray.errors import ConfigError

MAX_VALUES = 100_000
"""The most values (mappings, lists, scalars) a user YAML file may expand to."""

MAX_CHARS = 10_000_000
"""The most characters of text (keys and strings) a user YAML file may expand to."""


def expanded_size(data: Any) -> tuple[int, int]:
    """``(values, characters)`` of ``data`` with every shared object counted each time it is reached
    (what an alias expands to); cycles count once per reach of their first object."""
    memo: dict[int, tuple[int, int]] = {}
    active: set[int] = set()

    def size(x: Any) -> tuple[int, int]:
        if isinstance(x, str):
            return 1, len(x)
        if not isinstance(x, (dict, list, tuple)):
            return 1, 0
        key = id(x)
        if key in memo:
            return memo[key]
        if key in active:  # a recursive alias: refused by the bound below
            return MAX_VALUES + 1, 0
        active.add(key)
        n, c = 1, 0
        items = [v for kv in x.items() for v in kv] if isinstance(x, dict) else list(x)
        for v in items:
            vn, vc = size(v)
            n, c = n + vn, c + vc
            if n > MAX_VALUES or c > MAX_CHARS:
                break
        active.discard(key)
        memo[key] = (n, c)
        return n, c

    try:
        return size(data)
    except RecursionError:
        return MAX_VALUES + 1, 0


def load_yaml(stream: str | IO[str], where: str) -> Any:
    """``yaml.safe_load(stream)``, refused (:class:`ConfigError` naming ``where``) when its aliases expand
    it past :data:`MAX_VALUES` values or :data:`MAX_CHARS` characters. YAML syntax errors propagate as
    ``yaml.YAMLError`` (each caller words them for its file)."""
    data = yaml.safe_load(stream)
    n, chars = expanded_size(data)
    if n > MAX_VALUES or chars > MAX_CHARS:
        raise ConfigError(f"{where}: expands to more than {MAX_VALUES:,} values or {MAX_CHARS:,} characters "
                          "(YAML aliases repeating one value many times?); write the values out")
    return data

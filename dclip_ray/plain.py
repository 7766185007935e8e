"""Strict JSON for everything a command prints or writes (no Ray, no torch): NaN and infinities become
null, so ``--json`` output and model cards parse with any JSON parser (Python's ``json`` would write
``NaN``, which strict parsers refuse)."""

from __future__ import annotations

import json
import math
from typing import Any

__all__ = ["dumps", "finite"]


def finite(obj: Any) -> Any:
    """``obj`` with every non-finite float (at any depth of dicts, lists and tuples) replaced by None."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    return obj


def dumps(obj: Any, indent: int | None = 2) -> str:
    """Strict JSON text of ``obj`` (:func:`finite`; other objects as ``str``)."""
    return json.dumps(finite(obj), indent=indent, default=str, allow_nan=False)

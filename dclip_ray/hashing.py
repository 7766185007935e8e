"""Content hashes used as cache keys and provenance (base-model sha256, config hashes)."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import torch


def state_dict_sha256(module_or_state: torch.nn.Module | dict[str, torch.Tensor]) -> str:
    """sha256 (hex) of a model's parameters and buffers: names, dtypes, shapes and bytes, in key order.

    Independent of the file format the weights came from, so a converted checkpoint and its diffusers
    copy hash the same when their tensors are equal.
    """
    state = module_or_state.state_dict() if isinstance(module_or_state, torch.nn.Module) else module_or_state
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def config_sha256(config: Any) -> str:
    """sha256 (hex) of a JSON-serialisable config, with sorted keys."""
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()

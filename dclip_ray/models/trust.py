"""Loading checkpoints from strangers without running their code.

Checkpoints load as safetensors or with ``torch.load(weights_only=True)``; formats that can execute
code when loaded (pickles holding Python objects beyond tensors, TorchScript archives) load only when
trusted: ``trust_checkpoint=True`` on a loader, or inside :func:`trust_scope` (the CLI's
``--trust-checkpoint``). The scope is process-wide through the ``DCLIP_TRUST_CHECKPOINT`` environment
variable, so Ray workers started by a trusting driver inherit it (see
:func:`dclip_ray.pipeline.runtime.init_ray`).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

TRUST_ENV = "DCLIP_TRUST_CHECKPOINT"


def is_trusted(trust_checkpoint: bool = False) -> bool:
    """True when code-executing checkpoint formats may load: the flag, or an enclosing trust scope."""
    return bool(trust_checkpoint) or os.environ.get(TRUST_ENV) == "1"


@contextmanager
def trust_scope(enabled: bool) -> Iterator[None]:
    """Within the block (when ``enabled``), loaders accept pickles and TorchScript; restored afterwards."""
    if not enabled:
        yield
        return
    old = os.environ.get(TRUST_ENV)
    os.environ[TRUST_ENV] = "1"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(TRUST_ENV, None)
        else:
            os.environ[TRUST_ENV] = old

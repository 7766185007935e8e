"""Faults injected into the restyle unit of work by tests, never by production code: subclasses of
:class:`~dclip_ray.stages.restyle.ShardRestyler`, through its public seams only (``run``, and
``new_writer``: the writer of an output shard), that a test puts in the driver's place of the class the
actors build (``monkeypatch.setattr(dclip_ray.pipeline.restyle, "ShardRestyler", partial(KillMidBatch,
flag=PATH))``; the driver hands the actors that name). Ray workers import this module by name
(``tests/conftest.py``'s ``ray_local`` puts this folder on their path).

A ``flag`` is a file path: the fault fires once, in the first process that creates the file.
"""

from __future__ import annotations

import os
import signal
import time
from typing import Any

from dclip_ray.io.shards import ShardWriter
from dclip_ray.stages.restyle import RestyleConfig, ShardRestyler, Variant


def first_time(flag: str) -> bool:
    """True once per flag file: creates it."""
    if os.path.exists(flag):
        return False
    open(flag, "w").close()
    return True


class HangOnBad(ShardRestyler):
    """A worker that never returns on the input shard named ``bad``."""

    hang_on = "bad"

    def run(self, shard: str, path: str, *args: Any, **kwargs: Any) -> Any:
        if shard == self.hang_on:
            while True:
                time.sleep(3600)
        return super().run(shard, path, *args, **kwargs)


class _KillAfterFirstImage(ShardWriter):
    def __init__(self, root: str, shard: str, flag: str):
        super().__init__(root, shard)
        self.flag = flag

    def write(self, *args: Any, **kwargs: Any) -> bool:
        written = super().write(*args, **kwargs)
        if first_time(self.flag):
            os.kill(os.getpid(), signal.SIGKILL)
        return written


class KillMidBatch(ShardRestyler):
    """The first edited image written SIGKILLs its process: the actor dies mid-shard, mid-batch."""

    def __init__(self, cfg: RestyleConfig, flag: str):
        super().__init__(cfg)
        self.flag = flag

    def new_writer(self, v: Variant, shard: str) -> ShardWriter:
        return _KillAfterFirstImage(v.out, shard, self.flag)


class _DieBeforeMarker(ShardWriter):
    def __init__(self, root: str, shard: str, flag: str):
        super().__init__(root, shard)
        self.flag = flag

    def write_commit_marker(self, marker: Any) -> None:
        if first_time(self.flag):
            os._exit(1)  # a worker dying between the data and its commit marker
        super().write_commit_marker(marker)


class CrashBeforeCommit(ShardRestyler):
    """The first shard written kills its process after the tar and the manifest, before the marker."""

    def __init__(self, cfg: RestyleConfig, flag: str):
        super().__init__(cfg)
        self.flag = flag

    def new_writer(self, v: Variant, shard: str) -> ShardWriter:
        return _DieBeforeMarker(v.out, shard, self.flag)


class DieAfterCommit(ShardRestyler):
    """The first shard committed kills its process before its result row is returned: the row is lost
    after the commit, as when a node dies between the two (Ray retries the row on another actor)."""

    def __init__(self, cfg: RestyleConfig, flag: str):
        super().__init__(cfg)
        self.flag = flag

    def run(self, *args: Any, **kwargs: Any) -> Any:
        result = super().run(*args, **kwargs)
        if not result.skipped and first_time(self.flag):  # a skipped shard never spends the flag
            os._exit(1)
        return result


class CannotLoad(ShardRestyler):
    """A worker whose models cannot be loaded (the model folder was deleted after the driver's checks)."""

    def __init__(self, cfg: RestyleConfig, **_: Any):
        raise FileNotFoundError(f"{cfg.finetuned[0]}/diffusion_pytorch_model.safetensors: no such file (deleted)")

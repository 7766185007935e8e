"""Test-wide settings: no hub look-ups, small thread pools, deterministic CPU math."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import pytest  # noqa: E402  (after the environment above, which must be set before any import)


@pytest.fixture(scope="module")
def ray_local():
    """An embedded 2-CPU Ray for one test module (no dashboard), shut down afterwards. Its workers can
    import the test helpers of this folder (e.g. :mod:`fault_restylers`)."""
    import ray

    path = os.pathsep.join(p for p in (os.path.dirname(os.path.abspath(__file__)), os.environ.get("PYTHONPATH")) if p)
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": path}})
    yield
    ray.shutdown()



@pytest.fixture(autouse=True)
def _log_handlers_on_this_tests_stream():
    """A log handler made during an earlier test (Ray Data's own, or ``logging.basicConfig`` in a CLI
    command) is bound to the stream pytest captured for that test; once it is closed, a later record (Ray
    Data's on a dying actor) prints "--- Logging error ---" and a traceback. Point such handlers at this
    test's stderr, as if they had been made now."""
    import logging
    import sys

    for ref in list(logging._handlerList):  # type: ignore[attr-defined]  (every live handler, weakly held)
        handler = ref()
        if (isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler)
                and getattr(handler.stream, "closed", False)):
            handler.stream = sys.stderr  # not setStream: it flushes the closed one first
    yield

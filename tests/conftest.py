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

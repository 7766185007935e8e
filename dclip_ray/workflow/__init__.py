"""Workflow specs (`workflows/*.yaml`): validation and path resolution (no Ray; the runner is
:mod:`dclip_ray.pipeline.workflow_run`)."""

from .load import apply_overrides, load_spec, parse_spec
from .spec import WorkflowSpec

__all__ = ["WorkflowSpec", "apply_overrides", "load_spec", "parse_spec"]

"""Workflow specs (`workflows/*.yaml`): validation and path resolution (no Ray; the runner is
:mod:`dclip_ray.pipeline.workflow_run`)."""

from .spec import WorkflowSpec, apply_overrides, load_spec, parse_spec

__all__ = ["WorkflowSpec", "apply_overrides", "load_spec", "parse_spec"]

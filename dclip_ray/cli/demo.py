"""`dclip-ray demo`: the main job on the embedded default (placeholder until wired)."""

from __future__ import annotations

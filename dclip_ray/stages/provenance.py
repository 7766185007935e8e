"""What an edited sample says about itself (no Ray): its image bytes, its caption and its ``.json``.

An output sample keeps the input's ``.json`` object and adds:

- ``dclip``: the edit's provenance: the variant (output) name, each model's name, source and target,
  the strength or the mix (gamma), t0 and the step counts, the base model's sha256, where the latent
  came from (``cache`` or ``inverted``) and the input shard;
- ``original_caption``: the input's caption (its ``.txt``, else the ``.json``'s ``caption``), when it
  had one; ``caption`` (and the ``.txt``) become the edited caption (:func:`edited_caption`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from typing import Any

from dclip_ray.io.sources import caption_of


def edited_caption(caption: str | None, edits: Sequence[Sequence[str]]) -> str | None:
    """The caption of an edited image: for each ``(source, target)`` edit in turn, the source phrase in
    the caption (case-insensitive, whole words) is replaced by the target (``"a red circle"``, red
    circle -> blue circle: ``"a blue circle"``). A caption that does not name an edit's source keeps
    its words for that edit (we do not know what to say instead: the edit is recorded in ``dclip``);
    no caption stays None."""
    if caption is None:
        return None
    out = caption
    for source, target in edits:
        pattern = re.compile(r"\b" + re.escape(source) + r"\b", re.IGNORECASE)
        out = pattern.sub(target, out, count=1)
    return out


def output_members(extras: Mapping[str, bytes], dclip: dict[str, Any], edits: Sequence[Sequence[str]],
                   ) -> dict[str, bytes]:
    """The ``json`` and ``txt`` members of an output sample (see the module docstring) from the input
    sample's members ``extras``."""
    meta: dict[str, Any] = {}
    raw = extras.get("json")
    if raw is not None:
        try:
            loaded = json.loads(raw)
            meta = loaded if isinstance(loaded, dict) else {"original": loaded}
        except ValueError:
            meta = {"original_json_error": "the input .json was not valid JSON"}
    original = caption_of(extras)
    caption = edited_caption(original, edits)
    if original is not None:
        meta["original_caption"] = original
    if caption is not None:  # only when the input had one (edited_caption invents none)
        meta["caption"] = caption
    meta["dclip"] = dclip
    members = {"json": json.dumps(meta, sort_keys=True, default=str).encode()}
    if caption is not None:
        members["txt"] = caption.encode()
    return members

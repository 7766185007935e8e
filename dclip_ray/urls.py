"""Locations and credentials. A location is a local path or a URL; :func:`is_url`, :func:`is_remote`,
:func:`local_path`, :func:`abs_location` and :func:`is_local_fs` are the one answer to "is this a URL / served by
something other than the local disk?" everywhere.

Credentials never leave the process: one helper that strips secrets from URLs (and from text that
contains URLs) before anything is printed, logged or stored (markers, manifests, error rows, model cards).

``s3://AKIA...:secret@bucket/x`` -> ``s3://***@bucket/x``; ``https://h/x?X-Amz-Signature=abc&v=1`` ->
``https://h/x?X-Amz-Signature=***&v=1``.
"""

from __future__ import annotations

import os
import re
from typing import Any

FILE_SCHEME = "file://"


def is_url(location: str) -> bool:
    """True when ``location`` names a scheme (``s3://b/k``, ``memory://m``, ``file:///x``): it is kept as
    given, never joined to a folder or made absolute."""
    return "://" in location


def is_remote(location: str) -> bool:
    """True for a URL that a filesystem other than the local disk serves (``s3://``, ``gs://``,
    ``memory://``); False for a local path and for a ``file://`` URL."""
    return is_url(location) and not location.startswith(FILE_SCHEME)


def local_path(location: str) -> str:
    """A local path or ``file://`` URL as a path (``file:///a/b`` -> ``/a/b``); other strings unchanged."""
    return location.removeprefix(FILE_SCHEME)


def abs_location(location: str) -> str:
    """A local path made absolute (Ray workers and later runs may start in another folder); a URL as given."""
    return location if is_url(location) else os.path.abspath(location)


def is_local_fs(fs: Any) -> bool:
    """True for fsspec's local filesystem (a local write goes through a temporary name and a rename)."""
    protocol = getattr(fs, "protocol", None)
    protocols = protocol if isinstance(protocol, tuple) else (protocol,)
    return "file" in protocols or "local" in protocols or type(fs).__name__ == "LocalFileSystem"


# query parameters that carry secrets: AWS SigV2/SigV4 presigned URLs, GCS signed URLs, Azure SAS, OAuth
SECRET_PARAMS = (
    "x-amz-signature", "x-amz-credential", "x-amz-security-token", "awsaccesskeyid", "signature",
    "x-goog-signature", "x-goog-credential", "sig", "se", "token", "access_token", "secret", "password",
    "key", "sas", "client_secret", "refresh_token", "aws_secret_access_key", "aws_access_key_id",
)

_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.\-]*://)(?P<userinfo>[^/@\s'\"]+)@")
# ``user:password@`` left at the start of a path segment after a library stripped the scheme
_BARE_USERINFO = re.compile(r"(?:(?<=^)|(?<=[\s/'\"(=]))[^/@\s:'\"]+:[^/@\s'\"]+@")
_QUERY = re.compile(r"(?P<sep>[?&;])(?P<name>[A-Za-z0-9_\-.]+)=(?P<value>[^&#\s'\"]*)")


def _query_sub(m: re.Match[str]) -> str:
    if m.group("name").lower() in SECRET_PARAMS and m.group("value"):
        return f"{m.group('sep')}{m.group('name')}=***"
    return m.group(0)


def redact(text: object) -> str:
    """``text`` (a URL, a path, or any message that may contain URLs) with the user-info of every
    URL (``user:password@``) and the values of known secret query parameters replaced by ``***``.

    Plain paths and URLs without secrets come back unchanged; None gives ``"None"``.
    """
    s = str(text)
    if "@" not in s and "=" not in s:
        return s
    s = _USERINFO.sub(lambda m: f"{m.group('scheme')}***@", s)
    s = _BARE_USERINFO.sub("***@", s)
    return _QUERY.sub(_query_sub, s)


def redact_data(obj: Any) -> Any:
    """JSON-able ``obj`` (dicts, lists, scalars) with :func:`redact` applied to every string in it,
    keys included: the one rule for a record a run writes (the ledger, ``--json``)."""
    if isinstance(obj, str):
        return redact(obj)
    if isinstance(obj, dict):
        return {redact(k) if isinstance(k, str) else k: redact_data(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [redact_data(v) for v in obj]
    return obj


_DATA_URI = re.compile(r"(data:[a-z]+/[a-z0-9.+-]+;base64,[A-Za-z0-9+/=]*)")


def redact_html(page: str) -> str:
    """An HTML page with :func:`redact` applied to all its text but its inline ``data:`` images (whose
    base64 could look like a secret query parameter)."""
    parts = _DATA_URI.split(page)
    return "".join(p if i % 2 else redact(p) for i, p in enumerate(parts))

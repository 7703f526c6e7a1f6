"""Locations: a local path or an ``s3://bucket/key`` URI, and the string operations on them.

No SDK is touched here, so callers that only build or compare locations never start an S3 client.
"""

from __future__ import annotations

import os
import re

from phi2sum.errors import StorageError

S3_SCHEME = "s3://"


def is_s3(uri: str | os.PathLike) -> bool:
    """True for ``s3://`` URIs; everything else is a local path."""
    return os.fspath(uri).startswith(S3_SCHEME)


def join(uri: str | os.PathLike, *parts: str) -> str:
    """Join path parts onto a local path or S3 URI with single slashes (``os.path.join`` would break ``s3://``)."""
    uri = os.fspath(uri)
    pieces = [re.sub("/+", "/", os.fspath(p)).strip("/") for p in parts]
    pieces = [p for p in pieces if p]
    if not pieces:
        return uri
    return "/".join([uri.rstrip("/"), *pieces])


def split_s3(uri: str) -> tuple[str, str]:
    """``s3://bucket/a/b/`` -> ``("bucket", "a/b")``; a URI without a bucket is a user error, said as one."""
    bucket, _, key = uri[len(S3_SCHEME):].strip("/").partition("/")
    if not bucket:
        raise StorageError(f"invalid S3 URI {uri!r}: write it as s3://bucket/prefix")
    return bucket, key.strip("/")


def local_path(uri: str | os.PathLike) -> str:
    """Absolute local path; accepts ``file://`` URIs and ``~`` (configs and CLIs give all three forms)."""
    path = os.fspath(uri)
    if path.startswith("file://"):
        path = path[len("file://"):]
    return os.path.abspath(os.path.expanduser(path))


def to_uri(uri: str, fs_path: str) -> str:
    """Turn a path returned by a filesystem back into a URI of the same kind as ``uri``, so listings can be
    passed straight back to this package."""
    return f"{S3_SCHEME}{fs_path}" if is_s3(uri) else fs_path

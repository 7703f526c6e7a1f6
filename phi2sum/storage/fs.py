"""The filesystem layer: one ``pyarrow.fs.S3FileSystem`` per endpoint/region/credentials, or the local filesystem.

Everything about reaching S3 is decided here, once, from the standard AWS environment: the endpoint
(``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL``), the region (``AWS_DEFAULT_REGION`` / ``AWS_REGION``, default
us-east-1), the credentials (the AWS chain; never passed, so a pickled filesystem sent to Ray workers carries
no secret), short timeouts and the SDK's standard retry strategy, so a dead endpoint fails in seconds.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Callable
from typing import Any, NamedTuple
from urllib.parse import urlsplit

import pyarrow.fs as pafs

from phi2sum.storage.uris import is_s3, local_path, split_s3

# Short limits so a dead endpoint fails in seconds instead of minutes of SDK retries. REQUEST_TIMEOUT_S is a
# "no bytes for this long" limit (pyarrow: curl's low-speed time; boto3: the socket read timeout), so it does
# not cut off a large transfer that is still moving. MAX_ATTEMPTS feeds both SDKs' standard retry mode, which
# retries throttling (503 SlowDown), 500s and dropped connections with jittered exponential backoff: a flaky
# store costs seconds, a dead one fails within about half a minute.
CONNECT_TIMEOUT_S = 5.0
REQUEST_TIMEOUT_S = 10.0
MAX_ATTEMPTS = 5

SECRET_VARS = ("AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID", "AWS_SESSION_TOKEN")

_CACHE: dict[tuple, Any] = {}
_LOCK = threading.Lock()


class S3Settings(NamedTuple):
    """What an S3 client is built from; a change in any field (a test switching endpoints, rotated credentials,
    a shorter timeout) builds a new client instead of reusing a stale one."""

    endpoint: str | None
    region: str
    credentials_fingerprint: str
    connect_timeout_s: float
    request_timeout_s: float
    max_attempts: int


def endpoint() -> str | None:
    """The configured endpoint URL; the S3-specific variable wins, as in the AWS SDKs."""
    url = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if url and "://" not in url:
        url = "https://" + url
    return url.rstrip("/") if url else None


def region() -> str:
    return os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION") or "us-east-1"


def describe_endpoint() -> str:
    """The endpoint as error messages name it."""
    return endpoint() or f"AWS S3 ({region()})"


def settings() -> S3Settings:
    creds = "\0".join(os.environ.get(var, "") for var in SECRET_VARS)
    return S3Settings(endpoint(), region(), hashlib.sha256(creds.encode()).hexdigest(),
                      CONNECT_TIMEOUT_S, REQUEST_TIMEOUT_S, MAX_ATTEMPTS)


def cached(kind: str, build: Callable[[S3Settings], Any]) -> Any:
    """The ``kind`` client for the current settings, built by ``build(settings)`` the first time."""
    current = settings()
    with _LOCK:
        client = _CACHE.get((kind, current))
        if client is None:
            client = _CACHE[(kind, current)] = build(current)
    return client


def clear_cache() -> None:
    """Forget every cached S3 filesystem and client (tests switch endpoints and credentials)."""
    with _LOCK:
        _CACHE.clear()


def _build_s3(current: S3Settings) -> pafs.S3FileSystem:
    kwargs: dict[str, Any] = {
        "region": current.region,
        "connect_timeout": current.connect_timeout_s,
        "request_timeout": current.request_timeout_s,
        "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=current.max_attempts),
    }
    if current.endpoint:
        parts = urlsplit(current.endpoint)
        kwargs["endpoint_override"] = parts.netloc + parts.path
        kwargs["scheme"] = parts.scheme
    ca_bundle = os.environ.get("AWS_CA_BUNDLE")
    if ca_bundle and os.path.isfile(ca_bundle):
        kwargs["tls_ca_file_path"] = ca_bundle
    return pafs.S3FileSystem(**kwargs)


def s3_filesystem() -> pafs.S3FileSystem:
    """The S3 filesystem for the current settings, built once and shared (it pools its connections)."""
    return cached("pyarrow", _build_s3)


def filesystem(uri: str | os.PathLike) -> tuple[pafs.FileSystem, str]:
    """The pyarrow filesystem for ``uri`` and the path inside it.

    For S3 the path is ``bucket/key`` (no ``s3://``): the form pyarrow, Ray Data and Ray Train's
    ``storage_filesystem`` expect alongside a filesystem object.
    """
    uri = os.fspath(uri)
    if is_s3(uri):
        bucket, key = split_s3(uri)
        return s3_filesystem(), f"{bucket}/{key}" if key else bucket
    return pafs.LocalFileSystem(), local_path(uri)


def bucket_missing(bucket: str) -> bool:
    """True only when the server says the bucket does not exist (pyarrow asks with HeadBucket); any other
    answer means "don't know" -> False, since this only refines an error message."""
    try:
        return s3_filesystem().get_file_info(bucket).type == pafs.FileType.NotFound
    except Exception:  # noqa: BLE001 - only refines an error message
        return False

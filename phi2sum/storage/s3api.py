"""boto3, for what pyarrow.fs cannot do; everything else goes through :mod:`phi2sum.storage.fs`.

1. Writing an object. pyarrow's S3 output stream fails two guarantees (checked with pyarrow 26.0.1 against moto
   and a silent socket):
   * Atomicity. From 10 MiB on it is a multipart upload, and Python cannot abort one: ``close()``, which ``with``
     calls on an exception and the stream's destructor calls too, always tries to finish it. A 12 MiB write
     whose CreateMultipartUpload failed once left an EMPTY object in place of the old one (close() fell back to
     a PutObject of nothing); a failed UploadPart left the upload pending. (Under 10 MiB, with
     ``allow_delayed_open``, it is one PutObject at close(), which would be fine.)
   * Failing in seconds. Its only read limit is curl's low-speed time, which on an upload trips only ~6 s after
     the last byte went out: against a server that accepts and never answers, each PutObject attempt took 8 s
     with request_timeout=1 and 17 s with the default 10 (a HEAD or GET: 1 s). boto3's socket timeout is exact.
   So an object is one boto3 PutObject, its body complete in memory or on disk before the request starts; local
   files above :data:`SINGLE_PUT_LIMIT` go as a boto3 multipart upload, which boto3 aborts when it fails.
2. Deleting a set of keys. pyarrow's ``delete_file`` emulates directories: after each DeleteObject it PUTs an
   empty ``parent/`` marker object (seen on moto: re-uploading a tree without ``sub/`` left ``sub/`` behind),
   at three requests a file. DeleteObjects removes up to 1000 keys per request and writes nothing.
3. Conditional writes, for the exclusive run claim (:mod:`phi2sum.storage.claims`): ``If-None-Match: *`` (create
   only if absent) and ``If-Match: <etag>`` (replace only what was read), both refused by S3 with 412
   PreconditionFailed. pyarrow has no conditional writes, nor a way to read an object's ETag.

:func:`s3_client` is public so tests and operators inspect a bucket with exactly the package's settings.
"""

from __future__ import annotations

import boto3.session
import botocore.exceptions
from boto3.s3.transfer import TransferConfig
from botocore.config import Config

from phi2sum.storage.fs import S3Settings, cached

# Files up to this size are uploaded with one PutObject (S3's single-PUT limit is 5 GiB); larger ones use a
# multipart upload, which S3 also publishes atomically when it completes.
SINGLE_PUT_LIMIT = 4 * 1024**3


def _build_client(current: S3Settings):
    config = Config(
        connect_timeout=current.connect_timeout_s,
        read_timeout=current.request_timeout_s,
        retries={"total_max_attempts": current.max_attempts, "mode": "standard"},
        s3={"addressing_style": "path"} if current.endpoint else None,
        # Only checksum when the API requires it: several S3-compatible stores reject the newer default
        # checksum headers.
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
    )
    # A fresh session: the default session caches credentials it resolved earlier.
    return boto3.session.Session().client("s3", endpoint_url=current.endpoint, region_name=current.region,
                                          config=config)


def s3_client():
    """A boto3 S3 client for the same endpoint/region/credentials/limits as :func:`phi2sum.storage.filesystem`."""
    return cached("boto3", _build_client)


def put_object(bucket: str, key: str, data: bytes) -> None:
    """``data`` as the object ``bucket/key``, in one PutObject: it is visible whole or not at all."""
    s3_client().put_object(Bucket=bucket, Key=key, Body=data)


def upload_file(path: str, bucket: str, key: str) -> None:
    """A local file as the object ``bucket/key``: one PutObject up to SINGLE_PUT_LIMIT, else multipart."""
    s3_client().upload_file(path, bucket, key, Config=TransferConfig(multipart_threshold=SINGLE_PUT_LIMIT))


def delete_keys(bucket: str, keys: list[str]) -> None:
    """Delete ``keys`` from ``bucket`` and nothing else (no directory markers), 1000 per request (S3's limit)."""
    for start in range(0, len(keys), 1000):
        batch = [{"Key": key} for key in keys[start:start + 1000]]
        s3_client().delete_objects(Bucket=bucket, Delete={"Objects": batch, "Quiet": True})


def _precondition_failed(exc: botocore.exceptions.ClientError) -> bool:
    error = exc.response.get("Error", {})
    return error.get("Code") in ("PreconditionFailed", "412") or \
        exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") == 412


def put_if_absent(bucket: str, key: str, data: bytes) -> bool:
    """Create ``bucket/key`` only if it does not exist (True), else leave it (False)."""
    try:
        s3_client().put_object(Bucket=bucket, Key=key, Body=data, IfNoneMatch="*")
    except botocore.exceptions.ClientError as exc:
        if _precondition_failed(exc):
            return False
        raise
    return True


def put_if_match(bucket: str, key: str, data: bytes, etag: str | None) -> bool:
    """Replace ``bucket/key`` only if it is still the version ``etag`` (True), else leave it (False)."""
    try:
        s3_client().put_object(Bucket=bucket, Key=key, Body=data, IfMatch=etag or "*")
    except botocore.exceptions.ClientError as exc:
        if _precondition_failed(exc) or exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
            return False
        raise
    return True


def get_with_etag(bucket: str, key: str) -> tuple[bytes, str] | None:
    """The object's bytes and ETag, or None when there is no such object."""
    try:
        response = s3_client().get_object(Bucket=bucket, Key=key)
    except botocore.exceptions.ClientError as exc:
        if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
            return None
        raise
    return response["Body"].read(), response["ETag"]

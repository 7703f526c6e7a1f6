"""Every storage failure as one line: a :class:`StorageError` naming the location, the problem and the fix.

The SDK errors behind it (pyarrow's OSErrors, botocore's exceptions) are long, multi-line and may quote
credentials; users get a message they can act on instead, with secret values redacted, and the cause is
dropped so it cannot reach a log.
"""

from __future__ import annotations

import contextlib
import os
import re

import boto3.exceptions
import botocore.exceptions

from phi2sum.errors import StorageError
from phi2sum.storage.fs import SECRET_VARS, bucket_missing, describe_endpoint
from phi2sum.storage.uris import is_s3, split_s3


def redact(text: str) -> str:
    """Replace the values of the AWS secret environment variables in ``text`` with ``***``.

    Values under 4 characters are left alone: they cannot be hidden meaningfully and would garble every message.
    """
    values = {os.environ.get(var, "") for var in SECRET_VARS}
    for value in sorted((v for v in values if len(v) >= 4), key=len, reverse=True):
        text = text.replace(value, "***")
    return text


# pyarrow spells errors as AWS SDK enum names (NETWORK_CONNECTION, NO_SUCH_BUCKET), botocore as S3 codes.
_UNREACHABLE = re.compile(
    r"NETWORK_CONNECTION|curlCode: (6|7|28)\b|Could not connect|Couldn't connect|Timeout was reached"
    r"|Could not resolve|Connection refused|timed out",
    re.IGNORECASE,
)
_NO_BUCKET = re.compile(r"NO_SUCH_BUCKET|NoSuchBucket|specified bucket does not exist", re.IGNORECASE)
_NOT_FOUND = re.compile(r"NO_SUCH_KEY|NoSuchKey|Path does not exist|\(404\)|Not Found", re.IGNORECASE)

# (pattern in the error text, message): checked in order, the first match wins.
_REJECTED = (
    (re.compile(r"INVALID_ACCESS_KEY_ID|InvalidAccessKeyId"),
     "S3 endpoint {endpoint} does not know the access key id used to {action} {uri}: "
     "check AWS_ACCESS_KEY_ID (and AWS_SECRET_ACCESS_KEY)"),
    (re.compile(r"SIGNATURE_DOES_NOT_MATCH|SignatureDoesNotMatch"),
     "S3 endpoint {endpoint} rejected the request signature to {action} {uri}: "
     "check that AWS_SECRET_ACCESS_KEY belongs to AWS_ACCESS_KEY_ID"),
    (re.compile(r"EXPIRED_TOKEN|ExpiredToken|InvalidToken|TokenRefreshRequired"),
     "S3 endpoint {endpoint} rejected the session token used to {action} {uri}: "
     "refresh AWS_SESSION_TOKEN or unset it"),
    (re.compile(r"ACCESS_DENIED|AccessDenied|HTTP status 403|\(403\)|\b403 Forbidden|Unable to locate credentials"),
     "access denied by S3 endpoint {endpoint} to {action} {uri}: check AWS_ACCESS_KEY_ID / "
     "AWS_SECRET_ACCESS_KEY and that they may use bucket '{bucket}'"),
)


def no_bucket_error(bucket: str, uri: str, action: str) -> StorageError:
    return StorageError(redact(f"S3 bucket '{bucket}' does not exist at {describe_endpoint()} (needed to "
                               f"{action} {uri}): create the bucket or fix the bucket name"))


def _describe(exc: BaseException) -> str:
    """The error as one line of text, with botocore's error code and HTTP status, which its str() leaves out."""
    text = f"{type(exc).__name__}: {exc}"
    if isinstance(exc, botocore.exceptions.ClientError):
        error = exc.response.get("Error", {})
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        text += f" [{error.get('Code', '')}] ({status})"
    return " ".join(text.split())


def _s3_message(exc: BaseException, text: str, uri: str, action: str) -> str | StorageError:
    """The message for a failure on an S3 URI (or the finished missing-bucket error)."""
    endpoint = describe_endpoint()
    try:
        bucket = split_s3(uri)[0]
    except StorageError:
        bucket = "?"
    unreachable = (botocore.exceptions.ConnectionError, botocore.exceptions.HTTPClientError, TimeoutError)
    if isinstance(exc, unreachable) or _UNREACHABLE.search(text):
        return (f"cannot reach S3 endpoint {endpoint} to {action} {uri}: "
                f"check AWS_ENDPOINT_URL and that the server is up")
    if isinstance(exc, botocore.exceptions.NoCredentialsError):
        return f"no AWS credentials found to {action} {uri}: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"
    for pattern, message in _REJECTED:
        if pattern.search(text):
            return message.format(endpoint=endpoint, action=action, uri=uri, bucket=bucket)
    not_found = isinstance(exc, FileNotFoundError) or bool(_NOT_FOUND.search(text))
    # A missing key and a missing bucket both read "not found": ask the server which one it is.
    if _NO_BUCKET.search(text) or (not_found and bucket_missing(bucket)):
        return no_bucket_error(bucket, uri, action)
    if not_found:
        return f"not found: {uri} (while trying to {action} it): check the URI, or run the step that writes it"
    return f"cannot {action} {uri} on S3 endpoint {endpoint}: {redact(text)[:300]}"


def _file_in_the_way(uri: str) -> str | None:
    """The existing regular file among `uri`'s parent folders, if any (a path through a file cannot exist)."""
    path = os.path.dirname(os.path.abspath(os.path.expanduser(uri)))
    while path and path != os.path.dirname(path):
        if os.path.isfile(path):
            return path
        path = os.path.dirname(path)
    return None


def _local_message(exc: BaseException, text: str, uri: str, action: str) -> str:
    blocker = _file_in_the_way(uri)
    if blocker:
        return (f"cannot {action} {uri}: {blocker} is a file, not a folder; choose another location or move "
                "that file away")
    if isinstance(exc, PermissionError):
        return (f"permission denied to {action} {uri}: fix the file permissions "
                f"or choose a location you can write to")
    if isinstance(exc, (FileNotFoundError, NotADirectoryError)):
        return f"not found: {uri} (while trying to {action} it): check the path, or run the step that writes it"
    return f"cannot {action} {uri}: {redact(text)[:300]}"


def as_storage_error(exc: BaseException, uri: str, action: str = "access") -> StorageError:
    """Map an OSError / botocore / boto3 / pyarrow error on ``uri`` to a one-line, redacted StorageError."""
    uri = os.fspath(uri)
    text = _describe(exc)
    msg = _s3_message(exc, text, uri, action) if is_s3(uri) else _local_message(exc, text, uri, action)
    if isinstance(msg, StorageError):
        return msg
    return StorageError(redact(" ".join(msg.split())))


# I/O failures only (pyarrow's I/O errors are OSErrors; botocore's come from the boto3 paths in s3api). Content
# errors such as pyarrow.ArrowInvalid for a file that is not Parquet pass through, so callers can report them
# as data problems.
_MAPPED = (OSError, botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError, boto3.exceptions.Boto3Error)


@contextlib.contextmanager
def mapped_errors(uri: str, action: str):
    """Turn any storage-layer exception inside the block into a StorageError (the cause is dropped: its text
    may carry details we do not want in logs; the message keeps a redacted summary)."""
    try:
        yield
    except StorageError:
        raise
    except _MAPPED as exc:
        raise as_storage_error(exc, uri, action) from None


def not_found(path: str) -> FileNotFoundError:
    """The error pyarrow itself raises for a missing path, for checks we make before calling it."""
    return FileNotFoundError(2, "Path does not exist", path)

"""Storage: the one module every artifact (data, checkpoints, adapters, predictions, metrics) goes through.

A location is either a local path or an ``s3://bucket/prefix`` URI on any S3-compatible endpoint, so a job runs
unchanged on a laptop, against MinIO/moto, or on AWS. The endpoint comes from ``AWS_ENDPOINT_URL_S3`` /
``AWS_ENDPOINT_URL``, the region from ``AWS_DEFAULT_REGION`` / ``AWS_REGION`` (default us-east-1) and the
credentials from the standard AWS chain; credentials are never passed around, logged or written.

Guarantees:
* Writes are atomic: a reader sees the old content or the new, never a partial file (local: temp file in the
  same directory + fsync + ``os.replace``; S3: the whole object in one PUT).
* Every I/O failure surfaces as a one-line :class:`StorageError` naming the location and the fix, with secret
  values redacted, and an unreachable endpoint fails in seconds rather than minutes.
* :func:`claim_run_dir` stops a run from silently overwriting another run's outputs.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import shutil
import threading
import uuid
from collections.abc import Callable, Iterable
from typing import Any, BinaryIO
from urllib.parse import urlsplit

import boto3.exceptions
import botocore.exceptions
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from phi2sum.errors import StorageError

RUN_MARKER = "_phi2sum_run.json"
"""Name of the file that records which run owns an output directory (leading ``_`` keeps it out of datasets)."""

# Short limits so a dead endpoint fails in ~10 s instead of minutes of SDK retries. REQUEST_TIMEOUT_S is a
# "no bytes for this long" limit, so it does not cut off a large transfer that is still moving.
CONNECT_TIMEOUT_S = 5.0
REQUEST_TIMEOUT_S = 10.0
MAX_ATTEMPTS = 2
# Files up to this size are uploaded with one PutObject (S3's single-PUT limit is 5 GiB); larger ones use a
# multipart upload, which S3 also publishes atomically when it completes.
SINGLE_PUT_LIMIT = 4 * 1024**3

_SECRET_VARS = ("AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID", "AWS_SESSION_TOKEN")
_CLIENT_CACHE: dict[tuple, Any] = {}
_FS_CACHE: dict[tuple, pafs.S3FileSystem] = {}
_LOCK = threading.Lock()


# ----------------------------------------------------------------------------------------------- locations


def is_s3(uri: str | os.PathLike) -> bool:
    """True for ``s3://`` URIs; everything else is a local path."""
    return os.fspath(uri).startswith("s3://")


def join(uri: str | os.PathLike, *parts: str) -> str:
    """Join path parts onto a local path or S3 URI with single slashes (``os.path.join`` would break ``s3://``)."""
    uri = os.fspath(uri)
    pieces = [re.sub("/+", "/", os.fspath(p)).strip("/") for p in parts]
    pieces = [p for p in pieces if p]
    if not pieces:
        return uri
    return "/".join([uri.rstrip("/"), *pieces])


def _split_s3(uri: str) -> tuple[str, str]:
    """``s3://bucket/a/b/`` -> ``("bucket", "a/b")``."""
    bucket, _, key = uri[len("s3://"):].strip("/").partition("/")
    if not bucket:
        raise StorageError(f"invalid S3 URI {uri!r}: write it as s3://bucket/prefix")
    return bucket, key.strip("/")


def _local_path(uri: str | os.PathLike) -> str:
    """Absolute local path; accepts ``file://`` URIs and ``~``."""
    path = os.fspath(uri)
    if path.startswith("file://"):
        path = path[len("file://"):]
    return os.path.abspath(os.path.expanduser(path))


# ----------------------------------------------------------------------------------------------- S3 clients


def _endpoint() -> str | None:
    """The configured endpoint URL; the S3-specific variable wins, as in the AWS SDKs."""
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint and "://" not in endpoint:
        endpoint = "https://" + endpoint
    return endpoint.rstrip("/") if endpoint else None


def _region() -> str:
    return os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION") or "us-east-1"


def _cache_key() -> tuple:
    """Endpoint + region + a fingerprint of the credentials, so changing any of them builds a new client."""
    creds = "\0".join(os.environ.get(var, "") for var in _SECRET_VARS)
    return (_endpoint(), _region(), hashlib.sha256(creds.encode()).hexdigest())


def _describe_endpoint() -> str:
    return _endpoint() or f"AWS S3 ({_region()})"


def clear_cache() -> None:
    """Forget cached S3 clients and filesystems (tests switch endpoints and credentials)."""
    with _LOCK:
        _FS_CACHE.clear()
        _CLIENT_CACHE.clear()


def _s3_filesystem() -> pafs.S3FileSystem:
    key = _cache_key()
    with _LOCK:
        fs = _FS_CACHE.get(key)
        if fs is None:
            endpoint, region, _ = key
            kwargs: dict[str, Any] = {
                "region": region,
                "connect_timeout": CONNECT_TIMEOUT_S,
                "request_timeout": REQUEST_TIMEOUT_S,
                "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=MAX_ATTEMPTS),
            }
            if endpoint:
                parts = urlsplit(endpoint)
                kwargs["endpoint_override"] = parts.netloc + parts.path
                kwargs["scheme"] = parts.scheme
            ca_bundle = os.environ.get("AWS_CA_BUNDLE")
            if ca_bundle and os.path.isfile(ca_bundle):
                kwargs["tls_ca_file_path"] = ca_bundle
            # No keys passed: the AWS chain reads them, and a pickled filesystem (sent to Ray workers) stays
            # free of secrets.
            fs = _FS_CACHE[key] = pafs.S3FileSystem(**kwargs)
    return fs


def s3_client():
    """A boto3 S3 client for the same endpoint/region/credentials as :func:`filesystem`.

    Used where pyarrow cannot help: single-PUT writes and error details such as a missing bucket.
    """
    key = _cache_key()
    with _LOCK:
        client = _CLIENT_CACHE.get(key)
        if client is None:
            from botocore.config import Config

            endpoint, region, _ = key
            config = Config(
                connect_timeout=CONNECT_TIMEOUT_S,
                read_timeout=REQUEST_TIMEOUT_S,
                retries={"total_max_attempts": MAX_ATTEMPTS, "mode": "standard"},
                s3={"addressing_style": "path"} if endpoint else None,
                # Only checksum when the API requires it: several S3-compatible stores reject the newer
                # default checksum headers.
                request_checksum_calculation="when_required",
                response_checksum_validation="when_required",
            )
            # A fresh session: the default session caches credentials it resolved earlier.
            session = boto3.session.Session()
            client = _CLIENT_CACHE[key] = session.client("s3", endpoint_url=endpoint, region_name=region, config=config)
    return client


def filesystem(uri: str | os.PathLike) -> tuple[pafs.FileSystem, str]:
    """The pyarrow filesystem for ``uri`` and the path inside it.

    For S3 the path is ``bucket/key`` (no ``s3://``): the form pyarrow, Ray Data and Ray Train's
    ``storage_filesystem`` expect alongside a filesystem object.
    """
    uri = os.fspath(uri)
    if is_s3(uri):
        bucket, key = _split_s3(uri)
        return _s3_filesystem(), f"{bucket}/{key}" if key else bucket
    return pafs.LocalFileSystem(), _local_path(uri)


def _to_uri(uri: str, fs_path: str) -> str:
    """Turn a path returned by the filesystem back into a URI of the same kind as ``uri``."""
    return f"s3://{fs_path}" if is_s3(uri) else fs_path


# ----------------------------------------------------------------------------------------------- errors


def redact(text: str) -> str:
    """Replace the values of the AWS secret environment variables in ``text`` with ``***``.

    Values under 4 characters are left alone: they cannot be hidden meaningfully and would garble every message.
    """
    values = {os.environ.get(var, "") for var in _SECRET_VARS}
    for value in sorted((v for v in values if len(v) >= 4), key=len, reverse=True):
        text = text.replace(value, "***")
    return text


_UNREACHABLE = re.compile(
    r"NETWORK_CONNECTION|curlCode: (6|7|28)\b|Could not connect|Couldn't connect|Timeout was reached"
    r"|Could not resolve|Connection refused|timed out",
    re.IGNORECASE,
)
_BAD_KEY_ID = re.compile(r"INVALID_ACCESS_KEY_ID|InvalidAccessKeyId")
_BAD_SECRET = re.compile(r"SIGNATURE_DOES_NOT_MATCH|SignatureDoesNotMatch")
_BAD_TOKEN = re.compile(r"EXPIRED_TOKEN|ExpiredToken|InvalidToken|TokenRefreshRequired")
_DENIED = re.compile(r"ACCESS_DENIED|AccessDenied|HTTP status 403|\(403\)|\b403 Forbidden|Unable to locate credentials")
_NO_BUCKET = re.compile(r"NO_SUCH_BUCKET|NoSuchBucket|specified bucket does not exist", re.IGNORECASE)
_NOT_FOUND = re.compile(r"NO_SUCH_KEY|NoSuchKey|Path does not exist|\(404\)|Not Found", re.IGNORECASE)


def _bucket_missing(bucket: str) -> bool:
    """True only when the server says the bucket does not exist (any other answer: don't know -> False)."""
    try:
        s3_client().head_bucket(Bucket=bucket)
    except botocore.exceptions.ClientError as exc:
        code = str(exc.response.get("Error", {}).get("Code", ""))
        return code in ("404", "NoSuchBucket", "NotFound")
    except Exception:  # noqa: BLE001 - only refines an error message
        return False
    return False


def _no_bucket_error(bucket: str, uri: str, action: str) -> StorageError:
    return StorageError(redact(f"S3 bucket '{bucket}' does not exist at {_describe_endpoint()} (needed to "
                               f"{action} {uri}): create the bucket or fix the bucket name"))


def as_storage_error(exc: BaseException, uri: str, action: str = "access") -> StorageError:
    """Map an OSError / botocore / boto3 / pyarrow error on ``uri`` to a one-line, redacted StorageError."""
    uri = os.fspath(uri)
    text = f"{type(exc).__name__}: {exc}"
    if isinstance(exc, botocore.exceptions.ClientError):
        error = exc.response.get("Error", {})
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        text += f" [{error.get('Code', '')}] ({status})"
    text = " ".join(text.split())
    detail = redact(text)[:300]

    if is_s3(uri):
        endpoint = _describe_endpoint()
        try:
            bucket = _split_s3(uri)[0]
        except StorageError:
            bucket = "?"
        unreachable = isinstance(
            exc, (botocore.exceptions.ConnectionError, botocore.exceptions.HTTPClientError, TimeoutError)
        ) or bool(_UNREACHABLE.search(text))
        if unreachable:
            msg = (f"cannot reach S3 endpoint {endpoint} to {action} {uri}: "
                   f"check AWS_ENDPOINT_URL and that the server is up")
        elif isinstance(exc, botocore.exceptions.NoCredentialsError):
            msg = (f"no AWS credentials found to {action} {uri}: "
                   f"set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY")
        elif _BAD_KEY_ID.search(text):
            msg = (f"S3 endpoint {endpoint} does not know the access key id used to {action} {uri}: "
                   f"check AWS_ACCESS_KEY_ID (and AWS_SECRET_ACCESS_KEY)")
        elif _BAD_SECRET.search(text):
            msg = (f"S3 endpoint {endpoint} rejected the request signature to {action} {uri}: "
                   f"check that AWS_SECRET_ACCESS_KEY belongs to AWS_ACCESS_KEY_ID")
        elif _BAD_TOKEN.search(text):
            msg = (f"S3 endpoint {endpoint} rejected the session token used to {action} {uri}: "
                   f"refresh AWS_SESSION_TOKEN or unset it")
        elif _DENIED.search(text):
            msg = (f"access denied by S3 endpoint {endpoint} to {action} {uri}: check AWS_ACCESS_KEY_ID / "
                   f"AWS_SECRET_ACCESS_KEY and that they may use bucket '{bucket}'")
        elif _NO_BUCKET.search(text) or (
            (isinstance(exc, FileNotFoundError) or _NOT_FOUND.search(text)) and _bucket_missing(bucket)
        ):
            return _no_bucket_error(bucket, uri, action)
        elif isinstance(exc, FileNotFoundError) or _NOT_FOUND.search(text):
            msg = f"not found: {uri} (while trying to {action} it): check the URI, or run the step that writes it"
        else:
            msg = f"cannot {action} {uri} on S3 endpoint {endpoint}: {detail}"
    elif isinstance(exc, PermissionError):
        msg = (f"permission denied to {action} {uri}: fix the file permissions "
               f"or choose a location you can write to")
    elif isinstance(exc, (FileNotFoundError, NotADirectoryError)):
        msg = f"not found: {uri} (while trying to {action} it): check the path, or run the step that writes it"
    else:
        msg = f"cannot {action} {uri}: {detail}"
    return StorageError(redact(" ".join(msg.split())))


# I/O failures only (pyarrow's I/O errors are OSErrors). Content errors such as pyarrow.ArrowInvalid for a file
# that is not Parquet pass through, so callers can report them as data problems.
_MAPPED = (OSError, botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError, boto3.exceptions.Boto3Error)


@contextlib.contextmanager
def _errors(uri: str, action: str):
    """Turn any storage-layer exception inside the block into a StorageError (the cause is dropped: its text
    may carry details we do not want in logs; the message keeps a redacted summary)."""
    try:
        yield
    except StorageError:
        raise
    except _MAPPED as exc:
        raise as_storage_error(exc, uri, action) from None


def _not_found(path: str) -> FileNotFoundError:
    return FileNotFoundError(2, "Path does not exist", path)


# ----------------------------------------------------------------------------------------------- writes


def _fsync_dir(path: str) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _atomic_write(uri: str, fill: Callable[[BinaryIO], None]) -> None:
    """Write what ``fill`` produces so that readers never see a partial file; an exception in ``fill`` leaves
    the old content in place."""
    uri = os.fspath(uri)
    if is_s3(uri):
        bucket, key = _split_s3(uri)
        if not key:
            raise StorageError(f"cannot write {uri}: give an object key, e.g. {join(uri, 'file')}")
        buffer = io.BytesIO()
        fill(buffer)  # produce everything first: a failure here sends nothing
        with _errors(uri, "write"):
            s3_client().put_object(Bucket=bucket, Key=key, Body=buffer.getvalue())
        return

    path = _local_path(uri)
    parent = os.path.dirname(path)
    tmp = os.path.join(parent, f".{os.path.basename(path)}.{uuid.uuid4().hex[:12]}.tmp")
    with _errors(uri, "write"):
        os.makedirs(parent, exist_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # umask applies, unlike mkstemp
        try:
            with os.fdopen(fd, "wb") as handle:
                fill(handle)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        _fsync_dir(parent)


def write_bytes(uri: str | os.PathLike, data: bytes | bytearray | memoryview | Iterable[bytes]) -> None:
    """Atomically write ``data`` (bytes, or an iterable of byte chunks) to ``uri``."""
    chunks = [data] if isinstance(data, (bytes, bytearray, memoryview)) else data

    def fill(handle: BinaryIO) -> None:
        for chunk in chunks:
            handle.write(chunk)

    _atomic_write(uri, fill)


def write_text(uri: str | os.PathLike, text: str) -> None:
    """Atomically write UTF-8 text."""
    write_bytes(uri, text.encode("utf-8"))


def write_json(uri: str | os.PathLike, obj: Any) -> None:
    """Atomically write ``obj`` as indented JSON (serialised first, so a bad object leaves the old file)."""
    write_text(uri, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def write_parquet(table: pa.Table, uri: str | os.PathLike) -> None:
    """Atomically write ``table`` as one Parquet file."""
    _atomic_write(uri, lambda handle: pq.write_table(table, handle))


# ----------------------------------------------------------------------------------------------- reads


def read_bytes(uri: str | os.PathLike) -> bytes:
    """Read a whole file."""
    uri = os.fspath(uri)
    fs, path = filesystem(uri)
    with _errors(uri, "read"):
        with fs.open_input_stream(path) as stream:
            return stream.read()


def read_text(uri: str | os.PathLike) -> str:
    """Read a UTF-8 text file."""
    return read_bytes(uri).decode("utf-8")


def read_json(uri: str | os.PathLike) -> Any:
    """Read a JSON file."""
    text = read_text(uri)
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise StorageError(f"{os.fspath(uri)} is not valid JSON ({exc}): fix or delete the file") from None


def exists(uri: str | os.PathLike) -> bool:
    """True if ``uri`` is a file or a non-empty directory/prefix."""
    uri = os.fspath(uri)
    fs, path = filesystem(uri)
    with _errors(uri, "check"):
        return fs.get_file_info(path).type != pafs.FileType.NotFound


def list_files(uri: str | os.PathLike) -> list[str]:
    """All files under ``uri`` (recursive) as sorted full URIs; ``[]`` for a missing directory.

    A missing S3 bucket raises instead of looking empty, so a typo in the bucket name is not mistaken for
    "no outputs yet".
    """
    uri = os.fspath(uri)
    fs, path = filesystem(uri)
    with _errors(uri, "list"):
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.File:
            return [_to_uri(uri, info.path)]
        if info.type == pafs.FileType.NotFound:
            infos = []
        else:
            infos = fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
    files = sorted(_to_uri(uri, i.path) for i in infos if i.type == pafs.FileType.File)
    if not files and is_s3(uri):
        bucket = _split_s3(uri)[0]
        if _bucket_missing(bucket):
            raise _no_bucket_error(bucket, uri, "list")
    return files


def list_relative(uri: str | os.PathLike) -> list[str]:
    """The files under ``uri`` as sorted ``/``-separated paths relative to it, whatever form ``uri`` has
    (a relative or ``~`` local path comes back from :func:`list_files` absolute)."""
    uri = os.fspath(uri)
    base = _to_uri(uri, filesystem(uri)[1]).rstrip("/") + "/"
    return [f[len(base):] for f in list_files(uri) if f.startswith(base)]


def delete(uri: str | os.PathLike) -> None:
    """Delete a file or a whole tree; a missing one is fine. ``s3://bucket`` empties the bucket but keeps it."""
    uri = os.fspath(uri)
    fs, path = filesystem(uri)
    with _errors(uri, "delete"):
        kind = fs.get_file_info(path).type
        if kind == pafs.FileType.File:
            fs.delete_file(path)
        elif kind == pafs.FileType.Directory:
            if is_s3(uri) and "/" not in path:
                fs.delete_dir_contents(path)
            else:
                fs.delete_dir(path)


def _skipped(relpath: str) -> bool:
    """Files Spark/Ray/our writers keep beside data: markers (``_SUCCESS``, ``_phi2sum_run.json``), temp files."""
    return any(part.startswith(("_", ".")) for part in relpath.split("/"))


def read_parquet(uri: str | os.PathLike) -> pa.Table:
    """Read one Parquet file, or every Parquet file under a directory as one table (sorted by file name,
    skipping names that start with ``_`` or ``.``)."""
    uri = os.fspath(uri)
    fs, path = filesystem(uri)
    with _errors(uri, "read"):
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.NotFound:
            raise _not_found(path)
        if info.type == pafs.FileType.File:
            return pq.read_table(path, filesystem=fs)
        infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
        files = sorted(
            i.path for i in infos
            if i.type == pafs.FileType.File and not _skipped(i.path[len(path):].lstrip("/"))
        )
        if not files:
            raise StorageError(f"no Parquet files under {uri}: check the path, or run the step that writes them")
        return pads.dataset(files, filesystem=fs, format="parquet").to_table()


# ----------------------------------------------------------------------------------------------- directories


def _replace_local_dir(dest: str, fill: Callable[[str], None]) -> None:
    """Build a directory with ``fill(tmp_dir)`` beside ``dest``, then swap it in with renames, so ``dest`` is
    always either the old tree or the complete new one."""
    parent, name = os.path.split(dest)
    os.makedirs(parent, exist_ok=True)
    tag = uuid.uuid4().hex[:12]
    tmp = os.path.join(parent, f".{name}.{tag}.tmp")
    old = os.path.join(parent, f".{name}.{tag}.old")
    os.mkdir(tmp)
    try:
        fill(tmp)
        if os.path.lexists(dest):
            os.replace(dest, old)
            try:
                os.replace(tmp, dest)
            except BaseException:
                os.replace(old, dest)
                raise
            if os.path.isdir(old) and not os.path.islink(old):
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.unlink(old)
        else:
            os.replace(tmp, dest)
        _fsync_dir(parent)
    finally:
        if os.path.lexists(tmp):
            shutil.rmtree(tmp, ignore_errors=True)


def upload_dir(local_dir: str | os.PathLike, uri: str | os.PathLike) -> None:
    """Copy a local directory tree to ``uri`` so that ``uri`` ends up holding exactly its files.

    S3: each file is one atomic PUT, then objects under the prefix that the source no longer has are removed.
    Local: the tree is built beside the target and renamed into place.
    """
    src = _local_path(local_dir)
    uri = os.fspath(uri)
    if not os.path.isdir(src):
        raise StorageError(f"cannot upload {local_dir}: it is not a directory; check the path")
    files = sorted(
        os.path.relpath(os.path.join(root, name), src).replace(os.sep, "/")
        for root, _, names in os.walk(src)
        for name in names
    )
    if is_s3(uri):
        from boto3.s3.transfer import TransferConfig

        bucket, prefix = _split_s3(uri)
        if not prefix:
            raise StorageError(f"cannot upload {local_dir} to the bucket root {uri}: give a prefix, "
                               f"e.g. {join(uri, 'name')}")
        config = TransferConfig(multipart_threshold=SINGLE_PUT_LIMIT)
        with _errors(uri, "upload to"):
            for rel in files:
                s3_client().upload_file(os.path.join(src, rel), bucket, f"{prefix}/{rel}", Config=config)
            stale = sorted(set(list_files(uri)) - {join(uri, rel) for rel in files})
            for start in range(0, len(stale), 1000):  # DeleteObjects takes at most 1000 keys
                batch = [{"Key": _split_s3(u)[1]} for u in stale[start:start + 1000]]
                s3_client().delete_objects(Bucket=bucket, Delete={"Objects": batch, "Quiet": True})
        return

    dest = _local_path(uri)
    if os.path.commonpath([src, dest]) in (src, dest):
        raise StorageError(f"cannot upload {src} to {dest}: one contains the other; choose another destination")
    with _errors(uri, "upload to"):
        _replace_local_dir(dest, lambda tmp: shutil.copytree(src, tmp, dirs_exist_ok=True))


def download_dir(uri: str | os.PathLike, local_dir: str | os.PathLike) -> None:
    """Copy the tree at ``uri`` (S3 prefix or local directory) to ``local_dir``, replacing it atomically."""
    uri = os.fspath(uri)
    fs, path = filesystem(uri)
    dest = _local_path(local_dir)
    with _errors(uri, "download"):
        kind = fs.get_file_info(path).type
        if kind == pafs.FileType.NotFound:
            raise _not_found(path)
        if kind == pafs.FileType.File:
            raise StorageError(f"cannot download {uri} as a directory: it is a file; use read_bytes")
        if not is_s3(uri):
            if os.path.commonpath([path, dest]) in (path, dest):
                raise StorageError(f"cannot copy {path} to {dest}: one contains the other; choose another destination")
            _replace_local_dir(dest, lambda tmp: shutil.copytree(path, tmp, dirs_exist_ok=True))
        else:
            _replace_local_dir(dest, lambda tmp: pafs.copy_files(
                path, tmp, source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem()))


# ----------------------------------------------------------------------------------------------- run ownership


def claim_run_dir(uri: str | os.PathLike, run_id: str, resume: bool = True) -> bool:
    """Make ``uri`` the output directory of run ``run_id``, so one run never silently overwrites another's.

    Writes ``<uri>/_phi2sum_run.json`` when the directory is empty or missing and returns True. Returns False
    when the marker already names ``run_id`` (a rerun or resume). Raises StorageError when the marker names
    another run, when the directory holds files but no marker, or (``resume=False``) when an earlier attempt
    of the same run already left outputs there.
    """
    uri = os.fspath(uri)
    marker = join(uri, RUN_MARKER)
    marker_listed = _to_uri(uri, filesystem(marker)[1])  # the form list_files returns (absolute if local)
    fix = "choose another run.name/output location, or delete it"
    if exists(marker):
        owner = read_json(marker)
        owner = owner.get("run_id") if isinstance(owner, dict) else None
        if owner != run_id:
            raise StorageError(f"{uri} already holds another run's outputs (run '{owner}'): {fix}")
        if not resume and set(list_files(uri)) != {marker_listed}:
            raise StorageError(f"{uri} already holds outputs of an earlier attempt of run '{run_id}' and resume "
                               f"is off: enable resume, {fix}")
        return False
    existing = list_files(uri)
    if existing:
        raise StorageError(f"{uri} already holds another run's outputs ({len(existing)} files, e.g. "
                           f"{existing[0]}, and no {RUN_MARKER}): {fix}")
    write_json(marker, {"run_id": run_id})
    owner = read_json(marker).get("run_id")  # narrows the window for two runs claiming at once
    if owner != run_id:
        raise StorageError(f"{uri} was just claimed by another run (run '{owner}'): {fix}")
    return True

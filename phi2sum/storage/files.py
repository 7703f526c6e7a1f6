"""Files: atomic writes, reads, existence, listing and deletion, the same calls for local paths and S3 URIs.

Writes are atomic, so a reader (a resumed run, a report, another Ray worker) sees the old content or the new,
never a partial file: locally a temp file in the same directory + fsync + ``os.replace``; on S3 the whole
object is produced in memory first and sent in one request, so a failure while producing it sends nothing and
a failed upload leaves the old object in place.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import uuid
from collections.abc import Callable, Iterable
from typing import Any, BinaryIO

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq

import phi2sum.storage.s3api as s3api
from phi2sum.errors import StorageError
from phi2sum.storage.errors import mapped_errors, no_bucket_error, not_found
from phi2sum.storage.fs import bucket_missing, filesystem
from phi2sum.storage.uris import is_s3, join, local_path, split_s3, to_uri


# ----------------------------------------------------------------------------------------------- writes


def fsync_dir(path: str) -> None:
    """Make a rename in ``path`` durable; best effort (some filesystems cannot fsync a directory)."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _object_key(uri: str) -> tuple[str, str]:
    bucket, key = split_s3(uri)
    if not key:
        raise StorageError(f"cannot write {uri}: give an object key, e.g. {join(uri, 'file')}")
    return bucket, key


def put_s3(uri: str, source: bytes | str, action: str = "write") -> None:
    """Make ``source`` (bytes, or the path of a local file) the S3 object ``uri``, atomically.

    boto3, not pyarrow's output stream: that one cannot abort an upload and is slow to notice a hung server
    (measured; see :mod:`phi2sum.storage.s3api`).
    """
    bucket, key = _object_key(uri)
    with mapped_errors(uri, action):
        if isinstance(source, bytes):
            s3api.put_object(bucket, key, source)
        else:
            s3api.upload_file(source, bucket, key)


def _write_local(uri: str, fill: Callable[[BinaryIO], None]) -> None:
    # Plain os calls, not pyarrow: its local output stream has no fsync, and the rename is what makes it atomic.
    path = local_path(uri)
    parent = os.path.dirname(path)
    tmp = os.path.join(parent, f".{os.path.basename(path)}.{uuid.uuid4().hex[:12]}.tmp")
    with mapped_errors(uri, "write"):
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
        fsync_dir(parent)


def atomic_write(uri: str | os.PathLike, fill: Callable[[BinaryIO], None]) -> None:
    """Write what ``fill`` produces so that readers never see a partial file; an exception in ``fill`` leaves
    the old content in place."""
    uri = os.fspath(uri)
    if not is_s3(uri):
        _write_local(uri, fill)
        return
    _object_key(uri)
    buffer = io.BytesIO()
    fill(buffer)  # produce everything first: a failure here sends nothing
    put_s3(uri, buffer.getvalue())


def write_bytes(uri: str | os.PathLike, data: bytes | bytearray | memoryview | Iterable[bytes]) -> None:
    """Atomically write ``data`` (bytes, or an iterable of byte chunks) to ``uri``."""
    chunks = [data] if isinstance(data, (bytes, bytearray, memoryview)) else data

    def fill(handle: BinaryIO) -> None:
        for chunk in chunks:
            handle.write(chunk)

    atomic_write(uri, fill)


def write_text(uri: str | os.PathLike, text: str) -> None:
    """Atomically write UTF-8 text."""
    write_bytes(uri, text.encode("utf-8"))


def write_json(uri: str | os.PathLike, obj: Any) -> None:
    """Atomically write ``obj`` as indented JSON (serialised first, so a bad object leaves the old file)."""
    write_text(uri, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def write_parquet(table: pa.Table, uri: str | os.PathLike) -> None:
    """Atomically write ``table`` as one Parquet file."""
    atomic_write(uri, lambda handle: pq.write_table(table, handle))


# ----------------------------------------------------------------------------------------------- reads


def read_bytes(uri: str | os.PathLike) -> bytes:
    """Read a whole file."""
    uri = os.fspath(uri)
    fs, path = filesystem(uri)
    with mapped_errors(uri, "read"):
        with fs.open_input_stream(path) as stream:
            return stream.read()


def read_text(uri: str | os.PathLike) -> str:
    """Read a UTF-8 text file."""
    return read_bytes(uri).decode("utf-8")


def read_json(uri: str | os.PathLike) -> Any:
    """Read a JSON file; a corrupt one is a StorageError saying so, not a JSONDecodeError from deep inside."""
    text = read_text(uri)
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise StorageError(f"{os.fspath(uri)} is not valid JSON ({exc}): fix or delete the file") from None


def existing(uri: str, action: str) -> tuple[pafs.FileSystem, str, pafs.FileType]:
    """The filesystem, path and kind (file or directory) of ``uri``; a missing one raises the same one-line
    "not found" StorageError as a failed read of it would."""
    fs, path = filesystem(uri)
    with mapped_errors(uri, action):
        kind = fs.get_file_info(path).type
        if kind == pafs.FileType.NotFound:
            raise not_found(path)
    return fs, path, kind


def read_parquet(uri: str | os.PathLike, columns: list[str] | None = None) -> pa.Table:
    """Read one Parquet file, or every Parquet file under a directory as one table (in path order, skipping
    files and folders whose names start with ``_`` or ``.``: markers such as ``_SUCCESS`` and temp files).
    `columns`: only these (Parquet is columnar: the others are not even downloaded)."""
    uri = os.fspath(uri)
    fs, path, kind = existing(uri, "read")
    with mapped_errors(uri, "read"):
        if kind == pafs.FileType.File:
            return pq.read_table(path, filesystem=fs, columns=columns)
        dataset = pads.dataset(path, filesystem=fs, format="parquet")  # skips _/. names, sorts by path
        if not dataset.files:
            raise StorageError(f"no Parquet files under {uri}: check the path, or run the step that writes them")
        return dataset.to_table(columns=columns)


def parquet_columns(uri: str | os.PathLike) -> list[str]:
    """The column names of one Parquet file, from its footer (nothing else is read)."""
    uri = os.fspath(uri)
    fs, path, _ = existing(uri, "read")
    with mapped_errors(uri, "read"), fs.open_input_file(path) as handle:
        return pq.read_schema(handle).names


# ----------------------------------------------------------------------------------------------- listing


def exists(uri: str | os.PathLike) -> bool:
    """True if ``uri`` is a file or a non-empty directory/prefix."""
    uri = os.fspath(uri)
    fs, path = filesystem(uri)
    with mapped_errors(uri, "check"):
        return fs.get_file_info(path).type != pafs.FileType.NotFound


def list_files(uri: str | os.PathLike) -> list[str]:
    """All files under ``uri`` (recursive) as sorted full URIs; ``[]`` for a missing directory.

    A missing S3 bucket raises instead of looking empty, so a typo in the bucket name is not mistaken for
    "no outputs yet".
    """
    uri = os.fspath(uri)
    fs, path = filesystem(uri)
    with mapped_errors(uri, "list"):
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.File:
            return [to_uri(uri, info.path)]
        infos = [] if info.type == pafs.FileType.NotFound else fs.get_file_info(
            pafs.FileSelector(path, recursive=True, allow_not_found=True))
    files = sorted(to_uri(uri, i.path) for i in infos if i.type == pafs.FileType.File)
    if not files and is_s3(uri):
        bucket = split_s3(uri)[0]
        if bucket_missing(bucket):
            raise no_bucket_error(bucket, uri, "list")
    return files


def list_relative(uri: str | os.PathLike) -> list[str]:
    """The files under ``uri`` as sorted ``/``-separated paths relative to it, whatever form ``uri`` has
    (a relative or ``~`` local path comes back from :func:`list_files` absolute)."""
    uri = os.fspath(uri)
    base = to_uri(uri, filesystem(uri)[1]).rstrip("/") + "/"
    return [f[len(base):] for f in list_files(uri) if f.startswith(base)]


def delete(uri: str | os.PathLike) -> None:
    """Delete a file or a whole tree; a missing one is fine. ``s3://bucket`` empties the bucket but keeps it."""
    uri = os.fspath(uri)
    fs, path = filesystem(uri)
    with mapped_errors(uri, "delete"):
        kind = fs.get_file_info(path).type
        if kind == pafs.FileType.File:
            fs.delete_file(path)
        elif kind == pafs.FileType.Directory:
            if is_s3(uri) and "/" not in path:
                fs.delete_dir_contents(path)
            else:
                fs.delete_dir(path)

"""Directory trees: upload a local tree to a location, download a location to a local tree.

An adapter or checkpoint is a folder whose files only make sense together, so the destination ends up
holding exactly the source's files: a local destination is built beside its target and swapped in with
renames (always the old tree or the complete new one); an S3 destination gets each file as one atomic object,
then loses the objects the source no longer has.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import shutil
import sys
import uuid
from collections.abc import Callable

import pyarrow.fs as pafs

import phi2sum.storage.s3api as s3api
from phi2sum.errors import StorageError
from phi2sum.storage.errors import mapped_errors
from phi2sum.faults import maybe_fail
from phi2sum.storage.files import exists, existing, fsync_dir, list_files, put_s3
from phi2sum.storage.uris import is_s3, join, local_path, split_s3

COMPLETE = "_COMPLETE.json"


def replace_local_dir(dest: str, fill: Callable[[str], None]) -> None:
    """Build a directory with ``fill(tmp_dir)`` beside ``dest``, then swap it in, so a reader always finds either
    the old tree or the complete new one at ``dest``, never neither (an exchange of the two names in one
    `renameat2(RENAME_EXCHANGE)`; where the filesystem lacks it, two renames and a short gap)."""
    parent, name = os.path.split(dest)
    os.makedirs(parent, exist_ok=True)
    tag = uuid.uuid4().hex[:12]
    tmp = os.path.join(parent, f".{name}.{tag}.tmp")
    os.mkdir(tmp)
    try:
        fill(tmp)
        if not os.path.lexists(dest):
            os.replace(tmp, dest)
        elif exchange(tmp, dest):
            _remove(tmp)  # now the old tree
        else:
            _swap_with_renames(tmp, dest, os.path.join(parent, f".{name}.{tag}.old"))
        fsync_dir(parent)
    finally:
        if os.path.lexists(tmp):
            _remove(tmp)


def exchange(a: str, b: str) -> bool:
    """Atomically swap two paths (Linux `renameat2` with RENAME_EXCHANGE); False where that is not available."""
    if not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    renameat2 = getattr(libc, "renameat2", None)
    if renameat2 is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    error = ctypes.get_errno()
    if error in (errno.EINVAL, errno.ENOSYS, errno.EXDEV, errno.ENOTSUP):
        return False  # this filesystem or kernel cannot exchange: fall back
    raise OSError(error, os.strerror(error), b)


def _swap_with_renames(new: str, dest: str, old: str) -> None:
    os.replace(dest, old)
    try:
        os.replace(new, dest)
    except BaseException:
        os.replace(old, dest)
        raise
    _remove(old)


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        os.unlink(path)


def _copy_into_local(fs: pafs.FileSystem, src: str, dest: str) -> None:
    """Replace the local directory ``dest`` with a copy of the tree at ``src`` on ``fs``."""
    if isinstance(fs, pafs.LocalFileSystem) and os.path.commonpath([src, dest]) in (src, dest):
        raise StorageError(f"cannot copy {src} to {dest}: one contains the other; choose another destination")
    replace_local_dir(dest, lambda tmp: pafs.copy_files(
        src, tmp, source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem()))


def _relative_files(root: str) -> list[str]:
    return sorted(
        os.path.relpath(os.path.join(d, name), root).replace(os.sep, "/")
        for d, _, names in os.walk(root)
        for name in names
    )


def _upload_to_s3(src: str, uri: str, marker: dict | None) -> None:
    """Each file as one atomic object, then the objects under the prefix that the source no longer has go.

    With a marker the old one goes first and the new one last, so a tree cut off half-way is never complete."""
    bucket, prefix = split_s3(uri)
    if not prefix:
        raise StorageError(f"cannot upload {src} to the bucket root {uri}: give a prefix, "
                           f"e.g. {join(uri, 'name')}")
    files = _relative_files(src)
    if marker is not None:
        with mapped_errors(uri, "upload to"):
            s3api.delete_keys(bucket, [f"{prefix}/{COMPLETE}"])
    for number, rel in enumerate(files, start=1):
        maybe_fail("upload_file", number)  # test-only: cut an upload between two files
        put_s3(join(uri, rel), os.path.join(src, rel), action="upload to")
    keep = {join(uri, rel) for rel in files} | {join(uri, COMPLETE)}
    stale = sorted(set(list_files(uri)) - keep)
    with mapped_errors(uri, "upload to"):
        s3api.delete_keys(bucket, [split_s3(stale_uri)[1] for stale_uri in stale])
    if marker is not None:
        put_s3(join(uri, COMPLETE), json.dumps(marker, sort_keys=True).encode(), action="upload to")


def _fill_local(src: str, marker: dict | None) -> Callable[[str], None]:
    def fill(tmp: str) -> None:
        for number, rel in enumerate(_relative_files(src), start=1):
            maybe_fail("upload_file", number)  # test-only: cut a copy between two files
            os.makedirs(os.path.dirname(os.path.join(tmp, rel)), exist_ok=True)
            shutil.copyfile(os.path.join(src, rel), os.path.join(tmp, rel))
        if marker is not None:
            with open(os.path.join(tmp, COMPLETE), "w", encoding="utf-8") as handle:
                json.dump(marker, handle, sort_keys=True)
    return fill


def upload_dir(local_dir: str | os.PathLike, uri: str | os.PathLike, marker: dict | None = None) -> None:
    """Copy a local directory tree to ``uri`` so that ``uri`` ends up holding exactly its files.

    With `marker` (any JSON object: what made it), ``<uri>/_COMPLETE.json`` is written after every other file, and
    `is_complete(uri)`, which reads that marker alone, is how a multi-file artifact (an adapter, an exported
    model) is known to be done.
    """
    src = local_path(local_dir)
    uri = os.fspath(uri)
    if not os.path.isdir(src):
        raise StorageError(f"cannot upload {local_dir}: it is not a directory; check the path")
    if is_s3(uri):
        _upload_to_s3(src, uri, marker)
        return
    dest = local_path(uri)
    if os.path.commonpath([src, dest]) in (src, dest):
        raise StorageError(f"cannot copy {src} to {dest}: one contains the other; choose another destination")
    with mapped_errors(uri, "upload to"):
        replace_local_dir(dest, _fill_local(src, marker))


def is_complete(uri: str | os.PathLike) -> bool:
    """Whether the folder at `uri` was completely written by `upload_dir(..., marker=...)`."""
    return exists(join(os.fspath(uri), COMPLETE))


def download_dir(uri: str | os.PathLike, local_dir: str | os.PathLike) -> None:
    """Copy the tree at ``uri`` (S3 prefix or local directory) to ``local_dir``, replacing it atomically."""
    uri = os.fspath(uri)
    fs, path, kind = existing(uri, "download")
    if kind == pafs.FileType.File:
        raise StorageError(f"cannot download {uri} as a directory: it is a file; use read_bytes")
    with mapped_errors(uri, "download"):
        _copy_into_local(fs, path, local_path(local_dir))

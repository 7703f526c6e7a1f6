"""Build something once into a shared cache folder, safely under concurrent callers.

Why: an artefact that takes minutes to make (the demo's tiny model, a model converted from another format)
should be made once per machine and then reused, also when several processes (e.g. Ray workers) ask for it
at the same moment, and a build that crashes half-way must never be mistaken for a finished one.

The contract of `cached_build`:
- the result lives in `root/<name>-<key>`, where `key` is a content hash of everything that decides it, so a
  different recipe gets a different folder and never a stale one;
- callers wait on a file lock beside that folder (`root/<name>-<key>.lock`); the first one builds, the others
  then find its result and reuse it;
- the build runs in a hidden temp folder in `root` that is moved into place in one `os.replace`, so the
  folder never shows a half-written result;
- a completion marker file, written last, is the only "done" check: a folder without it is not a build
  (it is removed and rebuilt);
- a failed build leaves nothing behind but the lock file, and the error reaches the caller.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

logger = logging.getLogger(__name__)

DEFAULT_MARKER = "build_complete.json"

Build = Callable[[Path], Mapping[str, Any] | None]  # fills the folder; returns the marker's content


def cache_folder(root: str | os.PathLike, name: str, key: str) -> Path:
    """Where the build of `name` for `key` lives (built or not): one folder per content hash."""
    return Path(root) / f"{name}-{key}"


def is_cached(root: str | os.PathLike, name: str, key: str, marker: str = DEFAULT_MARKER) -> bool:
    """Whether a complete build is already there; cheap, takes no lock and never builds."""
    return (cache_folder(root, name, key) / marker).is_file()


def cached_build(root: str | os.PathLike, name: str, key: str, build: Build, *, marker: str = DEFAULT_MARKER) -> Path:
    """The folder `root/<name>-<key>`, calling `build(folder)` to fill it if no complete build is there.

    `build` receives an empty temp folder and writes the result into it. It must not write `marker`: it may
    return a JSON-serialisable mapping instead (build statistics, provenance), which becomes the marker's
    content (`{}` when it returns None). Anything `build` raises propagates, with the temp folder removed.
    """
    folder = cache_folder(root, name, key)
    if (folder / marker).is_file():  # the common case: no lock, so a read-only cache works too
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(folder.parent / f"{folder.name}.lock"))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        logger.info("waiting for another process to finish building %s", folder)
        lock.acquire()
    try:
        if (folder / marker).is_file():  # another process built it while we waited
            return folder
        if folder.exists():  # left by something other than this function: not a complete build
            logger.warning("removing %s: it has no %s, so it is not a complete build", folder, marker)
            shutil.rmtree(folder)
        _build_into_place(folder, build, marker)
        return folder
    finally:
        lock.release()


def _build_into_place(folder: Path, build: Build, marker: str) -> None:
    """Run `build` in a temp folder beside `folder`, write the marker last, then move it into place."""
    logger.info("building %s (once; later calls reuse it)", folder)
    started = time.monotonic()
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    try:
        info = build(tmp)
        (tmp / marker).write_text(json.dumps(dict(info or {}), indent=2) + "\n")
        _make_readable(tmp)
        os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # a no-op after the move
    logger.info("built %s in %.1f s", folder, time.monotonic() - started)


def _make_readable(tree: Path) -> None:
    """mkdtemp (and some writers, e.g. of weights) make entries private; let the cache be read like any other."""
    tree.chmod(0o755)
    for item in tree.rglob("*"):
        item.chmod(0o755 if item.is_dir() else 0o644)

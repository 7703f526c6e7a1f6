"""Run ownership: an output folder belongs to one run at a time, claimed exclusively and held while it runs.

Two needs meet here. A run must never train beside another under the same name, nor overwrite another's outputs;
and a failed attempt must not block its corrected rerun. One design serves both: the claim file
`_phi2sum_run.json` is created exclusively (`O_EXCL` locally, a conditional PUT `If-None-Match: *` on S3, so of two
runs that start together exactly one wins), names the run (its name and config fingerprint) and its holder (host,
pid, a token), and carries a heartbeat that the holder refreshes while it runs. A later claimant may take the
folder over only when the holder is gone (released, its process dead, or its heartbeat stale) and, if it was
another config, it left no outputs but its claim and config.yaml; the takeover itself is conditional on the claim
it read (an S3 `If-Match` on its ETag, locally a file lock), so two rerunners cannot both take over.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field

import filelock

import phi2sum.storage.s3api as s3api
from phi2sum.errors import StorageError
from phi2sum.storage.errors import mapped_errors
from phi2sum.storage.files import exists, list_relative, write_json
from phi2sum.storage.uris import is_s3, join, local_path, split_s3

log = logging.getLogger(__name__)

RUN_MARKER = "_phi2sum_run.json"
"""The claim file (a leading ``_`` keeps it out of datasets read from the folder)."""
HEARTBEAT_S = 30.0  # how often a holder refreshes its claim
STALE_S = 180.0  # a claim not refreshed for this long belongs to a process that is gone
LOCK_SUFFIX = ".lock"  # beside the claim, for a local takeover
NOT_OUTPUTS = {RUN_MARKER, RUN_MARKER + LOCK_SUFFIX, "config.yaml"}  # what a claim leaves before any work
_FIX = "choose another run.name or output location, or delete that folder"
_ACTIVE: dict[str, "Claim"] = {}  # token -> the claims this process holds


@dataclass
class Claim:
    """A held claim on `uri`; `release()` when the run ends (also on failure), so a rerun need not wait."""

    uri: str
    run_id: str
    record: dict
    created: bool  # a new folder (False: a rerun or resume of the same run, or a takeover)
    _stop: threading.Event = field(default_factory=threading.Event, repr=False)

    def start_heartbeat(self) -> None:
        _ACTIVE[self.record["token"]] = self
        threading.Thread(target=self._beat, name=f"phi2sum-claim-{self.run_id}", daemon=True).start()

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                current, _ = _read(self.uri)
                if not current or current.get("token") != self.record["token"]:
                    log.warning("the claim on %s was taken over; this run no longer holds it", self.uri)
                    return
                _write(self.uri, {**self.record, "heartbeat": time.time()})
            except Exception as exc:  # noqa: BLE001 - a missed beat is retried; the run itself goes on
                log.warning("could not refresh the claim on %s (%s)", self.uri, exc)

    def release(self) -> None:
        """Mark the claim released (the run name and config stay), and stop refreshing it."""
        self._stop.set()
        _ACTIVE.pop(self.record["token"], None)
        try:
            current, _ = _read(self.uri)
            if current and current.get("token") == self.record["token"]:
                _write(self.uri, {**self.record, "released": True, "heartbeat": time.time()})
        except StorageError as exc:
            log.warning("could not release the claim on %s (%s); a rerun waits %ds for it", self.uri, exc, STALE_S)


def claim_run_dir(uri: str | os.PathLike, run_id: str) -> Claim:
    """Claim `uri` for run `run_id` (its `name:fingerprint`), or raise a one-line StorageError saying why not."""
    uri = os.fspath(uri)
    mine = {"run_id": run_id, "token": uuid.uuid4().hex, "host": socket.gethostname(), "pid": os.getpid(),
            "heartbeat": time.time(), "released": False}
    for _ in range(3):  # lost races (another claimant changed the claim between our read and our write) retry
        if _create(uri, mine):
            return _held(uri, run_id, mine, created=True)
        current, version = _read(uri)
        if current is None:
            continue  # released and deleted meanwhile: try to create again
        _check_takeover(uri, run_id, current)
        if _replace(uri, mine, current, version):
            if current.get("run_id") != run_id:
                log.warning("%s: taking over the claim of run '%s', which left no outputs", uri, current.get("run_id"))
            return _held(uri, run_id, mine, created=False)
    raise StorageError(f"{uri} was claimed by another run at the same moment: rerun, or {_FIX}")


def _held(uri: str, run_id: str, record: dict, created: bool) -> Claim:
    claim = Claim(uri, run_id, record, created)
    claim.start_heartbeat()
    return claim


def _check_takeover(uri: str, run_id: str, current: dict) -> None:
    """Raise unless `run_id` may take the folder from the claim `current`."""
    theirs = current.get("run_id")
    if theirs != run_id:
        outputs = sorted(set(list_relative(uri)) - NOT_OUTPUTS)
        if outputs:
            raise StorageError(f"{uri} already holds another run's outputs (run '{theirs}', e.g. {outputs[0]}): {_FIX}")
    if holder_alive(current):
        age = time.time() - float(current.get("heartbeat", 0))
        what = "this run" if theirs == run_id else f"run '{theirs}'"
        raise StorageError(f"{uri} is in use by {what}, still running (pid {current.get('pid')} on "
                           f"{current.get('host')}, seen {age:.0f}s ago): wait for it to finish, or {_FIX}")


def holder_alive(record: dict) -> bool:
    """Is the process that holds this claim still running? Released: no. Same host: ask the OS. Else: heartbeat."""
    if record.get("released"):
        return False
    if record.get("host") == socket.gethostname():
        pid = int(record.get("pid", -1))
        if pid == os.getpid():
            return record.get("token") in _ACTIVE
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True  # alive, another user's
        return True
    return time.time() - float(record.get("heartbeat", 0)) < STALE_S


# --- the claim file: exclusive create, conditional replace ----------------------------------------------------


def _marker(uri: str) -> str:
    return join(uri, RUN_MARKER)


def _unclaimed_files(uri: str) -> list[str]:
    return [f for f in list_relative(uri) if f not in (RUN_MARKER, RUN_MARKER + LOCK_SUFFIX)]


def _create(uri: str, record: dict) -> bool:
    """Create the claim file if there is none; False if one exists. A folder with files but no claim is refused."""
    if not exists(_marker(uri)) and _unclaimed_files(uri):
        files = _unclaimed_files(uri)
        raise StorageError(f"{uri} already holds files but no {RUN_MARKER} ({len(files)} files, e.g. {files[0]}): "
                           f"it is not a phi2sum run folder; {_FIX}")
    body = json.dumps(record).encode()
    if is_s3(uri):
        bucket, key = split_s3(_marker(uri))
        with mapped_errors(uri, "claim"):
            return s3api.put_if_absent(bucket, key, body)
    path = local_path(_marker(uri))
    with mapped_errors(uri, "claim"):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as handle:
            handle.write(body)
            handle.flush()
            os.fsync(handle.fileno())
    return True


def _read(uri: str) -> tuple[dict | None, str | None]:
    """The claim and its version (the S3 ETag; locally None), or (None, None) when there is none."""
    if is_s3(uri):
        bucket, key = split_s3(_marker(uri))
        with mapped_errors(uri, "read the claim of"):
            found = s3api.get_with_etag(bucket, key)
        if found is None:
            return None, None
        body, etag = found
    else:
        try:
            with open(local_path(_marker(uri)), "rb") as handle:
                body, etag = handle.read(), None
        except FileNotFoundError:
            return None, None
    try:
        record = json.loads(body)
    except ValueError:
        raise StorageError(f"{_marker(uri)} is not valid JSON: delete it to free the folder") from None
    if not isinstance(record, dict):
        raise StorageError(f"{_marker(uri)} is not a phi2sum claim: delete it to free the folder")
    return record, etag


def _replace(uri: str, record: dict, seen: dict, version: str | None) -> bool:
    """Overwrite the claim only if it is still the one read (`seen`, at `version`); False if it changed meanwhile."""
    if is_s3(uri):
        bucket, key = split_s3(_marker(uri))
        with mapped_errors(uri, "claim"):
            return s3api.put_if_match(bucket, key, json.dumps(record).encode(), version)
    with filelock.FileLock(local_path(_marker(uri)) + LOCK_SUFFIX, timeout=30):
        if _read(uri)[0] != seen:
            return False
        write_json(_marker(uri), record)
    return True


def _write(uri: str, record: dict) -> None:
    write_json(_marker(uri), record)

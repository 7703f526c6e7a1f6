"""Storage: the one package every artifact (data, checkpoints, adapters, predictions, metrics) goes through.

A location is either a local path or an ``s3://bucket/prefix`` URI on any S3-compatible endpoint, so a job runs
unchanged on a laptop, against MinIO/moto, or on AWS. All I/O goes through one filesystem layer, pyarrow.fs
(:mod:`.fs`); boto3 is kept only for what pyarrow cannot do (:mod:`.s3api`). Credentials come from the standard
AWS chain and are never passed around, logged or written.

Guarantees:
* Writes are atomic: a reader sees the old content or the new, never a partial file (:mod:`.files`).
* Every I/O failure surfaces as a one-line :class:`StorageError` naming the location and the fix, with secret
  values redacted, and an unreachable endpoint fails in seconds rather than minutes (:mod:`.errors`).
* :func:`claim_run_dir` stops a run from silently overwriting another run's outputs (:mod:`.claims`).

Modules: uris (location strings), fs (the filesystems), errors (one-line errors), s3api (boto3), files (single
files), dirs (directory trees), claims (run ownership).
"""

from __future__ import annotations

from phi2sum.storage import fs
from phi2sum.storage.claims import RUN_MARKER, Claim, claim_run_dir, holder_alive
from phi2sum.storage.dirs import COMPLETE, download_dir, is_complete, upload_dir
from phi2sum.storage.errors import as_storage_error, redact
from phi2sum.storage.files import (delete, exists, list_files, list_relative, parquet_columns, read_bytes, read_json,
                                   read_parquet, read_text, write_bytes, write_json, write_parquet, write_text)
from phi2sum.storage.fs import clear_cache, filesystem
from phi2sum.storage.s3api import SINGLE_PUT_LIMIT, s3_client
from phi2sum.storage.uris import is_s3, join

__all__ = [
    "COMPLETE", "Claim", "RUN_MARKER", "SINGLE_PUT_LIMIT", "fs", "holder_alive", "is_complete",
    "as_storage_error", "claim_run_dir", "clear_cache", "delete", "download_dir", "exists", "filesystem",
    "is_s3", "join", "list_files", "list_relative", "parquet_columns", "read_bytes", "read_json", "read_parquet",
    "read_text",
    "redact", "s3_client", "upload_dir", "write_bytes", "write_json", "write_parquet", "write_text",
]


"""Splits: the seeded subset of a source's split that a job trains or summarizes, the same wherever it runs.

The subset is chosen by a seeded hash of each record's id, not by row position, so it does not depend on how the
source is stored or read: local mode and the Ray summarize job (which streams the source in blocks) pick the same
records for the same `data.num_eval`. Only the rows needed are converted to Python, so a 200k-row hub split costs
little more than its subset; when train and eval come from the same records, eval is held out of training.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass

import pyarrow as pa

from phi2sum.config import DataSettings
from phi2sum.data.records import (DataStats, check_unique_ids, column_map, columns_of, mapped_rows, valid_id,
                                  validate_records)
from phi2sum.data.sources import BAD_ROW, Raw, is_file_source, read_raw, source_files, split_source, splits_of
from phi2sum.errors import DataError

log = logging.getLogger(__name__)

CHUNK = 4096  # rows converted to Python at a time


@dataclass
class Split:
    records: list[dict[str, str]]
    stats: DataStats


def subset_rank(record_id: str | None, seed: int, row: int) -> str:
    """The order in which records enter a seeded subset (records without an id rank by their row)."""
    key = f"{seed}\0id\0{record_id}" if record_id is not None else f"{seed}\0row\0{row}"
    return hashlib.sha1(key.encode("utf-8")).hexdigest()


def seeded_order(ids: list[str | None], seed: int) -> list[int]:
    """Row indices in subset order: the same subset on every machine, every rerun and every reader."""
    return sorted(range(len(ids)), key=lambda i: subset_rank(ids[i], seed, i))


def load_split(cfg: DataSettings, split: str, limit: int | None = None, require_summary: bool = True,
               exclude_ids: set[str] | None = None) -> Split:
    """Read, map columns, check ids are unique, then validate rows in seeded order until `limit` are kept."""
    raw = read_raw(cfg, split)
    source = split_source(cfg, split)
    if len(raw) == 0:
        raise DataError(f"{source}: the dataset is empty (no records for split '{split}'); point data.source at a "
                        "file or folder that holds records")
    mapping = column_map(columns_of(raw.data), cfg.columns, require_summary, source)
    ids = _ids(raw, mapping["id"])
    check_unique_ids(ids, source)
    stats = DataStats(source=source, in_source=len(raw))
    order = seeded_order(ids, cfg.seed) if limit is not None else list(range(len(ids)))
    if exclude_ids:
        held = [i for i in order if ids[i] in exclude_ids]
        stats.held_out = len(held)
        order = [i for i in order if ids[i] not in exclude_ids]
    records = _validated(raw, order, mapping, cfg, stats, limit, require_summary)
    stats.kept = len(records)
    if not records:
        raise DataError(f"{source}: no usable records in split '{split}' ({stats.total} read, skipped: "
                        f"{stats.skipped or 'none'}); check data.source and data.columns")
    (log.warning if stats.skipped else log.info)(stats.describe(split))
    return Split(records, stats)


def _ids(raw: Raw, id_column: str) -> list[str | None]:
    if isinstance(raw.data, pa.Table):
        values = raw.data.column(id_column).to_pylist() if id_column in raw.data.column_names else [None] * len(raw)
        bad = raw.data.column(BAD_ROW).to_pylist() if BAD_ROW in raw.data.column_names else [None] * len(raw)
        return [None if b else valid_id({"id": v}) for v, b in zip(values, bad)]
    return [valid_id({"id": r.get(id_column), BAD_ROW: r.get(BAD_ROW)}) for r in raw.data]


def _validated(raw: Raw, order: list[int], mapping: dict[str, str], cfg: DataSettings, stats: DataStats,
               limit: int | None, require_summary: bool) -> list[dict[str, str]]:
    """Validate rows in `order`, converting no more rows to Python than the subset needs."""
    records: list[dict[str, str]] = []
    pos = 0
    while pos < len(order) and (limit is None or len(records) < limit):
        step = CHUNK if limit is None else min(CHUNK, limit - len(records))
        rows = mapped_rows(raw.data, order[pos:pos + step], mapping)
        pos += step
        records.extend(validate_records(rows, cfg, stats, require_summary))
    return records


def _same_records(cfg: DataSettings) -> bool:
    """Train and eval read the same records (one file, or one folder without split names)."""
    if not is_file_source(cfg.source):
        return False
    train, test = split_source(cfg, cfg.train_split), split_source(cfg, cfg.eval_split)
    if train != test:
        return False
    names = splits_of(cfg)
    return source_files(train, cfg.train_split, names) == source_files(test, cfg.eval_split, names)


def load_train(cfg: DataSettings) -> Split:
    """The training split; when train and eval read the same records, the eval records are held out."""
    return load_train_eval(cfg)[0]


def load_train_eval(cfg: DataSettings) -> tuple[Split, Split]:
    """Train and eval splits; when both read the same records, eval is held out from train (disjoint ids)."""
    eval_split = load_split(cfg, cfg.eval_split, cfg.num_eval)
    exclude = {r["id"] for r in eval_split.records} if _same_records(cfg) else None
    return load_split(cfg, cfg.train_split, cfg.num_train, exclude_ids=exclude), eval_split

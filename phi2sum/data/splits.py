"""Splits: the seeded subset of a source's split that a job trains or summarizes, the same wherever it runs.

The subset is chosen by a seeded hash of each record's id, not by row position, so it does not depend on how the
source is stored or read: local mode and the Ray summarize job (which streams the source in blocks) pick the same
records for the same `data.num_eval`. Only the rows needed are converted to Python, so a 200k-row hub split costs
little more than its subset; when train and eval come from the same records, eval is held out of training.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import sys
from dataclasses import dataclass

import pyarrow as pa

from phi2sum.config import DataSettings
from phi2sum.data.records import (DataStats, check_unique_ids, column_map, columns_of, mapped_rows, valid_id,
                                  validate_records)
from phi2sum import demo
from phi2sum.data.sources import (BAD_ROW, EMBEDDED_PREFIX, Raw, is_file_source, read_raw, source_files,
                                  split_source, splits_of)
from phi2sum.errors import DataError

log = logging.getLogger(__name__)

CHUNK = 4096  # rows converted to Python at a time
MAX_VALIDATION_SHARE = 5  # a validation set sliced from train takes at most 1/5 of its records


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


def _same_records(cfg: DataSettings, split_a: str, split_b: str) -> bool:
    """Two splits read the same records (one file, or one folder without split names)."""
    if not is_file_source(cfg.source):
        return split_a == split_b
    a, b = split_source(cfg, split_a), split_source(cfg, split_b)
    if a != b:
        return False
    names = splits_of(cfg)
    return source_files(a, split_a, names) == source_files(b, split_b, names)


@dataclass
class TrainingSplits:
    """What a training run reads: train, the validation set (None when no in-training evaluation is asked for)
    and the eval split, pairwise disjoint whenever two of them come from the same records."""

    train: Split
    validation: Split | None
    eval: Split


def load_train(cfg: DataSettings) -> Split:
    """The training split; when train and eval read the same records, the eval records are held out."""
    return load_train_eval(cfg)[0]


def load_train_eval(cfg: DataSettings) -> tuple[Split, Split]:
    """Train and eval splits; when both read the same records, eval is held out from train (disjoint ids)."""
    splits = load_training_splits(cfg, with_validation=False)
    return splits.train, splits.eval


def load_training_splits(cfg: DataSettings, with_validation: bool) -> TrainingSplits:
    """Eval first, then validation, then train, each holding out the ones before it that share its records.

    The validation set is `data.validation_split` when the source has that split, else a seeded slice of the
    train split (the first records of its seeded order), so it never overlaps the training examples.
    """
    eval_split = load_split(cfg, cfg.eval_split, cfg.num_eval)
    held = {r["id"] for r in eval_split.records} if _same_records(cfg, cfg.train_split, cfg.eval_split) else set()
    if not with_validation:
        return TrainingSplits(load_split(cfg, cfg.train_split, cfg.num_train, exclude_ids=held or None), None,
                              eval_split)
    validation = _own_validation_split(cfg, eval_split)
    if validation is None:  # one read of train gives both: the slice, then the training subset after it
        train, validation = _train_and_slice(cfg, held or None)
        return TrainingSplits(train, validation, eval_split)
    held |= {r["id"] for r in validation.records}
    return TrainingSplits(load_split(cfg, cfg.train_split, cfg.num_train, exclude_ids=held or None), validation,
                          eval_split)


def _own_validation_split(cfg: DataSettings, eval_split: Split) -> Split | None:
    """`data.validation_split` read from the source, or None when it has no such split apart from train's records."""
    split = cfg.validation_split
    if not split:
        return None
    try:
        if _same_records(cfg, split, cfg.train_split):
            return None
        exclude = {r["id"] for r in eval_split.records} if _same_records(cfg, split, cfg.eval_split) else None
        return load_split(cfg, split, cfg.num_validation, exclude_ids=exclude)
    except DataError as exc:
        if _is_missing_split(cfg, split, exc):
            return None
        raise


def _is_missing_split(cfg: DataSettings, split: str, exc: DataError) -> bool:
    """The error says the source has no `split` (not that it is unreadable): for files and the demo corpus by
    looking, for a hub dataset by the message `datasets` gives ('Unknown split "validation". Should be ...')."""
    source = split_source(cfg, split)
    if source.startswith(EMBEDDED_PREFIX):
        return split not in demo.SPLIT_SIZES
    if is_file_source(source):
        try:
            source_files(source, split, splits_of(cfg))
        except DataError:
            return True
        return False
    return "unknown split" in str(exc).lower()


def _train_and_slice(cfg: DataSettings, exclude: set[str] | None) -> tuple[Split, Split | None]:
    """The train split's records in seeded order: the first `data.num_validation` are the validation set (at most
    a fifth of them when the split is smaller than asked for, so a small dataset keeps most of its records for
    training), the next ones the training subset. None for validation when there are too few records to spare one."""
    limit = cfg.num_train + cfg.num_validation if cfg.num_train is not None else sys.maxsize
    pool = load_split(cfg, cfg.train_split, limit, exclude_ids=exclude)
    short = len(pool.records) < limit  # the split holds fewer records than asked for: keep most for training
    size = min(cfg.num_validation, len(pool.records) // MAX_VALIDATION_SHARE) if short else cfg.num_validation
    why = f"the source has no split '{cfg.validation_split}'" if cfg.validation_split else \
        "data.validation_split is null"
    if size == 0:
        log.warning("validation: %s and split '%s' has only %d record(s), too few to hold any out; training "
                    "without a validation set", why, cfg.train_split, len(pool.records))
        kept = pool.records[:cfg.num_train] if cfg.num_train is not None else pool.records
        return Split(kept, dataclasses.replace(pool.stats, kept=len(kept))), None
    log.info("validation: %s, so %d records of split '%s' are held out of training for it", why, size,
             cfg.train_split)
    end = size + cfg.num_train if cfg.num_train is not None else len(pool.records)
    train = Split(pool.records[size:end], dataclasses.replace(
        pool.stats, kept=end - size, held_out=pool.stats.held_out + size))
    return train, Split(pool.records[:size], dataclasses.replace(pool.stats, kept=size, skipped={}, held_out=0))

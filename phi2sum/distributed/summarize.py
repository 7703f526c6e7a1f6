"""Batch summarization with Ray Data: records stream through an actor pool of `Summarizer`s.

Exactly once, whatever fails: every actor writes each batch it finishes as one Parquet part, atomically,
straight to the output (`<output>/shard-<i>-of-<n>/part-<hash of its ids>.parquet`); a rerun skips the ids
already committed, and the driver writes `_SUCCESS.json` only when every id of the shard is in exactly one
part. So a killed actor (Ray restarts it and retries the batch), a crashed driver (resubmit: only what is
missing is done) and a rerun of a finished shard (nothing is done) all end with every id once.
Sharding is by a stable hash of the id, so an id always lands in the same shard and shards are disjoint.
"""

from __future__ import annotations

import heapq
import logging
import time
from collections import Counter, deque
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from phi2sum import storage
from phi2sum.config import Config, DataSettings, config_from_dict
from phi2sum.data import (check_unique_ids, column_map, is_file_source, parse_file, read_raw, source_files, split_source,
                          splits_of, subset_rank, text_columns)
from phi2sum.data.records import canonical_rows, columns_of, mapped_rows
from phi2sum.distributed.cluster import init_ray, use_gpu
from phi2sum.errors import DataError
from phi2sum.faults import maybe_fail
from phi2sum.generate import Summarizer
from phi2sum.outputs import (SUCCESS, Shard, check_same_model, committed, committed_identities, finalize, id_hashes,
                             model_identity, part_name)
from phi2sum.plan import CPU_GENERATION_BATCH, MAX_GENERATION_BATCH

log = logging.getLogger(__name__)

CANONICAL_SCHEMA = pa.schema([("id", pa.string()), ("document", pa.string()), ("summary", pa.string()),
                              ("problem", pa.string())])


# --- the pieces that run in Ray Data tasks and actors ---------------------------------------------------------


def canonical_from_table(batch: pa.Table, data_cfg: dict) -> pa.Table:
    """A Parquet batch -> our columns (id, document, summary, problem), validated exactly as local mode does."""
    cfg = DataSettings(**data_cfg)
    mapping = column_map(columns_of(batch), cfg.columns, require_summary=False, source=cfg.source)
    rows = canonical_rows(mapped_rows(batch, range(batch.num_rows), mapping), cfg, require_summary=False)
    return pa.Table.from_pylist(rows, schema=CANONICAL_SCHEMA)


def canonical_from_file(row: dict[str, Any], data_cfg: dict) -> list[dict[str, Any]]:
    """One JSONL/JSON/CSV file (bytes) -> our rows, parsed by the same reader as local mode (text ids kept as
    text, a byte-order mark accepted, unreadable lines counted with data.on_bad_record=skip)."""
    cfg = DataSettings(**data_cfg)
    parsed = parse_file(row["path"], row["bytes"], text_columns(cfg), cfg.on_bad_record == "skip")
    mapping = column_map(columns_of(parsed), cfg.columns, require_summary=False, source=row["path"])
    count = parsed.num_rows if isinstance(parsed, pa.Table) else len(parsed)
    return canonical_rows(mapped_rows(parsed, range(count), mapping), cfg, require_summary=False)


def prepare_batch(batch: dict[str, Any], shard: Shard, subset: set[str] | None, done: np.ndarray) -> dict[str, list]:
    """Keep the good records of this shard (and of the seeded subset, with data.num_eval) not yet committed
    (`done`: hashes of committed ids); longest documents first."""
    ids = list(batch["id"])
    committed_already = np.isin(id_hashes(str(i) for i in ids), done) if done.size else np.zeros(len(ids), bool)
    keep = [i for i, (rid, problem) in enumerate(zip(ids, batch["problem"]))
            if not problem and shard.owns(rid) and (subset is None or rid in subset) and not committed_already[i]]
    # Longest first (stable, so reruns cut the same batches): the actors' batches are consecutive runs of these
    # rows, and rows of similar length pad little (the Summarizer can only sort within the batch it is given).
    keep.sort(key=lambda i: -len(batch["document"][i]))
    return {c: [batch[c][i] for i in keep] for c in ("id", "document", "summary")}


class SummarizeActor:
    """One model replica; summarizes the rows of one call and commits them as Parquet parts before returning: one
    part per call, or more when generating them takes longer than `ray.part_seconds`."""

    def __init__(self, cfg_dict: dict, out_dir: str, threads: int | None = None):
        import torch

        if threads:
            torch.set_num_threads(threads)  # CPU actors: one thread each, or they fight over the cores
        self.cfg = config_from_dict(cfg_dict)
        self.out_dir = out_dir
        self.summarizer = Summarizer(self.cfg, adapter=self.cfg.model.adapter)
        self.batches = 0
        self.identity = model_identity(self.cfg)

    def __call__(self, batch: dict[str, Any]) -> dict[str, list]:
        total = len(batch["id"])
        if not total:
            return {"part": [], "rows": []}
        self.batches += 1
        maybe_fail("summarize_batch", self.batches)  # test-only fault injection; a no-op otherwise
        parts: dict[str, list] = {"part": [], "rows": []}
        pending: list = []
        started, finished = time.time(), 0
        for pairs in self.summarizer.summarize_in_batches([str(d) for d in batch["document"]]):
            pending += pairs
            finished += len(pairs)
            if finished == total or time.time() - started >= self.cfg.ray.part_seconds:
                parts["part"].append(self._commit(batch, pending, time.time() - started))
                parts["rows"].append(len(pending))
                pending, started = [], time.time()
        return parts

    def _commit(self, batch: dict[str, Any], pairs: list, seconds: float) -> str:
        """One atomic Parquet part of the summarized rows `pairs` ((row index, Prediction)); returns its name."""
        rows = [index for index, _ in pairs]
        summaries = [summary for _, summary in pairs]
        ids = [str(batch["id"][i]) for i in rows]
        references = batch.get("summary")
        table = pa.table({
            "id": ids,
            "reference": [None if references[i] is None else str(references[i]) for i in rows]
            if references is not None else pa.nulls(len(ids), pa.string()),
            "prediction": [s.prediction for s in summaries],
            "prompt_tokens": [s.prompt_tokens for s in summaries],
            "generated_tokens": [s.generated_tokens for s in summaries],
            "truncated": [s.truncated for s in summaries],
            "padding_tokens": [s.padding_tokens for s in summaries],
            "model": [self.identity] * len(ids),
            "seconds": [round(seconds, 3)] * len(ids),
        })
        name = part_name(ids)
        storage.write_parquet(table, storage.join(self.out_dir, name))  # atomic: whole part or nothing
        return name


# --- the driver ----------------------------------------------------------------------------------------------


def read_records(cfg: Config):
    """A Ray Dataset of the eval split in our columns: files stream from local disk or S3 in Ray tasks; hub and
    demo data are loaded by the driver first."""
    import ray.data

    split = cfg.data.eval_split
    source = split_source(cfg.data, split)
    data_cfg = vars(cfg.data)
    if not is_file_source(source):
        raw = read_raw(cfg.data, split)
        mapping = column_map(columns_of(raw.data), cfg.data.columns, require_summary=False, source=source)
        rows = canonical_rows(mapped_rows(raw.data, range(len(raw)), mapping), cfg.data, require_summary=False)
        return ray.data.from_arrow(pa.Table.from_pylist(rows, schema=CANONICAL_SCHEMA))
    files = source_files(source, split, splits_of(cfg.data))
    fs = storage.filesystem(source)[0]
    paths = [storage.filesystem(f)[1] for f in files]
    if all(f.endswith(".parquet") for f in files):
        return ray.data.read_parquet(paths, filesystem=fs).map_batches(
            canonical_from_table, fn_args=(data_cfg,), batch_format="pyarrow", batch_size=256, num_cpus=0.25)
    return ray.data.read_binary_files(paths, filesystem=fs, include_paths=True).flat_map(
        canonical_from_file, fn_args=(data_cfg,), num_cpus=0.25)


def summarize_on_ray(cfg: Config, output: str, shard: Shard) -> dict[str, Any]:
    """Summarize this shard of `data.source` into `<output>/<shard>/`; returns the `_SUCCESS.json` content."""
    import ray
    import ray.data

    out_dir = storage.join(output, shard.name)
    identity = model_identity(cfg)
    if storage.exists(storage.join(out_dir, SUCCESS)):
        done = storage.read_json(storage.join(out_dir, SUCCESS))
        check_same_model(out_dir, identity, [done.get("identity")])
        log.info("%s is already complete (%d rows); nothing to do", out_dir, done["rows"])
        return done
    check_same_model(out_dir, identity, committed_identities(out_dir))  # before any work, or Ray, starts
    init_ray(cfg)
    # A Phi2SumError in an actor (e.g. S3 unreachable while it writes its part) reaches the driver as itself
    # (inside a RayTaskError) rather than as Ray Data's UserCodeException, which loses it: the job can then
    # print its one-line message instead of a remote stack trace.
    ray.data.DataContext.get_current().raise_original_map_exception = True
    started = time.time()
    records = read_records(cfg)
    scan = scan_ids(records, cfg, shard)
    done = np.concatenate([np.empty(0, np.uint64), *committed(out_dir).values()])
    todo = int(np.setdiff1d(scan.wanted, done).size)
    log.info("%s: %d of %d ids in this shard%s, %d already committed", shard.name, scan.wanted.size, scan.good,
             f" and the seeded subset of data.num_eval={cfg.data.num_eval}" if scan.subset is not None else "",
             scan.wanted.size - todo)
    gpu = use_gpu(cfg)
    batch_size = cfg.generation.batch_size or _rows_per_actor_call(gpu)
    # One actor call = one committed part (or a few, past ray.part_seconds): up to ray.part_rows rows, fewer for a
    # small shard so that every actor gets work (Ray Data hands a whole block to one actor, and with one call in
    # flight per actor the next block waits for a free one instead of queueing behind a busy one).
    part_rows = max(batch_size, min(cfg.ray.part_rows, -(-todo // cfg.ray.actors)))
    actor_resources = {"num_gpus": 1} if gpu else {"num_cpus": cfg.ray.actor_cpus}
    prepared = records.map_batches(prepare_batch, fn_args=(shard, scan.subset, done), batch_size=256, num_cpus=0.25)
    prepared = prepared.repartition(target_num_rows_per_block=part_rows)
    results = prepared.map_batches(
        SummarizeActor, fn_constructor_args=(cfg.to_dict(), out_dir, None if gpu else 1),
        batch_size=part_rows, compute=ray.data.ActorPoolStrategy(size=cfg.ray.actors, max_tasks_in_flight_per_actor=1),
        **actor_resources)
    written = 0
    for batch in results.iter_batches(batch_size=None):  # streaming: parts are committed as batches finish
        written += int(sum(batch["rows"]))
    return finalize(out_dir, scan.wanted, shard, cfg, time.time() - started, written, scan.skipped)


@dataclass
class IdScan:
    """What the driver keeps of a source's ids: counts, and 8-byte hashes (never the records themselves)."""

    good: int
    skipped: dict[str, int]
    wanted: np.ndarray  # hashes of this shard's ids (of the seeded subset, with data.num_eval)
    subset: set[str] | None  # with data.num_eval: the subset's ids (data.num_eval of them)


def scan_ids(records, cfg: Config, shard: Shard) -> IdScan:
    """One streaming pass over (id, problem): bad records counted by reason, duplicate ids refused, the seeded
    subset chosen (the data.num_eval lowest id-hash ranks, as local mode picks them), the shard's ids hashed."""
    skipped: Counter[str] = Counter()
    hashes, owned = [], []

    def good_ids():
        for batch in records.select_columns(["id", "problem"]).iter_batches(batch_size=8192, batch_format="pyarrow"):
            good = []
            for rid, problem in zip(batch["id"].to_pylist(), batch["problem"].to_pylist()):
                if problem:
                    skipped[problem] += 1
                else:
                    good.append(rid)
            hashes.append(id_hashes(good))
            owned.append(hashes[-1][[shard.owns(i) for i in good]] if good else hashes[-1])
            yield from good

    k = cfg.data.num_eval
    if k is None:
        deque(good_ids(), maxlen=0)  # consume: counts and hashes only
        subset = None
    else:  # nsmallest keeps k ids at a time, however long the source
        subset = set(heapq.nsmallest(k, good_ids(), key=lambda rid: subset_rank(rid, cfg.data.seed, 0)))
    every = np.concatenate([np.empty(0, np.uint64), *hashes])
    if np.unique(every).size < every.size:
        check_unique_ids((r["id"] for r in records.select_columns(["id", "problem"]).iter_rows() if not r["problem"]),
                         cfg.data.source)  # the rare path: find and name a duplicate
    if not every.size:
        raise DataError(f"{cfg.data.source}: no usable records ({sum(skipped.values())} read, skipped: "
                        f"{dict(skipped) or 'none'}); check data.source and data.columns")
    if skipped:
        log.warning("%s: skipped %d bad record(s): %s", cfg.data.source, sum(skipped.values()), dict(skipped))
    wanted = id_hashes(i for i in subset if shard.owns(i)) if subset is not None else \
        np.concatenate([np.empty(0, np.uint64), *owned])
    return IdScan(int(every.size), dict(skipped), wanted, subset)


def _rows_per_actor_call(gpu: bool) -> int:
    """Rows handed to one actor call when `generation.batch_size` is null: each GPU actor's Summarizer then plans
    its own generation batch for the card it was given (the driver often runs on a CPU-only head)."""
    return MAX_GENERATION_BATCH if gpu else CPU_GENERATION_BATCH


# --- evaluation of a (sharded) output ------------------------------------------------------------------------



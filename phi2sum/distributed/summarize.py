"""Batch summarization with Ray Data: records stream through an actor pool of `Summarizer`s.

Exactly once, whatever fails: every actor writes each batch it finishes as one Parquet part, atomically,
straight to the output (`<output>/shard-<i>-of-<n>/part-<hash of its ids>.parquet`); a rerun skips the ids
already committed, and the driver writes `_SUCCESS.json` only when every id of the shard is in exactly one
part. So a killed actor (Ray restarts it and retries the batch), a crashed driver (resubmit: only what is
missing is done) and a rerun of a finished shard (nothing is done) all end with every id once.
Sharding is by a stable hash of the id, so an id always lands in the same shard and shards are disjoint.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from typing import Any

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
from phi2sum.outputs import (SUCCESS, Shard, check_same_model, committed, committed_identities, finalize, model_identity,
                             part_name)
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


def prepare_batch(batch: dict[str, Any], shard: Shard, subset: set[str] | None, done: set[str]) -> dict[str, list]:
    """Keep the good records of this shard (and of the seeded subset, with data.num_eval) not yet committed;
    longest documents first."""
    keep = [i for i, (rid, problem) in enumerate(zip(batch["id"], batch["problem"]))
            if not problem and shard.owns(rid) and (subset is None or rid in subset) and rid not in done]
    # Longest first (stable, so reruns cut the same batches): the actors' batches are consecutive runs of these
    # rows, and rows of similar length pad little (the Summarizer can only sort within the batch it is given).
    keep.sort(key=lambda i: -len(batch["document"][i]))
    return {c: [batch[c][i] for i in keep] for c in ("id", "document", "summary")}


class SummarizeActor:
    """One model replica; summarizes a batch and commits it as one Parquet part before returning."""

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
        ids = [str(i) for i in batch["id"]]
        if not ids:
            return {"part": [], "rows": []}
        self.batches += 1
        maybe_fail("summarize_batch", self.batches)  # test-only fault injection; a no-op otherwise
        started = time.time()
        out = self.summarizer({k: list(v) for k, v in batch.items()})
        table = pa.table({
            "id": ids,
            "reference": [str(s) if s is not None else None for s in out["summary"]] if "summary" in out
            else pa.nulls(len(ids), pa.string()),
            "prediction": out["prediction"],
            "prompt_tokens": out["prompt_tokens"],
            "generated_tokens": out["generated_tokens"],
            "truncated": out["truncated"],
            "padding_tokens": out["padding_tokens"],
            "model": [self.identity] * len(ids),
            "seconds": [round(time.time() - started, 3)] * len(ids),
        })
        name = part_name(ids)
        storage.write_parquet(table, storage.join(self.out_dir, name))  # atomic: whole part or nothing
        return {"part": [name], "rows": [len(ids)]}


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


def seeded_subset(ids: list[str], cfg: Config) -> set[str] | None:
    """With data.num_eval, the same seeded subset of good ids as local mode picks (by id hash, not position)."""
    if cfg.data.num_eval is None:
        return None
    ranked = sorted(enumerate(ids), key=lambda pair: subset_rank(pair[1], cfg.data.seed, pair[0]))
    return {rid for _, rid in ranked[: cfg.data.num_eval]}


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
    # Ids and validity only (small), streamed: the ids of bad records are not waited for, but counted.
    checked = records.select_columns(["id", "problem"]).take_all()
    check_unique_ids((r["id"] for r in checked), cfg.data.source)
    skipped = dict(Counter(r["problem"] for r in checked if r["problem"]))
    ids = [r["id"] for r in checked if not r["problem"]]
    if not ids:
        raise DataError(f"{cfg.data.source}: no usable records ({len(checked)} read, skipped: {skipped or 'none'}); "
                        "check data.source and data.columns")
    if skipped:
        log.warning("%s: skipped %d bad record(s): %s", cfg.data.source, sum(skipped.values()), skipped)
    subset = seeded_subset(ids, cfg)
    wanted = {i for i in (subset if subset is not None else ids) if shard.owns(i)}
    before = committed(out_dir)
    done = {i for part_ids in before.values() for i in part_ids}
    log.info("%s: %d of %d ids in this shard%s, %d already committed", shard.name, len(wanted), len(ids),
             f" and the seeded subset of data.num_eval={cfg.data.num_eval}" if subset is not None else "",
             len(done & wanted))

    gpu = use_gpu(cfg)
    batch_size = cfg.generation.batch_size or _rows_per_actor_call(gpu)
    actor_resources = {"num_gpus": 1} if gpu else {"num_cpus": cfg.ray.actor_cpus}
    prepared = records.map_batches(prepare_batch, fn_args=(shard, subset, done), batch_size=256, num_cpus=0.25)
    # Ray Data gives a whole block to one actor: without this, a shard of up to 256 records is one block and
    # every actor but one idles (tests/benchmarks/bench_summarize.py measured 2 actors at 0.94x one actor).
    prepared = prepared.repartition(target_num_rows_per_block=batch_size)
    results = prepared.map_batches(
        SummarizeActor, fn_constructor_args=(cfg.to_dict(), out_dir, None if gpu else 1),
        batch_size=batch_size, compute=ray.data.ActorPoolStrategy(size=cfg.ray.actors), **actor_resources)
    written = 0
    for batch in results.iter_batches(batch_size=None):  # streaming: parts are committed as batches finish
        written += int(sum(batch["rows"]))
    return finalize(out_dir, wanted, shard, cfg, time.time() - started, written, skipped)


def _rows_per_actor_call(gpu: bool) -> int:
    """Rows handed to one actor call when `generation.batch_size` is null: each GPU actor's Summarizer then plans
    its own generation batch for the card it was given (the driver often runs on a CPU-only head)."""
    return MAX_GENERATION_BATCH if gpu else CPU_GENERATION_BATCH


# --- evaluation of a (sharded) output ------------------------------------------------------------------------



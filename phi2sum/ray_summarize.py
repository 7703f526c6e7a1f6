"""Batch summarization with Ray Data: records stream through an actor pool of `Summarizer`s.

Exactly once, whatever fails: every actor writes each batch it finishes as one Parquet part, atomically,
straight to the output (`<output>/shard-<i>-of-<n>/part-<hash of its ids>.parquet`); a rerun skips the ids
already committed, and the driver writes `_SUCCESS.json` only when every id of the shard is in exactly one
part. So a killed actor (Ray restarts it and retries the batch), a crashed driver (resubmit: only what is
missing is done) and a rerun of a finished shard (nothing is done) all end with every id once.
Sharding is by a stable hash of the id, so an id always lands in the same shard and shards are disjoint.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from phi2sum import storage
from phi2sum.config import Config
from phi2sum.data import column_map, is_file_source, split_source, validate_records, DataStats
from phi2sum.errors import DataError, Phi2SumError

log = logging.getLogger(__name__)

SUCCESS = "_SUCCESS.json"
_HASH_SPACE = 2**32


@dataclass(frozen=True)
class Shard:
    index: int
    count: int

    @classmethod
    def parse(cls, text: str | None) -> Shard:
        """`"3/8"` -> Shard(3, 8); None -> the whole dataset."""
        if not text:
            return cls(0, 1)
        try:
            index, count = (int(x) for x in str(text).split("/"))
        except ValueError:
            raise DataError(f"shard '{text}' must look like i/n, e.g. shard=3/8") from None
        if count < 1 or not 0 <= index < count:
            raise DataError(f"shard '{text}': need 0 <= i < n (shards are numbered from 0), e.g. shard=0/{max(count, 1)}")
        return cls(index, count)

    @property
    def name(self) -> str:
        return f"shard-{self.index}-of-{self.count}"

    def owns(self, record_id: str) -> bool:
        digest = hashlib.sha1(record_id.encode("utf-8")).digest()
        return int.from_bytes(digest[:4], "big") % self.count == self.index


def model_identity(cfg: Config) -> str:
    """What decides the summaries (stored in each part's `model` column): a resumed output must not mix two.

    The generation batch size is left out: a rerun with a smaller batch (e.g. after running out of memory) is
    still the same job.
    """
    generation = {k: v for k, v in vars(cfg.generation).items() if k != "batch_size"}
    return json.dumps({"base": cfg.model.base, "revision": cfg.model.revision, "adapter": cfg.model.adapter,
                       "quantization": vars(cfg.quantization), "prompt": vars(cfg.prompt), "generation": generation},
                      sort_keys=True)


def check_same_model(out_dir: str, identity: str, found: list[str]) -> None:
    """Refuse to resume (or call complete) an output whose summaries were made with another model or settings."""
    other = next((i for i in found if i is not None and i != identity), None)
    if other is None:
        return
    try:
        theirs, ours = json.loads(other), json.loads(identity)
        differ = ", ".join(k for k in sorted(set(theirs) | set(ours)) if theirs.get(k) != ours.get(k)) or "settings"
    except (TypeError, ValueError):
        differ = "settings"
    raise Phi2SumError(f"{out_dir} already holds summaries made with other settings ({differ} differ from this "
                       "job's); use another output= (or delete that one to start over) rather than mix two models' "
                       "summaries")


def part_name(ids: list[str]) -> str:
    """Deterministic in the batch's ids: a retried batch overwrites its own part instead of adding one."""
    return "part-" + hashlib.sha1("\n".join(sorted(ids)).encode("utf-8")).hexdigest()[:20] + ".parquet"


# --- the pieces that run in Ray Data tasks and actors ---------------------------------------------------------


def prepare_batch(batch: dict[str, Any], data_cfg: dict, mapping: dict[str, str], shard: Shard,
                  done: set[str]) -> dict[str, list]:
    """Map source columns, validate as in local mode, keep this shard's ids and drop ids already committed;
    longest documents first."""
    from phi2sum.config import DataConfig

    cfg = DataConfig(**data_cfg)
    good = validate_records(_mapped_rows(batch, mapping), cfg, DataStats(source=cfg.source), require_summary=False)
    good = [r for r in good if shard.owns(r["id"]) and r["id"] not in done]
    # Longest first (stable, so reruns cut the same batches): the actors' batches are consecutive runs of these
    # rows, and rows of similar length pad little (the Summarizer can only sort within the batch it is given).
    good.sort(key=lambda r: -len(r["document"]))
    columns = ["id", "document", *(["summary"] if "summary" in mapping else [])]
    return {c: [r.get(c) for r in good] for c in columns}


def check_batch(batch: dict[str, Any], data_cfg: dict, mapping: dict[str, str]) -> dict[str, list]:
    """Per row: its id and why it will be skipped ("" when it is good), validated exactly as `prepare_batch` does,
    so the driver knows which ids must end up summarized (and `data.on_bad_record=error` fails here, up front)."""
    from phi2sum.config import DataConfig
    from phi2sum.data import record_problem

    cfg = DataConfig(**data_cfg)
    rows = _mapped_rows(batch, mapping)
    validate_records(rows, cfg, DataStats(source=cfg.source), require_summary=False)  # raises in error mode
    problems = [record_problem(row, ("document",)) or "" for row in rows]
    ids = [None if p in ("missing_id", "bad_id") else str(row["id"]).strip() for row, p in zip(rows, problems)]
    return {"id": ids, "problem": problems}


def _mapped_rows(batch: dict[str, Any], mapping: dict[str, str]) -> list[dict[str, Any]]:
    """A Ray batch (columns) -> records with our field names and plain Python values."""
    n = len(next(iter(batch.values()))) if batch else 0
    return [{ours: _plain(batch[theirs][i]) for ours, theirs in mapping.items()} for i in range(n)]


def _plain(value: Any) -> Any:
    """numpy scalars from Ray batches -> Python values, so validation sees str/None as in local mode."""
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        return value.item()
    return value


class SummarizeActor:
    """One model replica; summarizes a batch and commits it as one Parquet part before returning."""

    def __init__(self, cfg_dict: dict, out_dir: str, threads: int | None = None):
        import torch

        from phi2sum.config import config_from_dict
        from phi2sum.generate import Summarizer

        if threads:
            torch.set_num_threads(threads)  # CPU actors: one thread each, or they fight over the cores
        self.cfg = config_from_dict(cfg_dict)
        self.out_dir = out_dir
        self.summarizer = Summarizer(self.cfg, adapter=self.cfg.model.adapter)
        self.batches = 0
        self.identity = model_identity(self.cfg)

    def __call__(self, batch: dict[str, Any]) -> dict[str, list]:
        from phi2sum.faults import maybe_fail

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


def read_dataset(cfg: Config):
    """A Ray Dataset of the source (files stream from local or S3; hub and embedded data are loaded first)."""
    import ray.data

    from phi2sum.data import read_raw

    source = split_source(cfg.data, cfg.data.eval_split)
    if is_file_source(source) and not source.startswith("embedded:"):
        fs, path = storage.filesystem(source)
        if not storage.exists(source):
            raise DataError(f"data source '{source}' does not exist; check data.source")
        readers = {".parquet": ray.data.read_parquet, ".csv": ray.data.read_csv, ".jsonl": ray.data.read_json,
                   ".json": ray.data.read_json}
        suffix = next((s for s in readers if source.endswith(s)), None)
        if suffix is None:  # a folder: its files' suffix decides
            files = [f for f in storage.list_files(source) if f.endswith(tuple(readers))]
            if not files:
                raise DataError(f"no .parquet, .jsonl or .csv files under '{source}'")
            suffix = next(s for s in readers if files[0].endswith(s))
        return readers[suffix](path, filesystem=fs)
    raw = read_raw(source, cfg.data.eval_split)
    return ray.data.from_arrow(raw) if isinstance(raw, pa.Table) else ray.data.from_items(raw)


def committed_identities(out_dir: str) -> list[str]:
    """The distinct `model` identities of the parts already in the output (parts are small: no documents)."""
    found: set[str] = set()
    for uri in _part_uris(out_dir):
        table = storage.read_parquet(uri)
        if "model" in table.column_names:
            found.update(table.column("model").to_pylist())
    return sorted(i for i in found if i is not None)


def committed(out_dir: str) -> dict[str, list[str]]:
    """part name -> ids, for the parts already in the output."""
    return {uri.rsplit("/", 1)[-1]: [str(i) for i in storage.read_parquet(uri).column("id").to_pylist()]
            for uri in _part_uris(out_dir)}


def _part_uris(out_dir: str) -> list[str]:
    """The committed parts of an output shard (not `_SUCCESS.json`, not a half-written temporary)."""
    names = ((uri, uri.rsplit("/", 1)[-1]) for uri in storage.list_files(out_dir))
    return [uri for uri, name in names if name.startswith("part-") and name.endswith(".parquet")]


def summarize_on_ray(cfg: Config, output: str, shard: Shard) -> dict[str, Any]:
    """Summarize this shard of `data.source` into `<output>/<shard>/`; returns the `_SUCCESS.json` content."""
    import ray
    import ray.data

    from phi2sum.ray_train import init_ray, use_gpu

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
    ds = read_dataset(cfg)
    mapping = column_map(ds.columns(), cfg.data.columns, require_summary=False, source=cfg.data.source)
    # Ids and validity only (small), streamed: the ids of bad records are not waited for, but counted.
    checked = ds.map_batches(check_batch, fn_args=(vars(cfg.data), mapping), batch_size=256, num_cpus=0.25)
    checked = checked.take_all()
    dupes = [i for i, n in Counter(r["id"] for r in checked if r["id"] is not None).items() if n > 1]
    if dupes:
        raise DataError(f"{cfg.data.source}: {len(dupes)} duplicate id(s), e.g. {dupes[0]!r}; ids must be unique")
    skipped = dict(Counter(r["problem"] for r in checked if r["problem"]))
    ids = [r["id"] for r in checked if not r["problem"]]
    if not ids:
        raise DataError(f"{cfg.data.source}: no usable records ({len(checked)} read, skipped: {skipped or 'none'}); "
                        "check data.source and data.columns")
    if skipped:
        log.warning("%s: skipped %d bad record(s): %s", cfg.data.source, sum(skipped.values()), skipped)
    wanted = {i for i in ids if shard.owns(i)}
    before = committed(out_dir)
    done = {i for part_ids in before.values() for i in part_ids}
    log.info("%s: %d of %d ids in this shard, %d already committed", shard.name, len(wanted), len(ids),
             len(done & wanted))

    gpu = use_gpu(cfg)
    batch_size = cfg.generation.batch_size or _rows_per_actor_call(gpu)
    actor_resources = {"num_gpus": 1} if gpu else {"num_cpus": cfg.ray.actor_cpus}
    prepared = ds.map_batches(prepare_batch, fn_args=(vars(cfg.data), mapping, shard, done), batch_size=256,
                              num_cpus=0.25)
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
    from phi2sum.plan import CPU_GENERATION_BATCH, MAX_GENERATION_BATCH

    return MAX_GENERATION_BATCH if gpu else CPU_GENERATION_BATCH


def finalize(out_dir: str, wanted: set[str], shard: Shard, cfg: Config, seconds: float, written: int,
             skipped: dict[str, int] | None = None) -> dict:
    """Check every id of the shard is committed exactly once, mend a retry's duplicates, write _SUCCESS.json."""
    parts = committed(out_dir)
    seen: dict[str, str] = {}
    for name in sorted(parts):
        dupes = [i for i in parts[name] if i in seen]
        if dupes:  # a batch retried with different neighbours: keep the first part's row, rewrite this part
            table = storage.read_parquet(storage.join(out_dir, name))
            keep = pa.array([i not in seen for i in table.column("id").to_pylist()])
            storage.write_parquet(table.filter(keep), storage.join(out_dir, name))
            log.warning("removed %d duplicate row(s) from %s (a retried batch)", len(dupes), name)
        for i in parts[name]:
            seen.setdefault(i, name)
    missing = wanted - set(seen)
    if missing:
        raise Phi2SumError(f"{out_dir}: {len(missing)} id(s) of {shard.name} have no summary (e.g. "
                           f"{sorted(missing)[0]!r}); rerun the same command to complete them")
    extra = set(seen) - wanted
    if extra:
        raise Phi2SumError(f"{out_dir} holds {len(extra)} id(s) that are not in this shard of {cfg.data.source} "
                           "(another dataset's output?); choose another output location")
    success = {"rows": len(seen), "parts": len(parts), "shard": shard.name, "source": cfg.data.source,
               "model": cfg.model.base, "adapter": cfg.model.adapter, "seconds_this_attempt": round(seconds, 2),
               "rows_this_attempt": written, "identity": model_identity(cfg),
               "skipped_in_source": skipped or {}}  # bad records of the whole source (data.on_bad_record=skip)
    storage.write_json(storage.join(out_dir, SUCCESS), success)
    log.info("%s complete: %d rows in %d parts", out_dir, len(seen), len(parts))
    return success


# --- evaluation of a (sharded) output ------------------------------------------------------------------------


def read_predictions(output: str) -> pa.Table:
    """All shards' parts of an output as one table; refuses missing or incomplete shards and duplicate ids."""
    shards = sorted({uri.split("/")[-2] for uri in storage.list_files(output)
                     if uri.split("/")[-2].startswith("shard-")})
    if not shards:
        raise Phi2SumError(f"no shard folders (shard-i-of-n) under '{output}'; point predictions= at a summarize "
                           "job's output")
    counts = {int(s.split("-of-")[1]) for s in shards}
    if len(counts) != 1:
        raise Phi2SumError(f"{output} mixes shard counts {sorted(counts)}; evaluate one sharding at a time")
    (n,) = counts
    expected = {Shard(i, n).name for i in range(n)}
    incomplete = sorted(s for s in expected if not storage.exists(storage.join(output, s, SUCCESS)))
    if incomplete:
        raise Phi2SumError(f"{output}: {len(incomplete)} of {n} shards missing or incomplete ({', '.join(incomplete[:4])}"
                           f"{'...' if len(incomplete) > 4 else ''}); run or rerun the summarize job for them")
    tables = [storage.read_parquet(storage.join(output, s)) for s in sorted(expected)]
    table = pa.concat_tables(tables, promote_options="permissive")
    dupes = [i for i, c in Counter(table.column("id").to_pylist()).items() if c > 1]
    if dupes:
        raise Phi2SumError(f"{output}: {len(dupes)} id(s) appear more than once (e.g. {dupes[0]!r}); the outputs "
                           "mix two datasets or two runs")
    return table

"""The sharded output format of a summarize job, and reading it back: no Ray needed.

`<output>/shard-<i>-of-<n>/part-<hash of its ids>.parquet` holds the summaries, each part committed atomically
by the actor that made it; `_SUCCESS.json`, written last by the driver after checking that every id of the
shard is in exactly one part, marks a complete shard. Sharding is by a stable hash of the id, so an id always
lands in the same shard and shards are disjoint. `jobs.evaluate`, `phi2sum report` and the Ray job all read
outputs through this module.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import time
from dataclasses import dataclass
from typing import Iterable

import numpy as np
import pyarrow as pa

from phi2sum import storage
from phi2sum.config import Config, decisive
from phi2sum.data import check_unique_ids
from phi2sum.errors import DataError, Phi2SumError

log = logging.getLogger(__name__)

SUCCESS = "_SUCCESS.json"



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
    """What decides the summaries (`config.decisive(summaries_only=True)`), stored as JSON in each part's `model`
    column: a resumed output must not mix two models' summaries, and the JSON lets a refusal name what differs."""
    return json.dumps(decisive(cfg, summaries_only=True), sort_keys=True)


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


def id_hashes(ids: Iterable[str]) -> np.ndarray:
    """64-bit hashes of ids: how the Ray driver keeps a shard's ids (8 bytes each, not a Python string each), so its
    memory does not grow with the documents beyond that. Two ids colliding would count as one id and one of them
    would be dropped as a duplicate: the odds are about n^2 / 2^65 for n ids (3e-8 at a million, 3% at a
    billion), so shard a dataset of billions. The outputs themselves always carry the real ids."""
    return np.fromiter((int.from_bytes(hashlib.blake2b(i.encode("utf-8"), digest_size=8).digest(), "big")
                        for i in ids), dtype=np.uint64)


def committed_identities(out_dir: str) -> list[str]:
    """The distinct `model` identities of the parts already in the output (that column alone is read)."""
    found: set[str] = set()
    for uri in part_uris(out_dir):
        found.update(storage.read_parquet(uri, ["model"]).column("model").unique().to_pylist())
    return sorted(i for i in found if i is not None)


def committed(out_dir: str) -> dict[str, np.ndarray]:
    """part name -> hashes of its ids, for the parts already in the output (the id column alone is read)."""
    return {uri.rsplit("/", 1)[-1]: id_hashes(str(i) for i in storage.read_parquet(uri, ["id"]).column("id").to_pylist())
            for uri in part_uris(out_dir)}


def part_uris(out_dir: str) -> list[str]:
    """The committed parts of an output shard (not `_SUCCESS.json`, not a half-written temporary)."""
    names = ((uri, uri.rsplit("/", 1)[-1]) for uri in storage.list_files(out_dir))
    return [uri for uri, name in names if name.startswith("part-") and name.endswith(".parquet")]


def finalize(out_dir: str, wanted: np.ndarray, shard: Shard, cfg: Config, seconds: float, written: int,
             skipped: dict[str, int] | None = None) -> dict:
    """Check every id of the shard is committed exactly once, mend a retry's duplicates, write _SUCCESS.json.

    `wanted`: the hashes of the shard's ids. Only hashes and one small record per part are held here."""
    checking = time.time()
    parts = committed(out_dir)
    names = sorted(parts)
    seen = _mend_duplicates(out_dir, names, parts)
    missing = np.setdiff1d(np.unique(wanted), seen)
    if missing.size:
        raise Phi2SumError(f"{out_dir}: {missing.size} id(s) of {shard.name} have no summary yet; rerun the same "
                           "command to complete them")
    extra = np.setdiff1d(seen, wanted)
    if extra.size:
        raise Phi2SumError(f"{out_dir} holds {extra.size} id(s) that are not in this shard of {cfg.data.source} "
                           "(another dataset's output?); choose another output location")
    success = {"rows": int(seen.size), "parts": len(parts), "shard": shard.name, "source": cfg.data.source,
               "model": cfg.model.base, "adapter": cfg.model.adapter, "seconds_this_attempt": round(seconds, 2),
               "rows_this_attempt": written, "identity": model_identity(cfg),
               "finalize_seconds": round(time.time() - checking, 2),
               "skipped_in_source": skipped or {}}  # bad records of the whole source (data.on_bad_record=skip)
    storage.write_json(storage.join(out_dir, SUCCESS), success)
    log.info("%s complete: %d rows in %d parts", out_dir, seen.size, len(parts))
    return success


def _mend_duplicates(out_dir: str, names: list[str], parts: dict[str, np.ndarray]) -> np.ndarray:
    """A batch retried with other neighbours can commit an id twice: keep its first part's row, rewrite the later
    part without it. Returns the sorted unique hashes of every committed id."""
    if not names:
        return np.empty(0, dtype=np.uint64)
    every = np.concatenate([parts[n] for n in names])
    owner = np.concatenate([np.full(parts[n].size, k) for k, n in enumerate(names)])
    unique, first = np.unique(every, return_index=True)
    keep = np.zeros(every.size, dtype=bool)
    keep[first] = True
    for k in np.unique(owner[~keep]):
        name = names[k]
        table = storage.read_parquet(storage.join(out_dir, name))
        storage.write_parquet(table.filter(pa.array(keep[owner == k])), storage.join(out_dir, name))
        log.warning("removed %d duplicate row(s) from %s (a retried batch)", int((~keep[owner == k]).sum()), name)
    return unique


SHARD_NAME = re.compile(r"shard-(\d+)-of-(\d+)")


def shard_folders(output: str) -> list[str]:
    """The names of the `shard-<i>-of-<n>` folders directly under `output` (other files and folders are not ours
    and are left out); `output` may also be one shard folder itself."""
    relative = storage.list_relative(output)
    names = sorted({rel.split("/")[0] for rel in relative if "/" in rel and SHARD_NAME.fullmatch(rel.split("/")[0])})
    return names


def is_sharded_output(uri: str) -> bool:
    """True for a summarize job's output folder (it holds `shard-<i>-of-<n>/`), or for one shard folder."""
    return not uri.endswith(".parquet") and bool(
        SHARD_NAME.fullmatch(uri.rstrip("/").rsplit("/", 1)[-1]) or shard_folders(uri))


def read_predictions(output: str) -> pa.Table:
    """All shards' parts of an output as one table (for a report, whose outputs are small); refuses missing or
    incomplete shards and duplicate ids. Given one shard folder, reads that shard alone (it must be complete)."""
    table = pa.concat_tables([storage.read_parquet(uri) for uri in complete_parts(output)],
                             promote_options="permissive")
    check_unique_ids((str(i) for i in table.column("id").to_pylist()), output,
                     fix="the outputs mix two datasets or two runs: evaluate one output at a time")
    return table


def complete_parts(output: str) -> list[str]:
    """The part files of every shard of `output` (or of the one shard folder `output` is), refusing a sharding
    with missing or incomplete shards."""
    output = output.rstrip("/")
    if SHARD_NAME.fullmatch(output.rsplit("/", 1)[-1]):
        return _parts_of_complete([output], output)
    shards = shard_folders(output)
    if not shards:
        raise Phi2SumError(f"no shard folders (shard-i-of-n) under '{output}'; point predictions= at a summarize "
                           "job's output")
    counts = {int(SHARD_NAME.fullmatch(s).group(2)) for s in shards}
    if len(counts) != 1:
        raise Phi2SumError(f"{output} mixes shard counts {sorted(counts)}; evaluate one sharding at a time")
    (n,) = counts
    return _parts_of_complete([storage.join(output, Shard(i, n).name) for i in range(n)], output)


def _parts_of_complete(shard_uris: list[str], output: str) -> list[str]:
    incomplete = [uri.rsplit("/", 1)[-1] for uri in shard_uris if not storage.exists(storage.join(uri, SUCCESS))]
    if incomplete:
        raise Phi2SumError(f"{output}: {len(incomplete)} of {len(shard_uris)} shard(s) missing or incomplete "
                           f"({', '.join(incomplete[:4])}{'...' if len(incomplete) > 4 else ''}); run or rerun the "
                           "summarize job for them")
    return [uri for shard in shard_uris for uri in part_uris(shard)]

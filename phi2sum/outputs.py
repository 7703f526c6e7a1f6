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
from dataclasses import dataclass

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
    """All shards' parts of an output as one table; refuses missing or incomplete shards and duplicate ids.

    Given one shard folder, reads that shard alone (it must be complete)."""
    output = output.rstrip("/")
    parent, _, name = output.rpartition("/")
    if SHARD_NAME.fullmatch(name):
        return _checked(output, _read_complete([output], output))
    shards = shard_folders(output)
    if not shards:
        raise Phi2SumError(f"no shard folders (shard-i-of-n) under '{output}'; point predictions= at a summarize "
                           "job's output")
    counts = {int(SHARD_NAME.fullmatch(s).group(2)) for s in shards}
    if len(counts) != 1:
        raise Phi2SumError(f"{output} mixes shard counts {sorted(counts)}; evaluate one sharding at a time")
    (n,) = counts
    expected = [storage.join(output, Shard(i, n).name) for i in range(n)]
    return _checked(output, _read_complete(expected, output))


def _read_complete(shard_uris: list[str], output: str) -> pa.Table:
    incomplete = [uri.rsplit("/", 1)[-1] for uri in shard_uris if not storage.exists(storage.join(uri, SUCCESS))]
    if incomplete:
        raise Phi2SumError(f"{output}: {len(incomplete)} of {len(shard_uris)} shard(s) missing or incomplete "
                           f"({', '.join(incomplete[:4])}{'...' if len(incomplete) > 4 else ''}); run or rerun the "
                           "summarize job for them")
    return pa.concat_tables([storage.read_parquet(uri) for uri in shard_uris], promote_options="permissive")


def _checked(output: str, table: pa.Table) -> pa.Table:
    check_unique_ids((str(i) for i in table.column("id").to_pylist()), output,
                     fix="the outputs mix two datasets or two runs: evaluate one output at a time")
    return table

"""Data: `id`/`document`/`summary` records from the hub, files (local or s3://) or the embedded corpus.

Real data is messy, so every record is validated the same way whatever its source: records with a missing,
empty or non-string field are counted and skipped (or rejected with `data.on_bad_record=error`), duplicate
ids are always an error (they would break exactly-once outputs), and huge documents are cut to
`data.max_document_chars` before they reach the tokenizer.
"""

from __future__ import annotations

import io
import json
import os
import logging
import random
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterable

import pyarrow as pa

from phi2sum import storage
from phi2sum.config import DataConfig
from phi2sum.errors import DataError, Phi2SumError

log = logging.getLogger(__name__)

FILE_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")
EMBEDDED_PREFIX = "embedded:"


@dataclass
class DataStats:
    """What validation did to a split; kept in summary.json."""

    source: str
    total: int = 0
    kept: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    cut_documents: int = 0  # documents longer than data.max_document_chars

    def to_dict(self) -> dict[str, Any]:
        return {"source": self.source, "total": self.total, "kept": self.kept,
                "skipped": dict(self.skipped), "cut_documents": self.cut_documents}


@dataclass
class Split:
    records: list[dict[str, str]]
    stats: DataStats


# --- sources -------------------------------------------------------------------------------------------------


def split_source(cfg: DataConfig, split: str) -> str:
    """The concrete source of a split: `{split}` in a file source is replaced by the split name."""
    return cfg.source.replace("{split}", split)


def is_file_source(source: str) -> bool:
    return storage.is_s3(source) or source.endswith(FILE_SUFFIXES) or _is_local_dir(source) or \
        source.startswith((".", "/", "~"))


def _is_local_dir(source: str) -> bool:
    return os.path.isdir(os.path.expanduser(source))




def read_raw(source: str, split: str) -> pa.Table | list[dict[str, Any]]:
    """Read a source with its own column names, no validation yet."""
    if source.startswith(EMBEDDED_PREFIX):
        from phi2sum import embedded

        if source != embedded.EMBEDDED_DATA:
            raise DataError(f"unknown embedded dataset '{source}'; the only one is {embedded.EMBEDDED_DATA}")
        return embedded.synthetic_records(split)
    if is_file_source(source):
        return _read_files(source)
    return _read_hub_table(source, split)


def _read_files(source: str) -> pa.Table | list[dict[str, Any]]:
    uri = source
    if not storage.is_s3(uri):
        uri = os.path.expanduser(uri)
    if not storage.exists(uri):
        raise DataError(f"data source '{source}' does not exist; check data.source (use {{split}} for per-split files)")
    files = [uri] if uri.endswith(FILE_SUFFIXES) else [
        f for f in storage.list_files(uri)
        if f.endswith(FILE_SUFFIXES) and not f.rsplit("/", 1)[-1].startswith(("_", "."))]
    if not files:
        raise DataError(f"no .jsonl, .parquet or .csv files under '{source}'; point data.source at your data")
    tables = [_read_one_file(f) for f in files]
    if any(isinstance(t, list) for t in tables):
        return [row for t in tables for row in (t if isinstance(t, list) else t.to_pylist())]
    try:
        return pa.concat_tables(tables, promote_options="permissive")
    except pa.ArrowInvalid as exc:
        raise DataError(f"files under '{source}' have incompatible columns ({exc}); use one schema") from None


def _read_one_file(uri: str) -> pa.Table | list[dict[str, Any]]:
    if uri.endswith(".parquet"):
        try:
            return storage.read_parquet(uri)
        except Phi2SumError:
            raise
        except Exception as exc:  # corrupt file
            raise DataError(f"{uri}: not a readable Parquet file ({exc})") from None
    data = storage.read_bytes(uri)
    if uri.endswith(".csv"):
        import pyarrow.csv as pacsv

        try:
            return pacsv.read_csv(io.BytesIO(data))
        except pa.ArrowInvalid as exc:
            raise DataError(f"{uri}: not a readable CSV file ({exc})") from None
    return _parse_jsonl(uri, data)


def _parse_jsonl(uri: str, data: bytes) -> list[dict[str, Any]]:
    """JSON lines (or one JSON array), decoded strictly as UTF-8 so bad bytes are reported by line."""
    stripped = data.lstrip()
    if stripped.startswith(b"["):
        try:
            rows = json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise DataError(f"{uri}: not valid UTF-8 JSON ({exc}); fix the file") from None
        return [r for r in rows if isinstance(r, dict)]
    rows = []
    for number, line in enumerate(data.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line.decode("utf-8"))
        except UnicodeDecodeError as exc:
            raise DataError(f"{uri}: line {number} is not valid UTF-8 (byte {exc.start}); re-encode the file as "
                            "UTF-8") from None
        except json.JSONDecodeError as exc:
            raise DataError(f"{uri}: line {number} is not valid JSON ({exc.msg}); fix or remove that line") from None
        if not isinstance(row, dict):
            raise DataError(f"{uri}: line {number} is not a JSON object; each line must be one record")
        rows.append(row)
    return rows


def _read_hub_table(source: str, split: str) -> pa.Table:
    try:
        import datasets

        ds = datasets.load_dataset(source, split=split)
        return ds.data.table
    except Exception as exc:  # offline, unknown id, unknown split: all user-fixable
        reason = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise DataError(f"could not fetch dataset '{source}' split '{split}' from the Hugging Face Hub ({reason}); "
                        "check the network or point data.source at a local/s3:// JSONL, Parquet or CSV file") from None


# --- validation ----------------------------------------------------------------------------------------------


def column_map(columns: list[str], mapping: dict[str, str], require_summary: bool, source: str) -> dict[str, str]:
    """Our field -> the source's column; a missing column is an error that names the fix."""
    wanted = {"id": "id", "document": "document", "summary": "summary", **mapping}
    out = {}
    for ours, theirs in wanted.items():
        if theirs not in columns:
            if ours == "summary" and not require_summary:
                continue
            raise DataError(f"{source}: no column '{theirs}' for '{ours}' (columns: {', '.join(columns) or 'none'});"
                            f" set data.columns.{ours}=<column name>")
        out[ours] = theirs
    return out


def _columns(raw) -> list[str]:
    if isinstance(raw, pa.Table):
        return raw.column_names
    seen: dict[str, None] = {}
    for row in raw:
        seen.update(dict.fromkeys(row))
    return list(seen)


def _rows(raw, indices: list[int], mapping: dict[str, str]) -> list[dict[str, Any]]:
    """Rows at `indices` with our field names (a field the row lacks is left out, to be counted as missing)."""
    if isinstance(raw, pa.Table):
        raw = raw.select(list(dict.fromkeys(mapping.values()))).take(indices).to_pylist()
        return [{ours: row[theirs] for ours, theirs in mapping.items()} for row in raw]
    return [{ours: raw[i][theirs] for ours, theirs in mapping.items() if theirs in raw[i]} for i in indices]


def _ids(raw, id_column: str) -> list[str]:
    values = raw.column(id_column).to_pylist() if isinstance(raw, pa.Table) else [r.get(id_column) for r in raw]
    return [str(v).strip() for v in values if v is not None]


def validate_records(rows: Iterable[dict[str, Any]], cfg: DataConfig, stats: DataStats,
                     require_summary: bool = True) -> list[dict[str, str]]:
    """Keep good records, count (or reject) bad ones, cut huge documents. Ids are returned as strings."""
    kept: list[dict[str, str]] = []
    skipped: Counter[str] = Counter(stats.skipped)
    fields = ("document", "summary") if require_summary else ("document",)
    for index, row in enumerate(rows):
        stats.total += 1
        problem = record_problem(row, fields)
        if problem:
            if cfg.on_bad_record == "error":
                raise DataError(f"{stats.source}: record {index} (id {row.get('id')!r}) has {problem.replace('_', ' ')};"
                                " fix the data or set data.on_bad_record=skip")
            skipped[problem] += 1
            continue
        record = {"id": str(row["id"]).strip(), "document": row["document"].strip()}
        if "summary" in row and isinstance(row["summary"], str):
            record["summary"] = row["summary"].strip()
        if len(record["document"]) > cfg.max_document_chars:
            record["document"] = record["document"][: cfg.max_document_chars]
            stats.cut_documents += 1
        kept.append(record)
    stats.skipped = dict(skipped)
    return kept


def record_problem(row: dict[str, Any], fields: tuple[str, ...]) -> str | None:
    """Why a record is bad ("missing_id", "empty_document", ...), or None; the Ray jobs validate with it too."""
    rid = row.get("id")
    if rid is None or (isinstance(rid, float) and rid != rid):
        return "missing_id"
    if not isinstance(rid, (str, int)) or isinstance(rid, bool) or not str(rid).strip():
        return "bad_id"
    for name in fields:
        value = row.get(name)
        if value is None:
            return f"missing_{name}"
        if not isinstance(value, str):
            return f"non_string_{name}"
        if not value.strip():
            return f"empty_{name}"
    return None


def check_unique_ids(ids: list[str], source: str) -> None:
    counts = Counter(ids)
    dupes = [i for i, n in counts.items() if n > 1]
    if dupes:
        raise DataError(f"{source}: {len(dupes)} duplicate id(s), e.g. {dupes[0]!r}; ids must be unique "
                        "(deduplicate the data or map another column with data.columns.id)")


def seeded_order(n_rows: int, seed: int) -> list[int]:
    """A seeded shuffle of row indices: the same subset on every machine and every rerun."""
    order = list(range(n_rows))
    random.Random(seed).shuffle(order)
    return order


def load_split(cfg: DataConfig, split: str, limit: int | None = None, require_summary: bool = True,
               exclude_ids: set[str] | None = None) -> Split:
    """Read, map columns, check ids are unique, then validate rows in seeded order until `limit` are kept.

    Only the rows needed are converted to Python, so a 200k-row hub split costs no more than its subset.
    """
    source = split_source(cfg, split)
    raw = read_raw(source, split)
    if (len(raw) if isinstance(raw, list) else raw.num_rows) == 0:
        raise DataError(f"{source}: the dataset is empty (no records for split '{split}'); point data.source at a "
                        "file or folder that holds records")
    mapping = column_map(_columns(raw), cfg.columns, require_summary, source)
    check_unique_ids(_ids(raw, mapping["id"]), source)
    stats = DataStats(source=source)
    n_rows = len(raw) if isinstance(raw, list) else raw.num_rows
    order = seeded_order(n_rows, cfg.seed) if limit is not None else list(range(n_rows))
    records: list[dict[str, str]] = []
    pos = 0
    while pos < len(order) and (limit is None or len(records) < limit):
        step = 4096 if limit is None else min(4096, limit - len(records))  # convert no row we do not need
        rows = _rows(raw, order[pos:pos + step], mapping)
        pos += step
        if exclude_ids:
            rows = [r for r in rows if str(r.get("id")).strip() not in exclude_ids]
        records.extend(validate_records(rows, cfg, stats, require_summary))
    stats.kept = len(records)
    if not records:
        raise DataError(f"{source}: no usable records in split '{split}' ({stats.total} read, skipped: "
                        f"{stats.skipped or 'none'}); check data.source and data.columns")
    if stats.skipped:
        log.warning("%s: skipped %d bad record(s): %s", source, sum(stats.skipped.values()), stats.skipped)
    return Split(records, stats)


def _same_file(cfg: DataConfig) -> bool:
    return is_file_source(cfg.source) and split_source(cfg, cfg.train_split) == split_source(cfg, cfg.eval_split)


def load_train(cfg: DataConfig) -> Split:
    """The training split; when train and eval come from the same file, the eval records are held out."""
    exclude = {r["id"] for r in load_split(cfg, cfg.eval_split, cfg.num_eval).records} if _same_file(cfg) else None
    return load_split(cfg, cfg.train_split, cfg.num_train, exclude_ids=exclude)


def load_train_eval(cfg: DataConfig) -> tuple[Split, Split]:
    """Train and eval splits; when both come from the same file, eval is held out from it (disjoint ids)."""
    eval_split = load_split(cfg, cfg.eval_split, cfg.num_eval)
    exclude = {r["id"] for r in eval_split.records} if _same_file(cfg) else None
    return load_split(cfg, cfg.train_split, cfg.num_train, exclude_ids=exclude), eval_split

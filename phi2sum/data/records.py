"""Records: every source's rows are mapped to `id`/`document`/`summary` and validated the same way.

Real data is messy: records with a missing, empty or non-string field, and unreadable lines, are counted under a
named reason and skipped (or rejected with `data.on_bad_record=error`); duplicate ids are always an error (they
would break exactly-once outputs); huge documents are cut to `data.max_document_chars` before they reach the
tokenizer. Local mode and the Ray jobs validate with these same functions, so a record the source holds is always
either used or counted.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterable

import pyarrow as pa

from phi2sum.config import DataSettings
from phi2sum.data.sources import BAD_ROW
from phi2sum.errors import DataError

ID_PROBLEMS = ("missing_id", "bad_id")


@dataclass
class DataStats:
    """What reading and validation did to a split (summary.json's `data` section).

    Every record of the source is accounted for: `in_source` = `kept` + skipped + `held_out` + `not_sampled`.
    """

    source: str
    in_source: int = 0  # records (and unreadable lines) the source holds for this split
    total: int = 0  # records examined by validation
    kept: int = 0
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> count
    held_out: int = 0  # train records left out because they are eval records (same file for both)
    cut_documents: int = 0  # documents longer than data.max_document_chars, cut

    @property
    def not_sampled(self) -> int:
        """Good records beyond the seeded subset (`data.num_train` / `num_eval`)."""
        return self.in_source - self.kept - sum(self.skipped.values()) - self.held_out

    def to_dict(self) -> dict[str, Any]:
        return {"source": self.source, "in_source": self.in_source, "total": self.total, "kept": self.kept,
                "skipped": dict(self.skipped), "held_out": self.held_out, "not_sampled": self.not_sampled,
                "cut_documents": self.cut_documents}

    def describe(self, split: str) -> str:
        """The final log line: where every record of the split went."""
        skipped = ", ".join(f"{n} {reason}" for reason, n in sorted(self.skipped.items())) or "none"
        return (f"{self.source} [{split}]: {self.kept} of {self.in_source} record(s) used; skipped: {skipped}; "
                f"held out for eval: {self.held_out}; not in the seeded subset: {self.not_sampled}")


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


def columns_of(raw: pa.Table | list[dict[str, Any]]) -> list[str]:
    if isinstance(raw, pa.Table):
        return [c for c in raw.column_names if c != BAD_ROW]
    seen: dict[str, None] = {}
    for row in raw:
        seen.update(dict.fromkeys(k for k in row if k != BAD_ROW))
    return list(seen)


def mapped_rows(raw: pa.Table | list[dict[str, Any]], indices: Iterable[int],
                mapping: dict[str, str]) -> list[dict[str, Any]]:
    """Rows at `indices` with our field names; a field a row lacks is left out (to be counted as missing), and a
    row standing for an unreadable line keeps its BAD_ROW reason."""
    indices = list(indices)
    if isinstance(raw, pa.Table):
        names = list(dict.fromkeys([*mapping.values(), *([BAD_ROW] if BAD_ROW in raw.column_names else [])]))
        raw = raw.select(names).take(indices).to_pylist()
        indices = range(len(raw))
    return [map_row(raw[i], mapping) for i in indices]


def map_row(row: dict[str, Any], mapping: dict[str, str]) -> dict[str, Any]:
    out = {ours: row[theirs] for ours, theirs in mapping.items() if theirs in row}
    if row.get(BAD_ROW):
        out[BAD_ROW] = row[BAD_ROW]
    return out


def record_problem(row: dict[str, Any], fields: tuple[str, ...]) -> str | None:
    """Why a record is bad ("missing_id", "empty_document", "not_utf8_line", ...), or None."""
    if row.get(BAD_ROW):
        return str(row[BAD_ROW])
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


def valid_id(row: dict[str, Any]) -> str | None:
    """The record's id as text, or None when it has none usable (such records are counted, not deduplicated)."""
    if row.get(BAD_ROW):
        return None
    rid = row.get("id")
    if rid is None or isinstance(rid, bool) or not isinstance(rid, (str, int)) or not str(rid).strip():
        return None
    return str(rid).strip()


def validate_records(rows: Iterable[dict[str, Any]], cfg: DataSettings, stats: DataStats,
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


def check_unique_ids(ids: Iterable[str | None], where: str,
                     fix: str = "deduplicate the data or map another column with data.columns.id") -> None:
    """The one duplicate-id check (sources, the Ray job's id pass, summarize outputs); records without a usable id
    are not duplicates of each other: they are counted as bad records."""
    dupes = [i for i, n in Counter(i for i in ids if i is not None).items() if n > 1]
    if dupes:
        raise DataError(f"{where}: {len(dupes)} duplicate id(s), e.g. {dupes[0]!r}; ids must be unique ({fix})")


CANONICAL = ("id", "document", "summary", "problem")


def canonical_rows(rows: Iterable[dict[str, Any]], cfg: DataSettings, require_summary: bool) -> list[dict[str, Any]]:
    """Mapped rows -> our columns with plain text values and `problem` ("" for a good record), one per row.

    What the Ray summarize job streams: fixed columns and types whatever the source held (a Ray block cannot mix a
    text and a number in one column), and bad records keep their id and reason so they are counted, not lost.
    Raises in `data.on_bad_record=error` mode, as local mode does.
    """
    fields = ("document", "summary") if require_summary else ("document",)
    out = []
    for row in rows:
        problem = record_problem(row, fields)
        if problem:
            if cfg.on_bad_record == "error":
                raise DataError(f"{cfg.source}: a record (id {row.get('id')!r}) has {problem.replace('_', ' ')}; fix "
                                "the data or set data.on_bad_record=skip")
            out.append({"id": valid_id(row), "document": None, "summary": None, "problem": problem})
            continue
        [good] = validate_records([row], cfg, DataStats(source=cfg.source), require_summary)
        out.append({"id": good["id"], "document": good["document"], "summary": good.get("summary"), "problem": ""})
    return out

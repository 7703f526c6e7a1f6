"""Where records come from: a Hugging Face Hub dataset, JSONL/JSON/CSV/Parquet files (local or s3://, `.gz` too),
or the demo corpus.

Sources are read with their own column names; `phi2sum.data.records` maps and validates them. Local mode and the
Ray summarize job find a source's files and parse them with these same functions, so both see the same records:
the id/document/summary columns are read as text (a CSV id `0007` stays `0007`), a UTF-8 byte-order mark is
accepted, and with `data.on_bad_record=skip` an unreadable line is a counted bad record, not the end of the run.
"""

from __future__ import annotations

import gzip
import io
import json
import logging
import os
import re
from dataclasses import dataclass
from typing import Any, Callable

import pyarrow as pa
import pyarrow.csv as pacsv

from phi2sum import demo, storage
from phi2sum.config import DataSettings
from phi2sum.errors import DataError, Phi2SumError

log = logging.getLogger(__name__)

EMBEDDED_PREFIX = "embedded:"
FORMATS = {".jsonl": "jsonl", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
SUFFIXES = (*FORMATS, *(f"{s}.gz" for s in FORMATS if s != ".parquet"))
KNOWN_SPLITS = ("train", "validation", "valid", "val", "dev", "test")
BAD_ROW = "_phi2sum_bad_row"  # a row that stands for an unreadable line: its value is the reason it is skipped
HUB_PARQUET_REVISION = "refs/convert/parquet"  # the Hub's parquet export of every dataset, scripts or not


@dataclass
class Raw:
    """A source's rows with their own column names: a table, or JSON rows (some may be BAD_ROW markers)."""

    data: pa.Table | list[dict[str, Any]]
    files: list[str]

    def __len__(self) -> int:
        return self.data.num_rows if isinstance(self.data, pa.Table) else len(self.data)


def split_source(cfg: DataSettings, split: str) -> str:
    """The concrete source of a split: `{split}` in a file source is replaced by the split name."""
    return cfg.source.replace("{split}", split)


def is_file_source(source: str) -> bool:
    """Files (local or S3), not a hub id: s3://, a known suffix, a path that exists, or one that looks like a path."""
    if source.startswith(EMBEDDED_PREFIX):
        return False
    return storage.is_s3(source) or source.endswith(SUFFIXES) or os.path.exists(os.path.expanduser(source)) or \
        source.startswith((".", "/", "~"))


def read_raw(cfg: DataSettings, split: str) -> Raw:
    """Read one split of the configured source, with its own column names and no validation yet."""
    source = split_source(cfg, split)
    if source.startswith(EMBEDDED_PREFIX):
        if source != demo.EMBEDDED_DATA:
            raise DataError(f"unknown embedded dataset '{source}'; the only one is {demo.EMBEDDED_DATA}")
        return Raw(demo.synthetic_records(split), [source])
    if not is_file_source(source):
        return Raw(read_hub(source, split), [source])
    files = source_files(source, split, splits_of(cfg))
    parsed = [parse_file(uri, storage.read_bytes(uri), text_columns(cfg), cfg.on_bad_record == "skip")
              for uri in files]
    return Raw(_concat(source, parsed), files)


def splits_of(cfg: DataSettings) -> tuple[str, ...]:
    """The split names a folder's files may be named after."""
    return tuple(dict.fromkeys((cfg.train_split, cfg.eval_split, *KNOWN_SPLITS)))


def text_columns(cfg: DataSettings) -> set[str]:
    """The source columns read as text whatever they look like (ids, documents, summaries)."""
    return {"id", "document", "summary", *cfg.columns.values()}


# --- files ---------------------------------------------------------------------------------------------------


def source_files(source: str, split: str, split_names: tuple[str, ...] = KNOWN_SPLITS) -> list[str]:
    """The data files of a file source for `split`, sorted: the file itself, or a folder's data files.

    A folder whose files or sub-folders are named after splits (`train.jsonl` + `test.jsonl`, `train/part-0.parquet`,
    `validation-sample.jsonl`) gives each split its own files; a folder without split names is one pool for every
    split (said in the log, since then train and eval are drawn from the same records).
    """
    uri = source if storage.is_s3(source) else os.path.expanduser(source)
    if not storage.exists(uri):
        raise DataError(f"data source '{source}' does not exist; check data.source (use {{split}} for per-split files)")
    relative = storage.list_relative(uri)
    if not relative and len(files := storage.list_files(uri)) == 1:  # a single file
        _format_of(files[0])  # refuse an unknown format by name
        return files
    data = [rel for rel in relative
            if rel.endswith(SUFFIXES) and not any(part.startswith(("_", ".")) for part in rel.split("/"))]
    if not data:
        raise DataError(f"no {', '.join(SUFFIXES)} files under '{source}'; point data.source at your data")
    named = {rel: _split_named(rel, split_names) for rel in data}
    if not any(named.values()):
        log.info("%s: no file or folder is named after a split, so every split reads all %d file(s)", source, len(data))
        return [storage.join(uri, rel) for rel in data]
    mine = [rel for rel in data if named[rel] == split]
    if not mine:
        found = ", ".join(sorted({s for s in named.values() if s}))
        raise DataError(f"'{source}' has files for split(s) {found} but none for '{split}'; set data.train_split / "
                        "data.eval_split to one of those")
    return [storage.join(uri, rel) for rel in mine]


def _split_named(relpath: str, split_names: tuple[str, ...]) -> str | None:
    """The split a file belongs to by its name (`test.jsonl`, `train-00000-of-00002.parquet`, `validation/x.csv`)."""
    for part in relpath.split("/"):
        for name in split_names:
            if re.fullmatch(rf"{re.escape(name)}([-_.].*)?", part):
                return name
    return None


def _format_of(uri: str) -> tuple[str, bool]:
    """(format, gzip-compressed) from a file name; an unknown suffix is an error that lists the known ones."""
    name = uri.rsplit("/", 1)[-1].lower()
    compressed = name.endswith(".gz")
    stem = name[:-3] if compressed else name
    for suffix, fmt in FORMATS.items():
        if stem.endswith(suffix) and not (compressed and fmt == "parquet"):
            return fmt, compressed
    raise DataError(f"{uri}: unknown data format; use one of {', '.join(SUFFIXES)}")


def parse_file(uri: str, data: bytes, text_columns: set[str], skip_bad_lines: bool) -> pa.Table | list[dict]:
    """One file's rows: a table (Parquet, CSV) or JSON rows; local mode and the Ray job parse with this."""
    fmt, compressed = _format_of(uri)
    if compressed and data[:2] == b"\x1f\x8b":  # pyarrow's input streams may have decompressed it already
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError) as exc:
            raise DataError(f"{uri}: not a readable gzip file ({exc}); re-compress it or point at the plain file") from None
    if fmt == "parquet":
        return _parse_parquet(uri, data)
    if fmt == "csv":
        return _parse_csv(uri, data, text_columns, skip_bad_lines)
    if fmt == "json" and data.lstrip(b"\xef\xbb\xbf \t\r\n").startswith(b"["):
        return _parse_json_array(uri, data)
    return parse_jsonl(uri, data, skip_bad_lines)


def _parse_parquet(uri: str, data: bytes) -> pa.Table:
    import pyarrow.parquet as pq

    try:
        return pq.read_table(io.BytesIO(data))
    except pa.ArrowException as exc:
        raise DataError(f"{uri}: not a readable Parquet file ({str(exc).splitlines()[0][:160]})") from None


def _parse_csv(uri: str, data: bytes, text_columns: set[str], skip_bad_lines: bool) -> pa.Table:
    skipped: list[int] = []

    def on_bad_row(row) -> str:
        skipped.append(row.number or 0)
        return "skip"

    try:
        table = pacsv.read_csv(
            io.BytesIO(data),
            parse_options=pacsv.ParseOptions(invalid_row_handler=on_bad_row if skip_bad_lines else None),
            convert_options=pacsv.ConvertOptions(column_types={c: pa.string() for c in text_columns}))
    except pa.ArrowInvalid as exc:
        raise DataError(f"{uri}: not a readable CSV file ({str(exc).splitlines()[0][:160]}); fix the file or set "
                        "data.on_bad_record=skip to skip malformed rows") from None
    if skipped:
        log.warning("%s: skipped %d malformed CSV row(s), e.g. row %d", uri, len(skipped), skipped[0])
        marker = pa.array([None] * table.num_rows + ["malformed_csv_row"] * len(skipped), pa.string())
        table = pa.concat_tables([table, pa.table({c: pa.nulls(len(skipped), t) for c, t in
                                                   zip(table.column_names, table.schema.types)})])
        table = table.append_column(BAD_ROW, marker)
    return table


def _parse_json_array(uri: str, data: bytes) -> list[dict[str, Any]]:
    try:
        rows = json.loads(data.decode("utf-8-sig"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{uri}: not valid UTF-8 JSON ({exc}); fix the file") from None
    return [r if isinstance(r, dict) else {BAD_ROW: "not_an_object"} for r in rows]


def parse_jsonl(uri: str, data: bytes, skip_bad_lines: bool) -> list[dict[str, Any]]:
    """JSON lines, decoded strictly as UTF-8 so bad bytes are reported by line (or counted, with skip)."""
    rows = []
    for number, line in enumerate(data.splitlines(), start=1):
        if number == 1 and line.startswith(b"\xef\xbb\xbf"):
            line = line[3:]  # a UTF-8 byte-order mark (written by some Windows tools)
        if not line.strip():
            continue
        problem, row = _parse_line(line)
        if problem is None:
            rows.append(row)
        elif skip_bad_lines:
            rows.append({BAD_ROW: problem})
        else:
            raise DataError(f"{uri}: line {number} {_LINE_ERRORS[problem]}; fix or remove that line, or set "
                            "data.on_bad_record=skip")
    return rows


_LINE_ERRORS = {"not_utf8_line": "is not valid UTF-8 (re-encode the file as UTF-8)",
                "invalid_json_line": "is not valid JSON", "not_an_object": "is not a JSON object (one record a line)"}


def _parse_line(line: bytes) -> tuple[str | None, dict[str, Any] | None]:
    try:
        row = json.loads(line.decode("utf-8"))
    except UnicodeDecodeError:
        return "not_utf8_line", None
    except json.JSONDecodeError:
        return "invalid_json_line", None
    return (None, row) if isinstance(row, dict) else ("not_an_object", None)


def _concat(source: str, parsed: list[pa.Table | list[dict]]) -> pa.Table | list[dict]:
    if any(isinstance(p, list) for p in parsed):
        return [row for p in parsed for row in (p if isinstance(p, list) else p.to_pylist())]
    try:
        return pa.concat_tables(parsed, promote_options="permissive")
    except pa.ArrowInvalid as exc:
        raise DataError(f"files under '{source}' have incompatible columns ({exc}); use one schema") from None


# --- the Hugging Face Hub ------------------------------------------------------------------------------------


def read_hub(source: str, split: str, load: Callable | None = None) -> pa.Table:
    """A hub dataset's split; one that ships only a loading script (refused by `datasets` 4+) is read from the
    Hub's parquet export instead, which is what the `datasets` docs recommend."""
    if load is None:
        import datasets

        load = datasets.load_dataset
    try:
        try:
            return load(source, split=split).data.table
        except Exception as exc:  # noqa: BLE001 - only the script refusal is retried
            if "scripts are no longer supported" not in str(exc).lower():
                raise
        log.warning("%s ships only a loading script, which datasets>=4 no longer runs; reading the Hub's parquet "
                    "export (revision %s) instead", source, HUB_PARQUET_REVISION)
        return load(source, split=split, revision=HUB_PARQUET_REVISION).data.table
    except Phi2SumError:
        raise
    except Exception as exc:  # offline, unknown id, unknown split: all user-fixable
        reason = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise DataError(f"could not fetch dataset '{source}' split '{split}' from the Hugging Face Hub ({reason}); "
                        "check the network or point data.source at a local/s3:// JSONL, Parquet or CSV file") from None

"""Data: every source kind, column mapping, each bad-record kind, duplicate ids and seeded subsets."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from phi2sum.config import DataConfig
from phi2sum.data import load_split, load_train_eval
from phi2sum.errors import DataError
from tests.shared_data import XSUM_DIR, needs_xsum


def good(i):
    return {"id": f"r{i}", "document": f"Document number {i} says something.", "summary": f"Summary {i}."}


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def cfg_for(source, **kw):
    return DataConfig(source=source, num_train=None, num_eval=None, **kw)


@pytest.mark.parametrize("fmt", ["jsonl", "parquet", "csv"])
def test_reads_each_file_format(tmp_path, fmt):
    rows = [good(i) for i in range(5)]
    path = tmp_path / f"d.{fmt}"
    if fmt == "jsonl":
        write_jsonl(path, rows)
    elif fmt == "parquet":
        pq.write_table(pa.Table.from_pylist(rows), path)
    else:
        import pyarrow.csv as pacsv

        pacsv.write_csv(pa.Table.from_pylist(rows), str(path))
    split = load_split(cfg_for(str(path)), "train")
    assert [r["id"] for r in split.records] == [f"r{i}" for i in range(5)]
    assert split.stats.kept == 5 and split.stats.skipped == {}


def test_split_placeholder_and_column_mapping(tmp_path):
    rows = [{"key": i, "text": f"Body {i}.", "headline": f"Head {i}."} for i in range(4)]
    write_jsonl(tmp_path / "train.jsonl", rows)
    cfg = cfg_for(str(tmp_path / "{split}.jsonl"), columns={"id": "key", "document": "text", "summary": "headline"})
    split = load_split(cfg, "train")
    assert split.records[0] == {"id": "0", "document": "Body 0.", "summary": "Head 0."}


def test_missing_column_names_the_fix(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"id": "a", "article": "x", "summary": "y"}])
    with pytest.raises(DataError, match=r"no column 'document'.*data.columns.document="):
        load_split(cfg_for(path), "train")


BAD = [
    ({"id": "b1", "document": "   ", "summary": "s"}, "empty_document"),
    ({"id": "b2", "document": "d", "summary": ""}, "empty_summary"),
    ({"id": "b3", "summary": "s"}, "missing_document"),
    ({"id": "b4", "document": 42, "summary": "s"}, "non_string_document"),
    ({"id": "b5", "document": "d", "summary": ["s"]}, "non_string_summary"),
    ({"id": None, "document": "d", "summary": "s"}, "missing_id"),
]


def test_bad_records_are_counted_and_skipped(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [good(0), *[row for row, _ in BAD], good(1)])
    split = load_split(cfg_for(path), "train")
    assert [r["id"] for r in split.records] == ["r0", "r1"]
    assert split.stats.skipped == {reason: 1 for _, reason in BAD}
    assert split.stats.total == 2 + len(BAD)


@pytest.mark.parametrize("row, reason", BAD)
def test_bad_records_rejected_on_error(tmp_path, row, reason):
    path = write_jsonl(tmp_path / "d.jsonl", [good(0), row])
    with pytest.raises(DataError, match=reason.replace("_", " ")):
        load_split(cfg_for(path, on_bad_record="error"), "train")


def test_duplicate_ids_are_an_error(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [good(0), good(1), good(0)])
    with pytest.raises(DataError, match="duplicate id.*'r0'"):
        load_split(cfg_for(path), "train")


def test_non_utf8_jsonl_names_the_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(json.dumps(good(0)).encode() + b"\n" + b'{"id": "x", "document": "caf\xe9", "summary": "s"}\n')
    with pytest.raises(DataError, match="line 2 is not valid UTF-8"):
        load_split(cfg_for(str(path)), "train")


def test_empty_dataset_is_an_error(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("")
    with pytest.raises(DataError):
        load_split(cfg_for(str(path)), "train")


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_split(cfg_for(str(tmp_path / "nope.jsonl")), "train")


def test_huge_document_is_cut_not_a_crash(tmp_path):
    row = {"id": "big", "document": "word " * 250_000, "summary": "s"}  # 1.25 MB
    split = load_split(cfg_for(write_jsonl(tmp_path / "d.jsonl", [row]), max_document_chars=10_000), "train")
    assert len(split.records[0]["document"]) <= 10_000 and split.stats.cut_documents == 1


def test_seeded_subset_is_stable_and_replaces_skipped(tmp_path):
    rows = [good(i) for i in range(50)] + [{"id": f"bad{i}", "document": "", "summary": "s"} for i in range(20)]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    cfg = DataConfig(source=path, num_train=10, seed=7)
    a, b = load_split(cfg, "train", 10), load_split(cfg, "train", 10)
    assert [r["id"] for r in a.records] == [r["id"] for r in b.records]
    assert len(a.records) == 10 and all(r["id"].startswith("r") for r in a.records)
    other = load_split(DataConfig(source=path, seed=8), "train", 10)
    assert [r["id"] for r in other.records] != [r["id"] for r in a.records]


def test_same_file_for_train_and_eval_gives_disjoint_splits(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [good(i) for i in range(30)])
    train, ev = load_train_eval(DataConfig(source=path, num_train=None, num_eval=5))
    assert len(ev.records) == 5 and len(train.records) == 25
    assert not {r["id"] for r in train.records} & {r["id"] for r in ev.records}


def test_embedded_source():
    split = load_split(DataConfig(source="embedded:synthetic-xsum"), "test", 7)
    assert len(split.records) == 7 and all(r["summary"] for r in split.records)


def test_unreachable_hub_dataset_is_one_line(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DataError, match="could not fetch dataset 'no-such-org/no-such-set'") as info:
        load_split(DataConfig(source="no-such-org/no-such-set"), "train", 5)
    assert "\n" not in str(info.value)


@needs_xsum
def test_real_xsum_sample():
    split = load_split(DataConfig(source=str(XSUM_DIR / "validation-sample.jsonl")), "validation", 100)
    assert len(split.records) == 100
    assert len({r["id"] for r in split.records}) == 100

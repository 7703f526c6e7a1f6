"""Data: every source kind, column mapping, each bad-record kind, duplicate ids and seeded subsets."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from phi2sum.config import DataSettings
from phi2sum.data import load_split, load_train_eval
from phi2sum.errors import DataError
from support.records import good, write_jsonl
from support.shared import XSUM_DIR, needs_xsum


def cfg_for(source, **kw):
    return DataSettings(source=source, num_train=None, num_eval=None, **kw)


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
    assert [r["id"] for r in split.records] == [f"g{i}" for i in range(5)]
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
    assert [r["id"] for r in split.records] == ["g0", "g1"]
    assert split.stats.skipped == {reason: 1 for _, reason in BAD}
    assert split.stats.total == 2 + len(BAD)


@pytest.mark.parametrize("row, reason", BAD)
def test_bad_records_rejected_on_error(tmp_path, row, reason):
    path = write_jsonl(tmp_path / "d.jsonl", [good(0), row])
    with pytest.raises(DataError, match=reason.replace("_", " ")):
        load_split(cfg_for(path, on_bad_record="error"), "train")


def test_duplicate_ids_are_an_error(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [good(0), good(1), good(0)])
    with pytest.raises(DataError, match="duplicate id.*'g0'"):
        load_split(cfg_for(path), "train")


def test_unreadable_lines_are_skipped_and_counted_or_named_on_error(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(json.dumps(good(0)).encode() + b"\n" + b'{"id": "x", "document": "caf\xe9", "summary": "s"}\n'
                     + b'{"id": "y", "document": \n' + b'[1, 2]\n' + json.dumps(good(1)).encode() + b"\n")
    split = load_split(cfg_for(str(path)), "train")
    assert [r["id"] for r in split.records] == ["g0", "g1"]
    assert split.stats.skipped == {"not_utf8_line": 1, "invalid_json_line": 1, "not_an_object": 1}
    with pytest.raises(DataError, match="line 2 is not valid UTF-8"):
        load_split(cfg_for(str(path), on_bad_record="error"), "train")


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
    cfg = DataSettings(source=path, num_train=10, seed=7)
    a, b = load_split(cfg, "train", 10), load_split(cfg, "train", 10)
    assert [r["id"] for r in a.records] == [r["id"] for r in b.records]
    assert len(a.records) == 10 and all(r["id"].startswith("g") for r in a.records)
    other = load_split(DataSettings(source=path, seed=8), "train", 10)
    assert [r["id"] for r in other.records] != [r["id"] for r in a.records]


def test_same_file_for_train_and_eval_gives_disjoint_splits(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [good(i) for i in range(30)])
    train, ev = load_train_eval(DataSettings(source=path, num_train=None, num_eval=5))
    assert len(ev.records) == 5 and len(train.records) == 25
    assert not {r["id"] for r in train.records} & {r["id"] for r in ev.records}


def test_embedded_source():
    split = load_split(DataSettings(source="embedded:synthetic-xsum"), "test", 7)
    assert len(split.records) == 7 and all(r["summary"] for r in split.records)


def test_unreachable_hub_dataset_is_one_line(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DataError, match="could not fetch dataset 'no-such-org/no-such-set'") as info:
        load_split(DataSettings(source="no-such-org/no-such-set"), "train", 5)
    assert "\n" not in str(info.value)


@needs_xsum
def test_real_xsum_sample():
    split = load_split(DataSettings(source=str(XSUM_DIR / "validation-sample.jsonl")), "validation", 100)
    assert len(split.records) == 100
    assert len({r["id"] for r in split.records}) == 100


# --- issue: every record used or counted, files read as the user wrote them ---------------------------------


def test_every_record_is_used_or_counted(tmp_path):
    rows = [good(i) for i in range(40)] + [{"id": "", "document": "d", "summary": "s"},  # two empty ids: bad, not dupes
                                           {"id": " ", "document": "d", "summary": "s"},
                                           {"id": "e1", "document": "", "summary": "s"}]
    path = tmp_path / "d.jsonl"
    path.write_bytes("".join(json.dumps(r) + "\n" for r in rows).encode() + b"\xff\xfe not json\n")
    train, ev = load_train_eval(DataSettings(source=str(path), num_train=20, num_eval=8))
    for split in (train, ev):
        st = split.stats
        assert st.in_source == 44
        assert st.kept + sum(st.skipped.values()) + st.held_out + st.not_sampled == st.in_source
        assert st.not_sampled >= 0
    assert train.stats.held_out == 8 and train.stats.kept == 20
    assert set(train.stats.to_dict()) >= {"in_source", "kept", "skipped", "held_out", "not_sampled"}


def test_the_seeded_subset_does_not_depend_on_row_order(tmp_path):
    import random

    rows = [good(i) for i in range(60)]
    a = write_jsonl(tmp_path / "a.jsonl", rows)
    random.Random(3).shuffle(rows)
    b = write_jsonl(tmp_path / "b.jsonl", rows)
    pick = lambda path: sorted(r["id"] for r in load_split(DataSettings(source=path, seed=5), "train", 12).records)
    assert pick(a) == pick(b)


def test_a_folder_with_split_files_gives_each_split_its_own(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", [good(i) for i in range(6)])
    write_jsonl(tmp_path / "test.jsonl", [{**good(i), "id": f"t{i}"} for i in range(3)])
    train, ev = load_train_eval(DataSettings(source=str(tmp_path), num_train=None, num_eval=None))
    assert {r["id"] for r in train.records} == {f"g{i}" for i in range(6)}
    assert {r["id"] for r in ev.records} == {f"t{i}" for i in range(3)} and train.stats.held_out == 0
    with pytest.raises(DataError, match="files for split.*test, train.*none for 'validation'"):
        load_split(DataSettings(source=str(tmp_path)), "validation")


def test_split_sub_folders_and_hub_style_names(tmp_path):
    (tmp_path / "train").mkdir()
    pq.write_table(pa.Table.from_pylist([good(i) for i in range(4)]), tmp_path / "train" / "part-0.parquet")
    pq.write_table(pa.Table.from_pylist([{**good(9), "id": "v9"}]), tmp_path / "validation-00000-of-00001.parquet")
    cfg = DataSettings(source=str(tmp_path), eval_split="validation", num_train=None, num_eval=None)
    train, ev = load_train_eval(cfg)
    assert len(train.records) == 4 and [r["id"] for r in ev.records] == ["v9"]


def test_a_folder_without_split_names_is_one_pool_and_eval_is_held_out(tmp_path, caplog):
    write_jsonl(tmp_path / "part-a.jsonl", [good(i) for i in range(10)])
    write_jsonl(tmp_path / "part-b.jsonl", [good(i) for i in range(10, 20)])
    with caplog.at_level("INFO"):
        train, ev = load_train_eval(DataSettings(source=str(tmp_path), num_train=None, num_eval=5))
    assert "no file or folder is named after a split" in caplog.text
    assert len(ev.records) == 5 and len(train.records) == 15 and train.stats.held_out == 5


def test_csv_ids_keep_their_text(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("id,document,summary\n" + "".join(f"{i:04d},Doc {i}.,Sum {i}.\n" for i in range(16)))
    split = load_split(cfg_for(str(path)), "train")
    assert sorted(r["id"] for r in split.records) == [f"{i:04d}" for i in range(16)]


def test_malformed_csv_rows_are_counted(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("id,document,summary\na,Doc a.,Sum a.\nb,too,many,fields\nc,Doc c.,Sum c.\n")
    split = load_split(cfg_for(str(path)), "train")
    assert sorted(r["id"] for r in split.records) == ["a", "c"] and split.stats.skipped == {"malformed_csv_row": 1}
    with pytest.raises(DataError, match="not a readable CSV"):
        load_split(cfg_for(str(path), on_bad_record="error"), "train")


def test_byte_order_mark_and_gzip(tmp_path):
    import gzip

    text = "".join(json.dumps(good(i)) + "\n" for i in range(3))
    bom = tmp_path / "bom.jsonl"
    bom.write_bytes(b"\xef\xbb\xbf" + text.encode())
    gz = tmp_path / "d.jsonl.gz"
    gz.write_bytes(gzip.compress(text.encode()))
    for path in (bom, gz):
        assert [r["id"] for r in load_split(cfg_for(str(path)), "train").records] == ["g0", "g1", "g2"]


def test_a_relative_path_is_a_file_not_a_hub_id(tmp_path, monkeypatch):
    write_jsonl(tmp_path / "mine.jsonl", [good(0)])
    (tmp_path / "table.tsv").write_text("id\tdocument\n")
    monkeypatch.chdir(tmp_path)
    assert load_split(cfg_for("mine.jsonl"), "train").records[0]["id"] == "g0"
    with pytest.raises(DataError, match="table.tsv: unknown data format; use one of .jsonl"):
        load_split(cfg_for("table.tsv"), "train")


def test_a_script_only_hub_dataset_is_read_from_its_parquet_export(caplog):
    from phi2sum.data import read_hub

    calls = []

    class Loaded:
        data = type("Data", (), {"table": pa.Table.from_pylist([good(0)])})()

    def stand_in_loader(source, split, revision=None):
        calls.append(revision)
        if revision is None:
            raise RuntimeError("Dataset scripts are no longer supported, but found xsum.py")
        return Loaded()

    with caplog.at_level("WARNING"):
        table = read_hub("EdinburghNLP/xsum", "test", load=stand_in_loader)
    assert calls == [None, "refs/convert/parquet"] and table.num_rows == 1
    assert "parquet export" in caplog.text

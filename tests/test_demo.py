"""Tests for the embedded default: the synthetic corpus, the cached tiny Phi and the build-once cache.

The model is built once for the module, with fewer pre-training steps than the real recipe so the suite stays
fast; that also gives it its own recipe hash, so it never reuses a cache built with the real recipe. The
recipe and the build live in `phi2sum.demo.tiny_model`, so that is the module the tests patch.
"""

import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from phi2sum import demo
from phi2sum.demo import EMBEDDED_DATA, EMBEDDED_MODEL, cache, synthetic_records, tiny_model, tiny_model_path
from phi2sum.errors import DataError

SPLITS = ("train", "validation", "test")
TEST_PRETRAIN_STEPS = 60


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """(model folder, cache root) for one build shared by the module's model tests."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(tiny_model.RECIPE["pretrain"], "steps", TEST_PRETRAIN_STEPS)
        root = tmp_path_factory.mktemp("phi2sum-cache")
        path = tiny_model_path(str(root))
        yield Path(path), root


@pytest.fixture
def fake_build(monkeypatch):
    """Replace the expensive build with one that writes nothing (the cache writes the build-info file), and
    count the calls."""
    calls = []

    def _fake(dest: Path) -> None:
        calls.append(dest)
        time.sleep(0.3)  # long enough for concurrent callers to pile up on the lock

    monkeypatch.setattr(tiny_model, "_build", _fake)
    return calls


# ---------------------------------------------------------------- corpus


def test_names():
    assert EMBEDDED_MODEL == "embedded:tiny-phi"
    assert EMBEDDED_DATA == "embedded:synthetic-xsum"


@pytest.mark.parametrize("split,size", [("train", 480), ("validation", 60), ("test", 120)])
def test_split_sizes_and_determinism(split, size):
    first, second = synthetic_records(split), synthetic_records(split)
    assert len(first) == size
    assert first == second
    assert all(set(r) == {"id", "document", "summary"} for r in first)
    assert all(isinstance(v, str) and v for r in first for v in r.values())


@pytest.mark.slow
def test_corpus_does_not_depend_on_hash_randomisation():
    code = ("import json, hashlib; from phi2sum.demo import synthetic_records; "
            "print(hashlib.sha256(json.dumps([synthetic_records(s) for s in ('train','validation','test')])"
            ".encode()).hexdigest())")
    digests = {
        subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True,
                       env={**os.environ, "PYTHONHASHSEED": seed}).stdout.strip()
        for seed in ("1", "2")
    }
    assert len(digests) == 1


def test_ids_unique_and_disjoint_across_splits():
    ids = {s: [r["id"] for r in synthetic_records(s)] for s in SPLITS}
    for s in SPLITS:
        assert len(set(ids[s])) == len(ids[s])
        assert all(i.startswith(f"syn-{s}-") for i in ids[s])
    all_ids = [i for s in SPLITS for i in ids[s]]
    assert len(set(all_ids)) == len(all_ids)
    docs = [r["document"] for s in SPLITS for r in synthetic_records(s)]
    assert len(set(docs)) == len(docs)  # no article leaks from train into validation or test


def _key_tokens(summary: str) -> list[str]:
    """Names and numbers of a summary: capitalised words, digits and amounts, without punctuation."""
    words = [w.strip(".,;:\"") for w in summary.split()]
    return [w for w in words if w and (w[0].isupper() or w[0].isdigit() or w[0] == "£")]


@pytest.mark.parametrize("split", SPLITS)
def test_summary_key_entities_appear_in_document(split):
    for r in synthetic_records(split):
        doc, summary = r["document"], r["summary"]
        first, *rest = summary.split()
        # The first word is capitalised only because it starts the sentence ("Heavy rain ..."), so compare
        # it ignoring case; every other name or number must appear in the article exactly as written.
        assert first.strip(",").lower() in doc.lower(), (r["id"], first)
        for token in _key_tokens(" ".join(rest)):
            assert re.search(rf"(?<!\w){re.escape(token)}(?!\w)", doc), (r["id"], token, summary)


@pytest.mark.parametrize("split", SPLITS)
def test_lengths_and_shape(split):
    for r in synthetic_records(split):
        n_doc, n_sum = len(r["document"].split()), len(r["summary"].split())
        assert 60 <= n_doc <= 160, (r["id"], n_doc)
        assert 10 <= n_sum <= 25, (r["id"], n_sum)
        assert "\n" not in r["summary"] and r["summary"].endswith(".")
        assert r["summary"] not in r["document"]  # restates the facts, never copies a sentence
    assert any("\n" in r["document"] for r in synthetic_records(split))


STORY_MARKERS = ["final.", "profits", "by-election", "jailed", "researchers", "firefighters",
                 "Council approved", "Heavy", "Storm", "between"]


def test_story_types_vary():
    summaries = [r["summary"] for r in synthetic_records("test")]
    for marker in STORY_MARKERS:  # every kind of story shows up even in the small test split
        assert any(marker in s for s in summaries), marker
    assert len(set(summaries)) == len(summaries)


def test_unknown_split_raises_data_error():
    with pytest.raises(DataError) as info:
        synthetic_records("dev")
    message = str(info.value)
    assert "\n" not in message
    for s in SPLITS:
        assert s in message


# ---------------------------------------------------------------- model


def test_model_and_tokenizer_load_offline(built, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer, PhiForCausalLM

    path, _ = built
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    assert isinstance(model, PhiForCausalLM)
    assert tok.eos_token == tok.bos_token == tok.unk_token == "<|endoftext|>"
    assert model.config.eos_token_id == model.config.bos_token_id == tok.eos_token_id
    assert model.config.vocab_size == len(tok)
    assert model.get_input_embeddings().weight.dtype == torch.float32

    text = "### Article:\nAshford Rovers beat Kelby Town 3-1 on Saturday, £45m and café.\n\n### Summary:\n"
    ids = tok(text)["input_ids"]
    assert tok.decode(ids) == text
    assert tok.eos_token_id not in ids  # like Phi-2, no special tokens are added

    out = model.generate(torch.tensor([ids]), max_new_tokens=3, do_sample=False, pad_token_id=tok.eos_token_id)
    assert out.shape[1] == len(ids) + 3


def test_build_info_and_recipe_hash_in_folder_name(built):
    path, root = built
    info = json.loads((path / demo.BUILD_INFO_FILE).read_text())
    assert path.parent == root
    assert info["recipe_hash"] in path.name
    assert info["steps"] == TEST_PRETRAIN_STEPS
    assert not [p for p in root.iterdir() if p.name.startswith(".")]  # no temp folder left behind


def test_second_call_reuses_the_build(built, monkeypatch):
    path, root = built
    stamp = (path / demo.BUILD_INFO_FILE).stat().st_mtime_ns

    def _no_rebuild(dest):
        raise AssertionError("rebuilt a cached model")

    monkeypatch.setattr(tiny_model, "_build", _no_rebuild)
    monkeypatch.setitem(tiny_model.RECIPE["pretrain"], "steps", TEST_PRETRAIN_STEPS)
    assert tiny_model_path(str(root)) == str(path)
    assert (path / demo.BUILD_INFO_FILE).stat().st_mtime_ns == stamp


def test_pretraining_lowered_the_loss(built):
    from transformers import AutoModelForCausalLM, AutoTokenizer, PhiForCausalLM

    path, _ = built
    info = json.loads((path / demo.BUILD_INFO_FILE).read_text())
    assert info["final_loss"] < info["first_loss"] - 2.0

    # Independently of the recorded numbers: the saved model beats a fresh random one on train text.
    tok = AutoTokenizer.from_pretrained(path)
    trained = AutoModelForCausalLM.from_pretrained(path)
    torch.manual_seed(0)
    untrained = PhiForCausalLM(trained.config)
    batch = tiny_model._batches(tok, [r["document"] for r in synthetic_records("train")[:8]], 8, 256)[0]
    assert tiny_model._mean_loss(trained, [batch]) < tiny_model._mean_loss(untrained, [batch]) - 2.0


def test_recipe_change_changes_the_folder(monkeypatch):
    before = demo.recipe_hash()
    monkeypatch.setitem(tiny_model.RECIPE["model"], "num_hidden_layers", 3)
    assert demo.recipe_hash() != before


def test_concurrent_callers_build_once(tmp_path, fake_build):
    results = []
    threads = [threading.Thread(target=lambda: results.append(tiny_model_path(str(tmp_path)))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(fake_build) == 1
    assert len(results) == 4 and len(set(results)) == 1
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_cache_dir_from_environment(tmp_path, fake_build, monkeypatch):
    monkeypatch.setenv("PHI2SUM_CACHE", str(tmp_path))
    assert Path(tiny_model_path()).parent == tmp_path


def test_failed_build_leaves_nothing_half_written(tmp_path, monkeypatch):
    def _broken(dest):
        (dest / "config.json").write_text("{}")
        raise RuntimeError("boom")

    monkeypatch.setattr(tiny_model, "_build", _broken)
    with pytest.raises(RuntimeError):
        tiny_model_path(str(tmp_path))
    assert not demo.is_built(str(tmp_path))
    assert [p.name for p in tmp_path.iterdir() if p.suffix != ".lock"] == []  # at most the lock file stays


def test_is_built_answers_without_building(tmp_path, fake_build):
    assert not demo.is_built(str(tmp_path))
    assert list(tmp_path.iterdir()) == [] and fake_build == []  # asking built nothing
    tiny_model_path(str(tmp_path))
    assert demo.is_built(str(tmp_path))
    assert len(fake_build) == 1


# ---------------------------------------------------------------- cache (the generic build-once helper)


def _counting_build(calls: list, files: dict[str, str] | None = None, info: dict | None = None, delay: float = 0.0):
    """A cheap stand-in for an expensive build: writes `files` (paths may have folders), returns `info`."""

    def build(dest: Path):
        calls.append(dest)
        time.sleep(delay)
        for rel, text in (files or {}).items():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            (dest / rel).write_text(text)
        return info

    return build


def _visible(root: Path) -> list[str]:
    """What a cache root holds besides lock files (whose lifetime is the lock library's business)."""
    return sorted(p.name for p in root.iterdir() if p.suffix != ".lock")


def test_cache_concurrent_callers_build_once(tmp_path):
    calls, results = [], []
    build = _counting_build(calls, {"weights.bin": "w"}, {"n": 1}, delay=0.3)
    threads = [threading.Thread(target=lambda: results.append(cache.cached_build(tmp_path, "thing", "abc", build)))
               for _ in range(5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1
    assert results == [tmp_path / "thing-abc"] * 5
    assert (tmp_path / "thing-abc" / "weights.bin").read_text() == "w"
    assert _visible(tmp_path) == ["thing-abc"]  # the temp folder was moved into place, none left over


def test_cache_failed_build_leaves_nothing_and_can_be_retried(tmp_path):
    def broken(dest: Path):
        (dest / "half.bin").write_text("x")
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        cache.cached_build(tmp_path, "thing", "abc", broken, marker="done.json")
    assert _visible(tmp_path) == []
    assert not cache.is_cached(tmp_path, "thing", "abc", "done.json")

    calls = []
    folder = cache.cached_build(tmp_path, "thing", "abc", _counting_build(calls, {"ok.bin": "y"}), marker="done.json")
    assert len(calls) == 1 and sorted(p.name for p in folder.iterdir()) == ["done.json", "ok.bin"]


def test_cache_marker_is_the_only_done_check(tmp_path):
    stale = tmp_path / "thing-abc"
    stale.mkdir()
    (stale / "weights.bin").write_text("half-written by something else")
    assert not cache.is_cached(tmp_path, "thing", "abc", "done.json")

    calls = []
    build = _counting_build(calls, {"weights.bin": "new", "sub/part.txt": "p"}, {"steps": 3})
    folder = cache.cached_build(tmp_path, "thing", "abc", build, marker="done.json")
    assert len(calls) == 1  # a folder without the marker was rebuilt from scratch
    assert (folder / "weights.bin").read_text() == "new"
    assert json.loads((folder / "done.json").read_text()) == {"steps": 3}  # the build's info is the marker
    assert cache.is_cached(tmp_path, "thing", "abc", "done.json")

    assert cache.cached_build(tmp_path, "thing", "abc", build, marker="done.json") == folder
    assert len(calls) == 1  # with the marker there, the folder is reused as it is
    assert cache.cached_build(tmp_path, "thing", "other-key", build, marker="done.json") != folder
    assert len(calls) == 2  # another key, another folder


def test_cache_build_is_readable_by_others(tmp_path):
    folder = cache.cached_build(tmp_path / "new-root", "thing", "abc", _counting_build([], {"sub/part.txt": "p"}))
    assert folder.stat().st_mode & 0o777 == 0o755
    assert (folder / "sub").stat().st_mode & 0o777 == 0o755
    assert (folder / "sub" / "part.txt").stat().st_mode & 0o777 == 0o644
    assert json.loads((folder / cache.DEFAULT_MARKER).read_text()) == {}  # a build returning None

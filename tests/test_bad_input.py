"""Bad input, as a demanding new user gives it, through the real entry points (`phi2sum` and `python -m jobs.*` as
subprocesses, on real files): every case ends in one `...: error: ...` line naming the problem and the fix, exit 2,
and nothing already written is lost. The catalogue below is also the README's table ("Bad input" section): a test
checks that every case is listed there.

Silent wrong results (exit 0 with a wrong answer) are the worst class; their tests follow the catalogue: records
used or counted, split files, text ids, the Ray job's subset, adapters that only partly fit, reruns after a failure.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from phi2sum import storage
from support.processes import PHI2SUM, REPO, one_line_error, phi2sum, run
from support.records import good, write_jsonl

pytestmark = pytest.mark.slow

FAST_GEN = ["generation.num_beams=1", "generation.max_new_tokens=8", "generation.batch_size=8"]
RUN_MARKER = storage.RUN_MARKER
PY = sys.executable


@dataclass
class Case:
    what: str  # the input, as the README's table names it
    argv: list[str]
    expected: str  # in the error line
    prog: str = "phi2sum"


def tree_snapshot(root: Path) -> dict[str, tuple[str, int]]:
    """relative path -> (sha256, mtime_ns) of every file under root."""
    return {str(p.relative_to(root)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.is_file()}


# --- the files a user gets wrong ---------------------------------------------------------------------------


def _tiny_phi(folder: Path, layers: int) -> str:
    """A small random Phi (hidden 64) with the demo's tokenizer, saved as a normal model folder."""
    from transformers import AutoTokenizer, PhiConfig, PhiForCausalLM

    from phi2sum.demo import tiny_model_path

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_path())
    PhiForCausalLM(PhiConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                             num_hidden_layers=layers, num_attention_heads=4, max_position_embeddings=256,
                             eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.eos_token_id)
                   ).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def _adapter(base: str, folder: Path) -> str:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "dense"], task_type="CAUSAL_LM")
    get_peft_model(AutoModelForCausalLM.from_pretrained(base), lora).save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, str]:
    d = tmp_path_factory.mktemp("bad-input")
    goods = [good(i) for i in range(6)]
    f = {"out": str(d / "runs"),
         "whitespace": write_jsonl(d / "ws.jsonl", [*goods, {"id": "w", "document": " \t\n ", "summary": "s"}]),
         "missing_column": write_jsonl(d / "mc.jsonl", [{"id": r["id"], "article": r["document"],
                                                         "summary": r["summary"]} for r in goods]),
         "duplicate_ids": write_jsonl(d / "dup.jsonl", [*goods, goods[2]]),
         "only_bad": write_jsonl(d / "ob.jsonl", [{"id": "a", "document": "", "summary": "s"},
                                                  {"id": "b", "document": "d", "summary": None}])}
    (d / "latin1.jsonl").write_bytes(json.dumps(goods[0]).encode() + b"\n" +
                                     b'{"id": "x", "document": "caf\xe9 au lait", "summary": "s"}\n')
    f["non_utf8"] = str(d / "latin1.jsonl")
    (d / "empty.jsonl").write_bytes(b"")
    f["empty"] = str(d / "empty.jsonl")
    (d / "table.tsv").write_text("id\tdocument\tsummary\n1\tx\ty\n")
    f["tsv"] = str(d / "table.tsv")
    (d / "splits").mkdir()
    write_jsonl(d / "splits" / "train.jsonl", goods)
    write_jsonl(d / "splits" / "validation.jsonl", goods)
    f["splits"] = str(d / "splits")
    (d / "latin1.yaml").write_bytes("run:\n  name: caf\xe9\n".encode("latin-1"))
    f["latin1_yaml"] = str(d / "latin1.yaml")
    (d / "empty-model").mkdir()
    f["empty_model"] = str(d / "empty-model")
    (d / "not-a-folder").write_text("a file")
    f["file"] = str(d / "not-a-folder")
    (d / "notes").mkdir()
    (d / "notes" / "todo.txt").write_text("not a run")
    f["not_a_run"] = str(d / "notes")
    (d / "text.parquet").write_text("this is not parquet")
    f["text_parquet"] = str(d / "text.parquet")
    pq.write_table(pa.table({"id": ["a"], "summary": ["s"]}), d / "no-prediction.parquet")
    f["no_prediction"] = str(d / "no-prediction.parquet")
    f["four_layers"] = _tiny_phi(d / "a" / "base", layers=4)
    f["two_layers"] = _tiny_phi(d / "b" / "base", layers=2)  # same name, same width: only the depth differs
    f["partial_adapter"] = _adapter(f["four_layers"], d / "adapter-4")
    f["other_adapter"] = _adapter(_tiny_phi(d / "other-base", layers=2), d / "adapter-other")
    corrupt = Path(_adapter(f["two_layers"], d / "adapter-corrupt"))
    weights = corrupt / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:40])  # cut short, as an interrupted copy leaves it
    f["corrupt_adapter"] = str(corrupt)
    return f


def catalogue(f: dict[str, str]) -> dict[str, Case]:
    """name -> the case. `what` is how the README's bad-input table names each input."""
    run_ = [PHI2SUM, "run", "--config", "tiny-cpu", f"storage.output={f['out']}", "data.num_eval=2"]
    summarize = [PHI2SUM, "summarize", "--config", "tiny-cpu", f"storage.output={f['out']}", "data.num_eval=2",
                 *FAST_GEN]
    strict = "data.on_bad_record=error"
    cases = [
        # the config, checked at load before anything else happens
        Case("a misspelt key", [*run_, "trian.max_steps=3"], "unknown config key 'trian'; did you mean 'train'?"),
        Case("a negative learning rate", [*run_, "train.learning_rate=-1e-4"],
             "'train.learning_rate' is -0.0001; it must be > 0"),
        Case("an infinite number", [*run_, "train.epochs=inf"], "'train.epochs' must be a finite number"),
        Case("a seed out of range", [*run_, "train.seed=-1"], "'train.seed' is -1; it must be in [0, 2**32)"),
        Case("an optimizer transformers does not know", [*run_, "train.optim=paged_adamw_8bitt", "run.name=optim"],
             "'train.optim' is 'paged_adamw_8bitt', which transformers does not know; did you mean 'paged_adamw_8bit'?"),
        Case("a template longer than the prompt budget",
             [*run_, "prompt.template=" + "Read this article with great care. " * 12 + "{document} Summary:",
              "generation.max_prompt_tokens=40", "run.name=template"],
             "prompt.template alone is"),
        Case("generation.max_prompt_tokens too small", [*run_, "generation.max_prompt_tokens=4"],
             "'generation.max_prompt_tokens' is 4; it must be >= 8 or null"),
        Case("a config file that is not UTF-8", [PHI2SUM, "run", "--config", f["latin1_yaml"]],
             "not UTF-8 text (byte 16); save the file as UTF-8"),
        Case("an empty output location", [*run_, "storage.output="], "'storage.output' is ''"),
        Case("a mangled S3 URI (`s3:/bucket/x`)", [*run_, "storage.output=s3:/bucket/x"],
             "'storage.output' is 's3:/bucket/x'; it must be a local path or s3://bucket[/prefix]"),
        Case("an output path through a file", [*run_, f"storage.output={f['file']}/runs", "run.name=through"],
             "not-a-folder is a file, not a folder; choose another location"),
        Case("eager attention in fp16", [*run_, "model.dtype=float16", "model.attn_implementation=eager"],
             "eager attention overflows to NaN in fp16"),
        Case("`jobs.train` with a negative learning rate",
             [PY, "-m", "jobs.train", "--config", "tiny-cpu", "train.learning_rate=-1"],
             "'train.learning_rate' is -1.0; it must be > 0", prog="jobs.train"),
        Case("`jobs.summarize` with 0 beams", [PY, "-m", "jobs.summarize", "--config", "tiny-cpu",
                                               f"output={f['out']}/j", "generation.num_beams=0"],
             "'generation.num_beams' is 0", prog="jobs.summarize"),
        Case("`jobs.summarize` with `shard=3/2`", [PY, "-m", "jobs.summarize", "--config", "tiny-cpu",
                                                   f"output={f['out']}/j", "shard=3/2"],
             "shard '3/2': need 0 <= i < n", prog="jobs.summarize"),
        # the model and adapters
        Case("a model path that does not exist", [PHI2SUM, "train", "--config", "tiny-cpu",
                                                 f"storage.output={f['out']}", "run.name=nomodel",
                                                 "model.base=/nonexistent"],
             "model path '/nonexistent' does not exist"),
        Case("an empty model folder", [*run_, f"model.base={f['empty_model']}", "run.name=emptymodel"],
             "has no config.json, so it is not a Hugging Face model folder"),
        Case("an adapter made for another base", [*summarize, f"model.adapter={f['other_adapter']}",
                                                  "run.name=foreign"],
             "does not match the base model: it was trained on"),
        Case("an adapter that only partly fits", [*summarize, f"model.base={f['two_layers']}",
                                                  f"model.adapter={f['partial_adapter']}", "run.name=partial"],
             "it only partly fits (16 of its 32 tensors have no place in the model"),
        Case("a truncated adapter_model.safetensors", [*summarize, f"model.base={f['two_layers']}",
                                                      f"model.adapter={f['corrupt_adapter']}", "run.name=corrupt"],
             "adapter_model.safetensors is truncated or corrupt"),
        # data: checked before the run folder is claimed
        Case("a blank document (with on_bad_record=error)",
             [*run_, f"data.source={f['whitespace']}", strict, "run.name=ws"],
             "(id 'w') has empty document; fix the data or set data.on_bad_record=skip"),
        Case("a missing column", [*run_, f"data.source={f['missing_column']}", "run.name=mc"],
             "no column 'document' for 'document' (columns: id, article, summary); "
             "set data.columns.document=<column name>"),
        Case("duplicate ids", [*run_, f"data.source={f['duplicate_ids']}", "run.name=dup"],
             "1 duplicate id(s), e.g. 'g2'; ids must be unique"),
        Case("a line that is not UTF-8 (with on_bad_record=error)",
             [*run_, f"data.source={f['non_utf8']}", strict, "run.name=latin1"],
             "line 2 is not valid UTF-8 (re-encode the file as UTF-8)"),
        Case("an empty file", [*run_, f"data.source={f['empty']}", "run.name=empty"], "the dataset is empty"),
        Case("only bad records", [*run_, f"data.source={f['only_bad']}", "run.name=onlybad"],
             "no usable records in split 'test' (2 read, skipped: "),
        Case("an unknown file format", [*run_, f"data.source={f['tsv']}", "run.name=tsv"],
             "table.tsv: unknown data format; use one of .jsonl"),
        Case("a folder without the split asked for", [*run_, f"data.source={f['splits']}", "run.name=splits"],
             "has files for split(s) train, validation but none for 'test'"),
        # predictions and reports
        Case("`phi2sum evaluate` on a file that is not Parquet", [PHI2SUM, "evaluate", "-p", f["text_parquet"]],
             "text.parquet is not a readable Parquet file"),
        Case("`phi2sum evaluate` on Parquet without `prediction`", [PHI2SUM, "evaluate", "-p", f["no_prediction"]],
             "the predictions have no 'prediction' column"),
        Case("`jobs.evaluate` on a folder that is no summarize output",
             [PY, "-m", "jobs.evaluate", f"predictions={f['not_a_run']}"], "pass a predictions.parquet, a run folder",
             prog="jobs.evaluate"),
        Case("`phi2sum report` on a folder that is not a run", [PHI2SUM, "report", f["not_a_run"]],
             "no run found at"),
    ]
    return {case.what: case for case in cases}


NAMES = list(catalogue({k: "" for k in ("out", "whitespace", "missing_column", "duplicate_ids", "only_bad", "non_utf8",
                                        "empty", "tsv", "splits", "latin1_yaml", "empty_model", "file", "not_a_run",
                                        "text_parquet", "no_prediction", "four_layers", "two_layers",
                                        "partial_adapter", "other_adapter", "corrupt_adapter")}))


@pytest.fixture(scope="module")
def results(files):
    """Every case's subprocess, two at a time (each is a cold start of the CLI: 2-5 s of imports)."""
    cases = catalogue(files)
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        futures = {name: pool.submit(run, case.argv) for name, case in cases.items()}
        return {name: (future.result(), cases[name]) for name, future in futures.items()}


@pytest.mark.parametrize("name", NAMES)
def test_bad_input_is_one_line_exit_2_and_loses_nothing(name, results, files):
    proc, case = results[name]
    line = one_line_error(proc, case.prog)
    assert case.expected in line, line
    run_name = next((a.split("=", 1)[1] for a in case.argv if a.startswith("run.name=")), None)
    if run_name:  # nothing ran: at most the run's claim and its config were written, no checkpoint or adapter
        folder = Path(files["out"]) / run_name
        written = {p.name for p in folder.rglob("*")} if folder.exists() else set()
        assert written <= {RUN_MARKER, "config.yaml"}, written


def test_the_readme_lists_every_case():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    table = readme[readme.index("## Bad input"):]
    assert [name for name in NAMES if f"| {name} |" not in table] == []


# --- silent wrong results, each class with its own test -------------------------------------------------------


@pytest.fixture(scope="module")
def skipping_run(tmp_path_factory):
    """`phi2sum summarize` on a file holding one of each bad record kind, an undecodable line and a 1 MB document."""
    d = tmp_path_factory.mktemp("skips")
    sentence = "The committee met again on Tuesday to discuss the long report on the state of local roads. "
    big = {"id": "big", "document": sentence * (1_048_576 // len(sentence) + 1), "summary": "Roads were discussed."}
    bad = [
        {"id": "ws", "document": "  \n\t ", "summary": "s"},
        {"id": "es", "document": "A short document.", "summary": "   "},
        {"id": "md", "summary": "a record without a document"},
        {"id": "nd", "document": 42, "summary": "s"},
        {"id": "nsum", "document": "A short document.", "summary": ["not", "a", "string"]},
        {"id": None, "document": "A short document.", "summary": "s"},
        {"id": ["a", "list"], "document": "A short document.", "summary": "s"},
        {"id": "", "document": "An empty id.", "summary": "s"},
        {"id": "", "document": "Another empty id: not a duplicate, a bad record.", "summary": "s"},
    ]
    rows = [good(0), bad[0], good(1), big, *bad[1:], good(2), good(3)]
    source = d / "messy.jsonl"
    source.write_bytes("".join(json.dumps(r) + "\n" for r in rows).encode() + b'{"id": "l1", "document": "caf\xe9"}\n')
    out = d / "runs"
    proc = phi2sum("summarize", "--config", "tiny-cpu", f"data.source={source}", "data.num_eval=null", *FAST_GEN,
                   f"storage.output={out}", "run.name=messy")
    return {"proc": proc, "run": out / "messy", "source": str(source), "out": out}


def test_every_record_is_used_or_counted_and_a_1mb_document_is_cut(skipping_run):
    proc, run_dir = skipping_run["proc"], skipping_run["run"]
    assert proc.returncode == 0, proc.stderr[-3000:]
    stats = json.loads((run_dir / "summary.json").read_text())["data"]["eval"]
    assert stats["skipped"] == {"empty_document": 1, "empty_summary": 1, "missing_document": 1,
                                "non_string_document": 1, "non_string_summary": 1, "missing_id": 1, "bad_id": 3,
                                "not_utf8_line": 1}
    assert (stats["in_source"], stats["kept"], stats["cut_documents"], stats["not_sampled"]) == (15, 5, 1, 0)
    assert "5 of 15 record(s) used; skipped: 3 bad_id" in proc.stderr  # the final log line accounts for all
    rows = {r["id"]: r for r in pq.read_table(run_dir / "predictions.parquet").to_pylist()}
    assert sorted(rows) == ["big", "g0", "g1", "g2", "g3"]  # every good record once, the huge one included
    assert rows["big"]["truncated"] and rows["big"]["prompt_tokens"] <= 256 - 8  # prompt cut to its budget
    assert len(rows["big"]["document"]) == 100_000  # data.max_document_chars


def test_same_name_with_another_config_is_refused_and_nothing_is_lost(skipping_run):
    assert skipping_run["proc"].returncode == 0
    run_dir = skipping_run["run"]
    before = tree_snapshot(run_dir)
    proc = phi2sum("run", "--config", "tiny-cpu", f"data.source={skipping_run['source']}", "data.num_eval=2",
                   "train.learning_rate=1e-3", f"storage.output={skipping_run['out']}", "run.name=messy")
    line = one_line_error(proc)
    assert f"{run_dir} already holds another run's outputs (run 'messy:" in line and "run.name" in line
    assert tree_snapshot(run_dir) == before  # not a byte, not a timestamp changed


def test_a_failed_attempt_does_not_block_its_corrected_rerun(tmp_path):
    """The attempt fails after claiming the folder (its LoRA targets match nothing, found only once the model is
    loaded); the rerun with the fix is a different config, and takes the folder over: it holds no outputs."""
    common = ["run", "--config", "tiny-cpu", f"storage.output={tmp_path}", "run.name=fixed", "data.num_train=8",
              "data.num_eval=2", "train.max_steps=1", "train.batch_size=2", "train.grad_accum=1", *FAST_GEN]
    failed = phi2sum(*common, "lora.target_modules=no_such_module")
    assert "LoRA could not attach" in one_line_error(failed)
    fixed = phi2sum(*common)
    assert fixed.returncode == 0, fixed.stderr[-3000:]
    assert (tmp_path / "fixed" / "metrics.json").is_file()


def test_text_ids_and_settings_keep_their_text_end_to_end(tmp_path):
    """CSV ids 0000-0015 (pyarrow would read them as integers 0-15) and a template with ` #` in it."""
    csv = tmp_path / "d.csv"
    csv.write_text("id,document,summary\n" + "".join(f"{i:04d},Town {i} built a bridge over the river.,Bridge {i}.\n"
                                                     for i in range(16)))
    proc = phi2sum("summarize", "--config", "tiny-cpu", f"data.source={csv}", "data.num_eval=null", *FAST_GEN,
                   "prompt.template=### Article: {document} ### Summary:", f"storage.output={tmp_path}/runs",
                   "run.name=csv")
    assert proc.returncode == 0, proc.stderr[-3000:]
    ids = pq.read_table(tmp_path / "runs" / "csv" / "predictions.parquet").column("id").to_pylist()
    assert sorted(ids) == [f"{i:04d}" for i in range(16)]
    config = (tmp_path / "runs" / "csv" / "config.yaml").read_text()
    assert "### Article: {document} ### Summary:" in config


def test_evaluate_takes_a_dataset_after_options_and_scores_a_shard_folder(tmp_path):
    """`jobs.evaluate predictions=... --config ... data.source=...` (options and key=value in any order), and a
    complete shard folder passed alone, beside a folder that is not a shard."""
    shard = tmp_path / "preds" / "shard-0-of-1"
    shard.mkdir(parents=True)
    rows = [good(i) for i in range(4)]
    pq.write_table(pa.table({"id": [r["id"] for r in rows], "prediction": [r["summary"] for r in rows]}),
                   shard / "part-a.parquet")
    (shard / "_SUCCESS.json").write_text("{}")
    (tmp_path / "preds" / "notes").mkdir()
    (tmp_path / "preds" / "notes" / "x.parquet").write_text("not ours")
    source = write_jsonl(tmp_path / "refs.jsonl", rows)
    whole = run([PY, "-m", "jobs.evaluate", f"predictions={tmp_path}/preds", "--config", "tiny-cpu",
                 f"data.source={source}"])
    assert whole.returncode == 0, whole.stderr[-2000:]
    assert json.loads((tmp_path / "preds" / "metrics.json").read_text())["rouge1"]["mean"] == pytest.approx(1.0)
    alone = run([PHI2SUM, "evaluate", f"predictions={shard}", "data.source=" + source, "--config", "tiny-cpu", "-v"])
    assert alone.returncode == 0, alone.stderr[-2000:]
    assert json.loads((shard / "metrics.json").read_text())["count"] == 4

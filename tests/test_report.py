"""The run report: produced for a real tiny run (local and on S3), for partial and corrupt runs, and its
numbers (metrics table, training statistics, CSV) read back equal to the run's own artifacts."""

from __future__ import annotations

import io
import json
import re
import shutil

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from PIL import Image

from phi2sum import storage
from phi2sum.errors import Phi2SumError
from phi2sum.report import ROUGE_LABELS, ROUGE_TYPES, TRAIN_ROWS, load_run, next_steps, write_report

PNGS = ("training_loss.png", "rouge_scores.png", "comparison.png", "dataset_analysis.png")
FILES = (*PNGS, "sample_predictions.txt", "all_predictions.csv", "report.md")


# --------------------------------------------------------------------------------------------- helpers


def copy_run(run_uri: str, dest, *, without: tuple[str, ...] = ()) -> str:
    """A private copy of a run folder (the session's tiny run stays untouched), minus checkpoints and `without`."""
    shutil.copytree(run_uri, dest, ignore=shutil.ignore_patterns("checkpoints", *without))
    return str(dest)


def rouge_plot_if_logged(run_uri: str) -> set[str]:
    """{"rouge_by_step.png"} when the run's train_log has ROUGE-at-checkpoint rows (train.rouge_steps), else {}."""
    log = storage.read_parquet(storage.join(run_uri, "train_log.parquet")).to_pandas()
    return {"rouge_by_step.png"} if "kind" in log and (log["kind"] == "rouge").any() else set()


def check_png(data: bytes) -> None:
    """A real image of sane size with plenty of drawn content."""
    Image.open(io.BytesIO(data)).verify()
    image = Image.open(io.BytesIO(data)).convert("RGB")
    width, height = image.size
    assert 600 <= width <= 4000 and 400 <= height <= 3000, image.size
    colors = image.getcolors(maxcolors=1 << 22)
    assert len(colors) > 100, f"only {len(colors)} colours: an empty plot?"
    pixels = np.asarray(image, dtype=np.int16)
    drawn = (np.abs(pixels - 255).sum(axis=2) > 30).mean()
    assert drawn > 0.03, f"only {drawn:.1%} of the pixels are not background"


def table_rows(markdown: str, first_cell: str) -> list[str]:
    """Cells of the markdown table row whose first cell is `first_cell`."""
    for line in markdown.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and cells[0] == first_cell:
            return cells
    raise AssertionError(f"no table row '{first_cell}' in the report")


def table_header(markdown: str, first_cell: str) -> list[str]:
    for line in markdown.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and cells[0] == first_cell and "Fine-tuned" in cells + ["Zero-shot baseline"]:
            return cells
    raise AssertionError(f"no table header starting '{first_cell}'")


def number(cell: str) -> float:
    return float(cell.replace(",", ""))


def check_metrics_table(markdown: str, metrics: dict, baseline: dict | None) -> None:
    header = table_header(markdown, "Metric")
    for name in ROUGE_TYPES:
        row = dict(zip(header, table_rows(markdown, ROUGE_LABELS[name])))
        m = metrics[name]
        assert number(row["Fine-tuned"]) == pytest.approx(100 * m["mean"], abs=0.0051)
        low, high = (float(v) for v in re.fullmatch(r"\[(\S+), (\S+)\]", row["95% CI"]).groups())
        assert low == pytest.approx(100 * m["low"], abs=0.0051)
        assert high == pytest.approx(100 * m["high"], abs=0.0051)
        if baseline is not None:
            b = baseline[name]
            assert number(row["Zero-shot baseline"]) == pytest.approx(100 * b["mean"], abs=0.0051)
            assert number(row["Delta (fine-tuned - baseline)"]) == pytest.approx(100 * (m["mean"] - b["mean"]),
                                                                                  abs=0.0051)


def check_training_table(markdown: str, summary: dict) -> None:
    checked = 0
    for label, key in TRAIN_ROWS:
        value = summary
        for part in key.split("."):
            value = value.get(part) if isinstance(value, dict) else None
        if value is None:
            continue
        cell = table_rows(markdown, label)[1]
        assert number(cell) == pytest.approx(value, abs=1e-4, rel=1e-6), (label, cell, value)
        checked += 1
    assert checked >= 12


def check_report(read, markdown: str, run_uri: str) -> None:
    """Everything one full report must hold, read through `read(name) -> bytes`."""
    for name in PNGS:
        check_png(read(name))
    for name in PNGS:
        assert f"]({name})" in markdown  # embedded with a relative link
    metrics = storage.read_json(storage.join(run_uri, "metrics.json"))
    baseline = storage.read_json(storage.join(run_uri, "baseline", "metrics.json"))
    check_metrics_table(markdown, metrics, baseline)
    check_training_table(markdown, storage.read_json(storage.join(run_uri, "summary.json")))
    assert "## Next steps" in markdown and "### Best 3 by ROUGE-L" in markdown and "### Worst 3 by ROUGE-L" in markdown
    predictions = storage.read_parquet(storage.join(run_uri, "predictions.parquet")).to_pandas()
    csv = pd.read_csv(io.BytesIO(read("all_predictions.csv")), dtype={"id": str}, keep_default_na=False)
    assert list(csv["id"]) == list(predictions["id"].astype(str))
    assert list(csv["prediction"]) == list(predictions["prediction"])
    assert list(csv["reference"]) == list(predictions["reference"])
    assert set(ROUGE_TYPES) <= set(csv.columns)
    np.testing.assert_allclose(csv["rougeL"].astype(float), predictions["rougeL"], atol=1e-6)
    samples = read("sample_predictions.txt").decode()
    assert "REFERENCE:" in samples and "PREDICTION (fine-tuned):" in samples and "ROUGE-L" in samples


# --------------------------------------------------------------------------------------------- the real tiny run


def test_report_for_tiny_run_local(tiny_run, tmp_path):
    run_uri = copy_run(tiny_run.uri, tmp_path / "tiny")
    report = write_report(run_uri)
    assert report == storage.join(run_uri, "report")
    names = {u.rsplit("/", 1)[-1] for u in storage.list_files(report)}
    assert names == set(FILES) | rouge_plot_if_logged(run_uri)
    read = lambda name: storage.read_bytes(storage.join(report, name))  # noqa: E731
    markdown = read("report.md").decode()
    check_report(read, markdown, run_uri)
    assert "Missing:" not in markdown  # a complete run has nothing missing
    # the synthetic demo corpus is not XSum: no XSum marks (notebook, published) to be misread as comparable
    assert "Original notebook" not in markdown and "PEGASUS" not in markdown and "original notebook" not in markdown


def test_report_for_tiny_run_on_s3(tiny_run, s3_env):
    run_uri = s3_env + "/runs/tiny"
    storage.upload_dir(tiny_run.uri, run_uri)
    report = write_report(run_uri)
    assert report == run_uri + "/report"
    names = {u.rsplit("/", 1)[-1] for u in storage.list_files(report)}
    assert names == set(FILES) | rouge_plot_if_logged(run_uri)
    read = lambda name: storage.read_bytes(storage.join(report, name))  # noqa: E731
    markdown = read("report.md").decode()
    assert f"`{run_uri}`" in markdown
    check_report(read, markdown, run_uri)
    # a second report replaces the first in place
    assert write_report(run_uri) == report
    assert {u.rsplit("/", 1)[-1] for u in storage.list_files(report)} == set(FILES) | rouge_plot_if_logged(run_uri)


def test_predictions_only_run(tiny_run, tmp_path):
    folder = tmp_path / "preds-only"
    folder.mkdir()
    for name in ("predictions.parquet", "metrics.json"):
        shutil.copy(storage.join(tiny_run.uri, name), folder / name)
    report = write_report(str(folder))
    names = {u.rsplit("/", 1)[-1] for u in storage.list_files(report)}
    assert {"rouge_scores.png", "dataset_analysis.png", "all_predictions.csv", "report.md"} <= names
    assert "training_loss.png" not in names
    check_png((folder / "report" / "rouge_scores.png").read_bytes())
    markdown = (folder / "report" / "report.md").read_text()
    assert re.search(r"Missing: training\*\*: `train_log.parquet` is not in the run folder", markdown)
    assert "_Training missing:" in markdown
    check_metrics_table(markdown, json.loads((folder / "metrics.json").read_text()), None)


def test_corrupt_train_log_does_not_fail_the_report(tiny_run, tmp_path):
    run_uri = copy_run(tiny_run.uri, tmp_path / "corrupt")
    (tmp_path / "corrupt" / "train_log.parquet").write_bytes(b"PAR1 this is not parquet at all")
    report = write_report(run_uri)
    names = {u.rsplit("/", 1)[-1] for u in storage.list_files(report)}
    assert "training_loss.png" not in names and {"rouge_scores.png", "report.md"} <= names
    markdown = storage.read_text(storage.join(report, "report.md"))
    assert "`train_log.parquet` could not be read" in markdown
    # the training statistics still come from summary.json
    check_training_table(markdown, storage.read_json(storage.join(run_uri, "summary.json")))


def test_train_only_run(tiny_run, tmp_path):
    run_uri = copy_run(tiny_run.uri, tmp_path / "train-only",
                       without=("predictions.parquet", "metrics.json", "baseline"))
    report = write_report(run_uri)
    names = {u.rsplit("/", 1)[-1] for u in storage.list_files(report)}
    assert names == {"training_loss.png", "report.md"} | rouge_plot_if_logged(run_uri)
    check_png(storage.read_bytes(storage.join(report, "training_loss.png")))
    markdown = storage.read_text(storage.join(report, "report.md"))
    assert "Missing: fine-tuned predictions" in markdown and "**Not evaluated:**" in markdown


# --------------------------------------------------------------------------------------------- synthetic runs


def synthetic_run(folder, *, n=30, truncated=0.0, gen_words=12, workers=1, shards=False, skipped=0,
                  with_config=True, seed=0) -> str:
    """A run folder written by hand, to steer the numbers the next-step rules look at."""
    from phi2sum.config import load_config
    from phi2sum.eval.metrics import rouge

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    uri = str(folder)
    refs = [" ".join(f"ref{i}w{j}" for j in range(10)) for i in range(n)]
    preds = [" ".join(f"ref{i}w{j}" if j < 4 else f"x{j}" for j in range(gen_words)) for i in range(n)]
    docs = [f"Document {i}, with \"quotes\", commas,\nand a newline. " + "word " * int(rng.integers(50, 400))
            for i in range(n)]
    metrics, per_example = rouge(preds, refs)
    rows = [{"id": f"{i:05d}", "document": d, "reference": r, "prediction": p, "prompt_tokens": 200,
             "generated_tokens": gen_words, "truncated": i < truncated * n, "padding_tokens": 3, **s}
            for i, (d, r, p, s) in enumerate(zip(docs, refs, preds, per_example))]
    table = pa.Table.from_pylist(rows)
    if shards:  # a Ray summarize job's output: shard folders of parts (no ROUGE columns) + metrics.json
        table = table.drop_columns(list(ROUGE_TYPES))
        half = n // 2
        for i, part in enumerate((table.slice(0, half), table.slice(half))):
            storage.write_parquet(part, storage.join(uri, f"shard-{i}-of-2", f"part-{i:020d}.parquet"))
            storage.write_json(storage.join(uri, f"shard-{i}-of-2", "_SUCCESS.json"), {"rows": part.num_rows})
        storage.write_json(storage.join(uri, "metrics.json"), {**metrics, "unscored": 0})
        return uri
    storage.write_parquet(table, storage.join(uri, "predictions.parquet"))
    storage.write_json(storage.join(uri, "metrics.json"), {**metrics, "unscored": 0})
    log = []
    for w in range(workers):
        for step in range(1, 41):
            log.append({"worker": w, "step": step, "epoch": step / 40, "loss": 3.0 - 0.04 * step + 0.05 * w,
                        "learning_rate": 2e-4 * min(1, step / 10), "grad_norm": 0.5, "tokens": 100 * step,
                        "seconds": float(step)})
    storage.write_parquet(pa.Table.from_pylist(log), storage.join(uri, "train_log.parquet"))
    if with_config:
        # the Phi-2 recipe: its tokenizer is not cached here, so the report runs without one (prompt_tokens only)
        storage.write_text(storage.join(uri, "config.yaml"), load_config(None).to_yaml())
    storage.write_json(storage.join(uri, "summary.json"), {
        "run_name": "synthetic",
        "data": {"train": {"source": "x", "total": 100, "kept": 100 - skipped, "skipped": {"empty summary": skipped},
                           "cut_documents": 0}},
        "train": {"steps": 40, "seconds": 40.0, "tokens": 4000, "tokens_per_second": 100.0, "workers": workers,
                  "trainable_params": 10, "total_params": 1000, "trainable_percent": 1.0,
                  "examples": {"used": 100 - skipped, "truncated": 0, "skipped_too_long": 0},
                  "first_loss": 3.0, "final_loss": 1.4},
        "summarize": {"padding_fraction": 0.01},
    })
    return uri


def steps_text(uri: str) -> str:
    art = load_run(uri)
    from phi2sum.report import eval_stats

    return "\n".join(next_steps(art, eval_stats(art, None)))


def test_next_steps_follow_the_numbers(tmp_path):
    clean = steps_text(synthetic_run(tmp_path / "clean", gen_words=10))
    assert "prompt.max_length" not in clean and "Skipped records" not in clean
    assert "**Not converged:**" in clean  # the synthetic loss falls linearly to the end
    assert "No baseline" in clean

    truncated = steps_text(synthetic_run(tmp_path / "trunc", truncated=0.5))
    assert re.search(r"\*\*Truncation:\*\* 50\.0% of eval prompts .*raise `prompt.max_length` \(now 512\)", truncated)

    long = steps_text(synthetic_run(tmp_path / "long", gen_words=30))
    assert "**Summaries too long:** median 30 generated words vs 10" in long and "length_penalty" in long

    short = steps_text(synthetic_run(tmp_path / "short", gen_words=4))
    assert "**Summaries too short:**" in short

    skipped = steps_text(synthetic_run(tmp_path / "skipped", skipped=10))
    assert "**Skipped records:** 10 of 100 train records (10.0%)" in skipped and "empty summary" in skipped


def test_several_workers_and_csv_quoting(tmp_path):
    uri = synthetic_run(tmp_path / "ray", workers=3)
    report = write_report(uri)
    check_png(storage.read_bytes(storage.join(report, "training_loss.png")))
    csv = pd.read_csv(storage.join(report, "all_predictions.csv"), dtype={"id": str}, keep_default_na=False)
    original = storage.read_parquet(storage.join(uri, "predictions.parquet")).to_pandas()
    assert list(csv["id"]) == list(original["id"])  # leading zeros kept
    assert list(csv["reference"]) == list(original["reference"])
    markdown = storage.read_text(storage.join(report, "report.md"))
    assert table_rows(markdown, "Workers")[1] == "3"


def test_ray_summarize_output_of_shards(tmp_path):
    uri = synthetic_run(tmp_path / "shards", shards=True)
    report = write_report(uri)
    names = {u.rsplit("/", 1)[-1] for u in storage.list_files(report)}
    assert {"rouge_scores.png", "dataset_analysis.png", "all_predictions.csv", "report.md"} <= names
    csv = pd.read_csv(storage.join(report, "all_predictions.csv"), dtype={"id": str})
    assert len(csv) == 30 and csv["id"].is_unique
    assert csv["rougeL"].notna().all()  # scored by the report: the shards carry no per-example ROUGE
    markdown = storage.read_text(storage.join(report, "report.md"))
    assert "Missing: config" in markdown and "Missing: training" in markdown
    assert "### Best 3 by ROUGE-L" in markdown
    check_metrics_table(markdown, storage.read_json(storage.join(uri, "metrics.json")), None)

    # an unfinished shard: the report still comes out and says why the predictions are missing
    storage.delete(storage.join(uri, "shard-1-of-2", "_SUCCESS.json"))
    markdown = storage.read_text(storage.join(write_report(uri), "report.md"))
    assert "shard(s) missing or incomplete" in markdown


def test_missing_run_is_a_one_line_error(tmp_path, capsys):
    from jobs.report import main

    with pytest.raises(Phi2SumError, match="no run found"):
        write_report(str(tmp_path / "nothing-here"))
    assert main([str(tmp_path / "nothing-here")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("jobs.report: error: no run found") and "\n" not in err


def test_a_run_on_xsum_is_set_against_the_notebook_and_published_scores(tmp_path):
    uri = synthetic_run(tmp_path / "xsum")  # its config is the Phi-2/XSum recipe
    markdown = storage.read_text(storage.join(write_report(uri), "report.md"))
    assert "Original notebook" in table_header(markdown, "Metric")
    assert "(published, full XSum)" in markdown

"""The report's validation tracking and paired comparison, on copies of the real tiny run: a train_log.parquet with
validation-loss and ROUGE-at-checkpoint rows gets its tables and plots (and its training-loss numbers stay those
of the training rows alone), an old log without `kind` still renders, and the fine-tuned vs zero-shot section
reads back equal to the run's own metrics."""

from __future__ import annotations

import json
import re

import pandas as pd
import pyarrow as pa
import pytest

from phi2sum import storage
from phi2sum.eval.metrics import ROUGE_LABELS, ROUGE_TYPES
from phi2sum.report import write_report
from phi2sum.report.stats import loss_trend
from test_report import check_png, copy_run, table_rows

OLD_COLUMNS = ("worker", "step", "epoch", "loss", "learning_rate", "grad_norm", "tokens", "seconds")
EVAL_LOSSES = (2.5, 1.9, 2.1)  # best in the middle
ROUGE_ROWS = ((0.20, 0.05, 0.18, 0.18), (0.30, 0.10, 0.27, 0.27), (0.35, 0.12, 0.26, 0.26))  # best ROUGE-L: 2nd


def train_rows(run_uri: str) -> pd.DataFrame:
    """The run's training-loss rows in the old schema (the eight columns every log has)."""
    log = storage.read_parquet(storage.join(run_uri, "train_log.parquet")).to_pandas()
    if "kind" in log:
        log = log[log["kind"].fillna("train") == "train"]
    return log[list(OLD_COLUMNS)].reset_index(drop=True)


def tracked_log(train: pd.DataFrame) -> tuple[pd.DataFrame, list[int]]:
    """Training rows, then eval and rouge rows (worker 0) at three steps, the last one the final training step.
    The eval rows also carry their loss in `loss`, as a careless writer might: the report must still not read
    them as training loss."""
    last = int(train["step"].max())
    steps = [last // 3, 2 * last // 3, last]
    rows = [{**r, "kind": "train"} for r in train.to_dict("records")]
    for step, loss in zip(steps, EVAL_LOSSES):
        rows.append({"worker": 0, "kind": "eval", "step": step, "epoch": step / last, "loss": loss, "eval_loss": loss})
    for step, scores in zip(steps, ROUGE_ROWS):
        rows.append({"worker": 0, "kind": "rouge", "step": step, "epoch": step / last, "rouge_documents": 16,
                     "rouge_seconds": 3.5, **dict(zip(ROUGE_TYPES, scores))})
    return pd.DataFrame(rows), steps


def write_log(run_uri: str, frame: pd.DataFrame) -> None:
    storage.write_parquet(pa.Table.from_pandas(frame, preserve_index=False), storage.join(run_uri, "train_log.parquet"))


def without_train_stats(run_uri: str) -> None:
    """summary.json without its `train` section, so the report's loss numbers come from train_log.parquet."""
    summary = storage.read_json(storage.join(run_uri, "summary.json"))
    summary.pop("train", None)
    storage.write_json(storage.join(run_uri, "summary.json"), summary)


def table_after(markdown: str, intro: str) -> list[list[str]]:
    """The body rows (cells) of the markdown table that follows the line starting with `intro`."""
    lines = markdown.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(intro))
    rows = []
    for line in lines[start + 1:]:
        if rows and not line.startswith("|"):
            break
        if line.startswith("|"):
            rows.append([c.strip() for c in line.strip().strip("|").split("|")])
    return rows[2:]  # header and alignment row


def section(markdown: str, title: str) -> str:
    return markdown.split(f"## {title}\n", 1)[1].split("\n## ", 1)[0]


def report_names(report: str) -> set[str]:
    return {u.rsplit("/", 1)[-1] for u in storage.list_files(report)}


def test_validation_loss_and_rouge_by_step(tiny_run, tmp_path):
    run_uri = copy_run(tiny_run.uri, tmp_path / "tracked")
    train = train_rows(run_uri)
    log, steps = tracked_log(train)
    write_log(run_uri, log)
    without_train_stats(run_uri)
    report = write_report(run_uri)
    assert {"training_loss.png", "rouge_by_step.png", "comparison.png"} <= report_names(report)
    for name in ("training_loss.png", "rouge_by_step.png"):
        check_png(storage.read_bytes(storage.join(report, name)))
    training = section(storage.read_text(storage.join(report, "report.md")), "Training")

    assert f"Validation loss at 3 evaluation step(s); best **1.9000** at step {steps[1]}:" in training
    evals = table_after(training, "Validation loss at")
    assert [(int(r[0]), r[-1]) for r in evals] == [(steps[0], "2.5000"), (steps[1], "**1.9000** (best)"),
                                                   (steps[2], "2.1000")]
    rouge = table_after(training, "ROUGE F1 x100 of the validation summaries")
    assert [int(r[0]) for r in rouge] == steps
    assert rouge[2][1:5] == ["35.00", "12.00", "26.00", "26.00"] and rouge[1][3] == "**27.00**"
    assert rouge[0][5:] == ["16", "3.5"]  # documents, generation seconds
    assert "![ROUGE per optimizer step](rouge_by_step.png)" in training

    # the training-loss numbers are the training rows' alone, although the eval rows carry a loss too
    worker0 = train[train["worker"] == train["worker"].min()].sort_values("step")
    assert float(table_rows(training, "First loss")[1]) == pytest.approx(worker0["loss"].iloc[0], abs=1e-4)
    assert float(table_rows(training, "Final loss")[1]) == pytest.approx(worker0["loss"].iloc[-1], abs=1e-4)
    assert int(table_rows(training, "Optimizer steps")[1].replace(",", "")) == int(train["step"].max())
    trend = loss_trend(worker0.reset_index(drop=True))
    assert f"{trend['smooth_final']:.3f} at step {trend['step_final']} ({trend['points']} logged points)" in training


def test_an_old_log_without_kind_and_a_run_without_baseline(tiny_run, tmp_path):
    run_uri = copy_run(tiny_run.uri, tmp_path / "old", without=("baseline",))
    train = train_rows(run_uri)
    write_log(run_uri, train)  # the eight columns of a log written before `kind`
    without_train_stats(run_uri)
    report = write_report(run_uri)
    names = report_names(report)
    assert "training_loss.png" in names and not {"rouge_by_step.png", "comparison.png"} & names
    check_png(storage.read_bytes(storage.join(report, "training_loss.png")))
    markdown = storage.read_text(storage.join(report, "report.md"))
    training = section(markdown, "Training")
    assert float(table_rows(training, "Final loss")[1]) == pytest.approx(
        train[train["worker"] == 0].sort_values("step")["loss"].iloc[-1], abs=1e-4)
    assert "Validation loss at" not in training and "of the validation summaries" not in training
    assert re.search(r"`rouge_by_step.png` not produced: missing input: train_log.parquet has no ROUGE rows", training)
    paired = section(markdown, "Fine-tuned vs zero-shot baseline (paired)")
    assert "_No paired comparison:" in paired and "run.baseline=true" in paired


def test_fine_tuned_vs_zero_shot_reads_back_equal_to_the_metrics(tiny_run, tmp_path):
    run_uri = copy_run(tiny_run.uri, tmp_path / "paired")
    report = write_report(run_uri)
    check_png(storage.read_bytes(storage.join(report, "comparison.png")))
    markdown = storage.read_text(storage.join(report, "report.md"))
    paired = section(markdown, "Fine-tuned vs zero-shot baseline (paired)")
    baseline = json.loads(storage.read_text(storage.join(run_uri, "baseline", "metrics.json")))
    fine_tuned = json.loads(storage.read_text(storage.join(run_uri, "metrics.json")))
    assert f"on {fine_tuned['count']} shared ids;" in paired and "--intersect" not in paired
    for name in ROUGE_TYPES:
        cells = table_rows(paired, ROUGE_LABELS[name])
        a, b, delta = (float(c) for c in cells[1:4])
        assert a == pytest.approx(100 * baseline[name]["mean"], abs=0.006)
        assert b == pytest.approx(100 * fine_tuned[name]["mean"], abs=0.006)
        assert delta == pytest.approx(b - a, abs=0.011)
        low, high = (float(v) for v in re.fullmatch(r"\[(\S+), (\S+)\]", cells[4]).groups())
        assert low <= delta <= high
    assert float(table_rows(paired, "ROUGE-L")[4].strip("[]").split(",")[0]) > 0  # fine-tuning clearly helped
    assert "![Fine-tuned - zero-shot ROUGE with paired 95% intervals](comparison.png)" in paired

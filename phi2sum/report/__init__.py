"""Run report: plots, tables and run-specific next steps for one run folder, written to ``<run>/report/``.

``write_report(run_uri)`` reads whatever the run folder (local or ``s3://``) holds -- config.yaml, summary.json,
train_log.parquet, predictions.parquet + metrics.json, baseline/ -- renders everything in a local temp folder
and uploads it through :mod:`phi2sum.storage`:

* ``training_loss.png``    loss per step (raw + EMA, one curve per worker) with the learning rate, and the
                           validation loss with its best step when the log has one
* ``rouge_by_step.png``    ROUGE-1/2/L x100 of validation summaries at each checkpoint (``train.rouge_steps``)
* ``rouge_scores.png``     ROUGE-1/2/L/Lsum x100 with 95% intervals, baseline, notebook and published marks
* ``dataset_analysis.png`` document/summary lengths (words, tokens), compression ratio, truncation shares
* ``comparison.png``       fine-tuned - zero-shot ROUGE per type with its paired bootstrap interval (baseline/)
* ``sample_predictions.txt``, ``all_predictions.csv``
* ``report.md``            config, data and training statistics, metrics table, plots, best/worst examples
                           and next steps derived from this run's numbers

A run that only trained or only summarized gets the report of what it has: every artifact and every section
is loaded/rendered on its own, and a failure is written into the report (what is missing and why) instead of
failing it. Only an unreadable or empty run location is an error (:class:`~phi2sum.errors.Phi2SumError`).

The package, one job a module: :mod:`~phi2sum.report.load` reads the run folder, :mod:`~phi2sum.report.stats`
derives the numbers several parts share, :mod:`~phi2sum.report.plots`, :mod:`~phi2sum.report.files` and
:mod:`~phi2sum.report.markdown` write the outputs, :mod:`~phi2sum.report.advice` holds the next-step rules and
:mod:`~phi2sum.report.published` the scores a run is set against.
"""

from __future__ import annotations

import logging
import os
import tempfile
from typing import Any, Callable

from phi2sum import storage
from phi2sum.eval.metrics import ROUGE_TYPES
from phi2sum.report.advice import next_steps
from phi2sum.report.comparison import RunComparison, baseline_comparison, plot_run_comparison
from phi2sum.report.files import write_predictions_csv, write_samples
from phi2sum.report.load import REPORT_DIR, MissingInput, RunArtifacts, load_run, reason
from phi2sum.report.markdown import TRAIN_ROWS, render_markdown
from phi2sum.report.plots import plot_dataset, plot_rouge, plot_rouge_by_step, plot_training_loss
from phi2sum.report.published import ROUGE_LABELS
from phi2sum.report.stats import EvalStats, eval_stats, load_tokenizer_cheaply

__all__ = ["ROUGE_LABELS", "ROUGE_TYPES", "TRAIN_ROWS", "EvalStats", "RunArtifacts", "eval_stats", "load_run",
           "next_steps", "render_markdown", "write_report"]

log = logging.getLogger(__name__)


def write_report(run_uri: str) -> str:
    """Write ``<run>/report/`` for the run folder ``run_uri`` (local or ``s3://``); returns the report folder URI.

    Raises :class:`~phi2sum.errors.Phi2SumError` only when the run cannot be read at all (no such folder, no
    access) or the report cannot be uploaded; missing or corrupt artifacts and failed plots go into the report.
    """
    art = load_run(run_uri)
    report_uri = storage.join(art.uri, REPORT_DIR)
    stats, tokenizer_note = _eval_stats_if_possible(art)
    comparison = baseline_comparison(art)
    with tempfile.TemporaryDirectory(prefix="phi2sum-report-") as work:
        tmp = os.path.join(work, REPORT_DIR)
        os.mkdir(tmp)  # mode from the umask (mkdtemp's 0700 would be copied into a local run folder)
        produced = _write_outputs(art, stats, comparison, tmp)
        markdown = render_markdown(art, stats, produced, tokenizer_note, comparison)
        with open(os.path.join(tmp, "report.md"), "w", encoding="utf-8") as handle:
            handle.write(markdown)
        storage.upload_dir(tmp, report_uri)
    log.info("report for run %s written to %s", art.name, report_uri)
    return report_uri


def _eval_stats_if_possible(art: RunArtifacts) -> tuple[EvalStats | None, str]:
    """The eval statistics (None when they fail: a note in the report) and why token counts lack a tokenizer."""
    tokenizer, tokenizer_note = (None, "")
    if art.predictions is not None:
        tokenizer, tokenizer_note = load_tokenizer_cheaply(art)
    try:
        return eval_stats(art, tokenizer), tokenizer_note
    except Exception as exc:  # noqa: BLE001
        log.warning("report: eval statistics failed: %s", reason(exc))
        art.notes.append(f"eval statistics could not be computed ({reason(exc)})")
        return None, tokenizer_note


def _write_outputs(art: RunArtifacts, stats: EvalStats | None, comparison: RunComparison,
                   folder: str) -> dict[str, str | None]:
    """Each plot and text file into ``folder``; maps its name to None (written) or why it is not there."""
    outputs: tuple[tuple[str, Callable[[str], Any]], ...] = (
        ("training_loss.png", lambda p: plot_training_loss(art, p)),
        ("rouge_by_step.png", lambda p: plot_rouge_by_step(art, p)),
        ("rouge_scores.png", lambda p: plot_rouge(art, p)),
        ("comparison.png", lambda p: plot_run_comparison(comparison, p)),
        ("dataset_analysis.png", lambda p: plot_dataset(art, stats, p)),
        ("sample_predictions.txt", lambda p: write_samples(art, p)),
        ("all_predictions.csv", lambda p: write_predictions_csv(art, p)),
    )
    produced: dict[str, str | None] = {}
    for name, make in outputs:
        path = os.path.join(folder, name)
        try:
            make(path)
            produced[name] = None
        except MissingInput as exc:
            produced[name] = f"missing input: {exc}"
        except Exception as exc:  # noqa: BLE001 - a failed plot never fails the report
            log.warning("report: %s failed: %s", name, reason(exc))
            produced[name] = f"failed: {reason(exc)}"
        if produced[name] is not None and os.path.exists(path):
            os.remove(path)  # never upload half a file
    return produced

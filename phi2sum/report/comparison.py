"""The report's paired comparison of the fine-tuned model with the zero-shot baseline on the same eval ids: the
`phi2sum compare` table (B − A with a paired bootstrap interval and p-value) for ``<run>/baseline`` vs ``<run>``.

The ROUGE section's two per-model intervals overlap long after a gain is real (they ignore that both models saw
the same documents); the paired interval answers "did fine-tuning help" directly. The numbers come from
:mod:`phi2sum.eval.compare`, so the report and the command always agree.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from phi2sum import storage
from phi2sum.errors import Phi2SumError
from phi2sum.eval.compare import (P_VALUE_DEFINITION, Comparison, compare, describe, markdown_table, plot_comparison,
                                  scores_from_frame)
from phi2sum.report.load import BASELINE, MissingInput, RunArtifacts, reason

log = logging.getLogger(__name__)

TITLE = "Fine-tuned vs zero-shot baseline (paired)"


@dataclass(frozen=True)
class RunComparison:
    """The comparison, or why the run has none (``result`` None)."""

    result: Comparison | None
    why: str = ""


def baseline_comparison(art: RunArtifacts) -> RunComparison:
    """Baseline (A) vs fine-tuned (B) on the ids both scored; a run whose two id sets differ is compared on the
    shared ids and the section says so (a report shows what it can rather than refuse)."""
    if art.predictions is None:
        return RunComparison(None, art.missing.get("fine-tuned predictions") or "no fine-tuned predictions")
    if art.baseline_predictions is None:
        return RunComparison(None, art.missing.get("zero-shot baseline predictions") or
                             f"the run has no `{BASELINE}` predictions (run.baseline=false); rerun with "
                             "`run.baseline=true` to measure what fine-tuning adds")
    try:
        baseline = scores_from_frame(art.baseline_predictions, storage.join(art.uri, BASELINE), "zero-shot baseline")
        fine_tuned = scores_from_frame(art.predictions, art.uri, "fine-tuned")
        return RunComparison(compare(baseline, fine_tuned, intersect=True))
    except Phi2SumError as exc:  # e.g. no references to score against, no shared ids
        return RunComparison(None, reason(exc))
    except Exception as exc:  # noqa: BLE001 - a failed comparison never fails the report
        log.warning("report: the paired comparison failed: %s", reason(exc))
        return RunComparison(None, f"failed: {reason(exc)}")


def plot_run_comparison(comparison: RunComparison, path: str) -> None:
    if comparison.result is None:
        raise MissingInput(comparison.why)
    plot_comparison(comparison.result, path)


def comparison_lines(comparison: RunComparison | None) -> list[str]:
    """The section's text: what was compared, the table and the p-value's definition."""
    if comparison is None:
        return ["_No paired comparison: it was not computed for this report._"]
    if comparison.result is None:
        return [f"_No paired comparison: {comparison.why}._"]
    result = comparison.result
    shared = (f" The means are on the {result.shared:,} shared ids, so they differ from the ROUGE section's, which "
              "are on each model's own ids." if result.ids_differ else "")
    return [describe(result), "", *markdown_table(result), "", f"p: {P_VALUE_DEFINITION}.{shared}"]

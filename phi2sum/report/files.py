"""The report's text files: every prediction as CSV (for a spreadsheet) and a few read in full."""

from __future__ import annotations

import csv
import textwrap

import numpy as np
import pandas as pd

from phi2sum.eval.metrics import ROUGE_TYPES
from phi2sum.report.formatting import shorten
from phi2sum.report.load import MissingInput, RunArtifacts


def write_predictions_csv(art: RunArtifacts, path: str) -> None:
    if art.predictions is None:
        raise MissingInput(art.missing.get("fine-tuned predictions") or "no predictions")
    pred = art.predictions
    columns = [c for c in ("id", "reference", "prediction", *ROUGE_TYPES) if c in pred.columns]
    out = pred[columns].copy()
    out["id"] = out["id"].astype(str)
    out.to_csv(path, index=False, quoting=csv.QUOTE_MINIMAL, lineterminator="\n", encoding="utf-8",
               float_format="%.6f")


def write_samples(art: RunArtifacts, path: str, count: int = 5) -> None:
    """``count`` predictions spread evenly from best to worst ROUGE-L, so that a reader sees the range, not only
    the highlights."""
    pred = art.predictions
    if pred is None:
        raise MissingInput(art.missing.get("fine-tuned predictions") or "no predictions")
    base = {}
    if art.baseline_predictions is not None:
        base = dict(zip(art.baseline_predictions["id"].astype(str), art.baseline_predictions["prediction"]))
    ranked = pred.sort_values("rougeL", ascending=False, kind="stable") if "rougeL" in pred.columns else pred
    picks = sorted({int(round(q * (len(ranked) - 1))) for q in np.linspace(0, 1, min(count, len(ranked)))})
    lines = [f"Sample predictions: run {art.name} ({len(picks)} of {len(pred)} documents, spread from best to worst "
             "ROUGE-L)" if "rougeL" in pred.columns else f"Sample predictions: run {art.name}", "=" * 100, ""]
    for rank in picks:
        row = ranked.iloc[rank]
        score = f"ROUGE-L {100 * row['rougeL']:.2f}" if "rougeL" in row and pd.notna(row["rougeL"]) else "unscored"
        lines.append(f"[{rank + 1}/{len(ranked)}] id={row['id']}  {score}")
        if "document" in row:
            lines += ["DOCUMENT (shortened):", textwrap.fill(shorten(row["document"], 500), 100), ""]
        if "reference" in row:
            lines += ["REFERENCE:", textwrap.fill(shorten(row["reference"], 400), 100), ""]
        lines += ["PREDICTION (fine-tuned):", textwrap.fill(shorten(row["prediction"], 400) or "(empty)", 100), ""]
        if str(row["id"]) in base:
            lines += ["PREDICTION (zero-shot baseline):",
                      textwrap.fill(shorten(base[str(row["id"])], 400) or "(empty)", 100), ""]
        lines += ["-" * 100, ""]
    with open(path, "w", encoding="utf-8") as handle:
        handle.write("\n".join(lines))

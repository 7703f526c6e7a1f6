"""What the run measured on validation data while it trained: the validation loss and the ROUGE at each
checkpoint (the `eval` and `rouge` rows of train_log.parquet), as the short tables of report.md's Training section.

The training loss says whether the model fits its training examples; these say whether it got better at the task,
and where it stopped getting better (the best step), which is what `train.keep_best` and early stopping act on.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from phi2sum.eval.metrics import ROUGE_LABELS, ROUGE_TYPES
from phi2sum.report.formatting import number
from phi2sum.report.load import RunArtifacts
from phi2sum.report.stats import best_eval

MAX_ROWS = 12  # a longer log is shown as evenly spaced rows plus the best and the last


def shown_rows(frame: pd.DataFrame, keep: int | None = None) -> list[int]:
    """Positions of the rows a short table shows: all of them, or `MAX_ROWS` evenly spaced ones (first and last
    included) plus the position `keep` (the best row), in order."""
    if len(frame) <= MAX_ROWS:
        return list(range(len(frame)))
    picks = {int(round(q)) for q in np.linspace(0, len(frame) - 1, MAX_ROWS)}
    return sorted(picks | ({keep} if keep is not None else set()))


def _shown_note(shown: int, total: int, what: str) -> list[str]:
    return [f"_{shown} of {total} {what} shown (evenly spaced, best included); all in train_log.parquet._", ""] \
        if shown < total else []


def eval_loss_table(art: RunArtifacts) -> list[str]:
    """Validation loss per evaluation step, the best (lowest) in bold; nothing when the log has none."""
    frame = art.eval_log
    if frame is None:
        return []
    best = best_eval(frame)
    best_position = int(np.flatnonzero(frame["step"].to_numpy() == best["step"])[0])
    rows = shown_rows(frame, best_position)
    epoch = "epoch" in frame.columns and frame["epoch"].notna().any()
    out = [f"Validation loss at {len(frame)} evaluation step(s); best **{best['eval_loss']:.4f}** at step "
           f"{int(best['step'])}:", "",
           "| Step |" + (" Epoch |" if epoch else "") + " Validation loss |",
           "|--:|" + ("--:|" if epoch else "") + "--:|"]
    for k in rows:
        row = frame.iloc[k]
        loss = f"{row['eval_loss']:.4f}"
        cells = [str(int(row["step"])), *([_epoch_cell(row["epoch"])] if epoch else []),
                 f"**{loss}** (best)" if k == best_position else loss]
        out.append("| " + " | ".join(cells) + " |")
    return out + [""] + _shown_note(len(rows), len(frame), "evaluation steps")


def rouge_by_step_table(art: RunArtifacts) -> list[str]:
    """ROUGE x100 of the validation summaries per checkpoint, the best ROUGE-L in bold; nothing without rows."""
    frame = art.rouge_log
    if frame is None:
        return []
    names = [n for n in ROUGE_TYPES if n in frame.columns and frame[n].notna().any()]
    best_position = int(frame["rougeL"].astype(float).to_numpy().argmax())
    rows = shown_rows(frame, best_position)
    labels = {"rouge_documents": "Documents", "rouge_seconds": "Generation (s)"}
    extra = [c for c in labels if c in frame.columns and frame[c].notna().any()]
    out = ["ROUGE F1 x100 of the validation summaries at each checkpoint (best ROUGE-L in bold):", "",
           "| Step | " + " | ".join([*(ROUGE_LABELS[n] for n in names), *(labels[c] for c in extra)]) + " |",
           "|--:|" + "--:|" * (len(names) + len(extra))]
    for k in rows:
        row = frame.iloc[k]
        scores = [f"{100 * _float(row[n]):.2f}" if pd.notna(row[n]) else "n/a" for n in names]
        if k == best_position:
            scores[names.index("rougeL")] = f"**{scores[names.index('rougeL')]}**"
        cells = [str(int(row["step"])), *scores, *(_extra_cell(c, row[c]) for c in extra)]
        out.append("| " + " | ".join(cells) + " |")
    return out + [""] + _shown_note(len(rows), len(frame), "checkpoints")


def _epoch_cell(value) -> str:
    return "n/a" if value is None or pd.isna(value) else f"{float(value):.2f}"


def _float(value) -> float | None:
    return None if value is None or pd.isna(value) else float(value)


def _extra_cell(column: str, value) -> str:
    """Documents as a count, seconds to a tenth."""
    if value is None or pd.isna(value):
        return "n/a"
    return number(int(value)) if column == "rouge_documents" else f"{float(value):.1f}"

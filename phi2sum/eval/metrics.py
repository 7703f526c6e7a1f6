"""Metrics: ROUGE-1/2/L/Lsum F1 with stemming (rouge-score), per example and as a mean with a 95% interval.

The interval comes from rouge-score's own `BootstrapAggregator`, seeded so the same predictions always give
the same numbers. ROUGE-Lsum splits on newlines, so predictions and references are sentence-split first.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL", "rougeLsum")
ROUGE_LABELS = {"rouge1": "ROUGE-1", "rouge2": "ROUGE-2", "rougeL": "ROUGE-L", "rougeLsum": "ROUGE-Lsum"}
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def _lsum_text(text: str) -> str:
    return "\n".join(s for s in _SENTENCE_END.split(text.strip()) if s)


def score_examples(predictions: list[str], references: list[str]) -> list[dict[str, float]]:
    """Per-example F1 for each ROUGE type, in input order."""
    from rouge_score import rouge_scorer

    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)
    rows = []
    for prediction, reference in zip(predictions, references):
        scores = scorer.score(_lsum_text(reference), _lsum_text(prediction))
        rows.append({name: float(scores[name].fmeasure) for name in ROUGE_TYPES})
    return rows


def aggregate(per_example: list[dict[str, float]], seed: int = 0, n_samples: int = 1000) -> dict[str, Any]:
    """Mean F1 and a bootstrap 95% interval for each ROUGE type (fractions in [0, 1])."""
    from rouge_score import scoring

    if not per_example:
        return {"count": 0, **{name: {"mean": None, "low": None, "high": None} for name in ROUGE_TYPES}}
    aggregator = scoring.BootstrapAggregator(confidence_interval=0.95, n_samples=n_samples)
    for row in per_example:
        aggregator.add_scores({name: scoring.Score(precision=0.0, recall=0.0, fmeasure=row[name])
                               for name in ROUGE_TYPES})
    state = np.random.get_state()
    np.random.seed(seed)  # the aggregator resamples with numpy's global generator
    try:
        result = aggregator.aggregate()
    finally:
        np.random.set_state(state)
    out: dict[str, Any] = {"count": len(per_example)}
    for name in ROUGE_TYPES:
        out[name] = {
            "mean": float(np.mean([row[name] for row in per_example])),
            "low": float(result[name].low.fmeasure),
            "high": float(result[name].high.fmeasure),
        }
    return out


def rouge(predictions: list[str], references: list[str], seed: int = 0) -> tuple[dict[str, Any], list[dict]]:
    """(aggregate metrics, per-example scores)."""
    per_example = score_examples(predictions, references)
    return aggregate(per_example, seed), per_example

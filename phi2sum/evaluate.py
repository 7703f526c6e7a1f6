"""Evaluation: ROUGE of predictions against references, written as metrics.json beside the predictions.

Works on a local run's `predictions.parquet` and on a (sharded) summarize job output; references come from
the predictions themselves, or are joined by id from a dataset when the predictions have none.
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa

from phi2sum import storage
from phi2sum.errors import Phi2SumError
from phi2sum.metrics import ROUGE_TYPES, rouge


def evaluate_predictions(predictions_uri: str, metrics_uri: str, seed: int = 0) -> dict[str, Any]:
    """Score a predictions.parquet that carries references: adds per-example ROUGE columns, writes metrics.json."""
    metrics, table = score_table(storage.read_parquet(predictions_uri), seed=seed)
    storage.write_parquet(table, predictions_uri)
    storage.write_json(metrics_uri, metrics)
    return metrics


def score_table(table: pa.Table, references: dict[str, str] | None = None, seed: int = 0) -> tuple[dict, pa.Table]:
    """Metrics and the table with per-example ROUGE columns; `references` (id -> text) fill in missing ones."""
    table = table.drop_columns([c for c in ROUGE_TYPES if c in table.column_names])
    ids = [str(i) for i in table.column("id").to_pylist()]
    given = table.column("reference").to_pylist() if "reference" in table.column_names else [None] * len(ids)
    refs = [g if g else (references or {}).get(i) for i, g in zip(ids, given)]
    if not any(refs):
        raise Phi2SumError("the predictions have no references to score against; pass the dataset with its "
                           "summaries (data.source=...) so they can be joined by id")
    predictions = table.column("prediction").to_pylist()
    scored = [k for k, r in enumerate(refs) if r]
    metrics, per_example = rouge([predictions[k] or "" for k in scored], [refs[k] for k in scored], seed)
    by_row = dict(zip(scored, per_example))
    if "reference" in table.column_names:
        table = table.set_column(table.column_names.index("reference"), "reference", pa.array(refs, pa.string()))
    else:
        table = table.append_column("reference", pa.array(refs, pa.string()))
    for name in ROUGE_TYPES:
        table = table.append_column(name, pa.array([by_row.get(k, {}).get(name) for k in range(len(ids))],
                                                   pa.float64()))
    metrics["unscored"] = len(ids) - len(scored)
    if references is not None:
        missing = sorted(set(references) - set(ids))
        metrics["missing_ids"] = {"count": len(missing), "examples": missing[:20]}
    return metrics, table


def evaluate_output(output: str, references: dict[str, str] | None = None, seed: int = 0) -> dict[str, Any]:
    """Score every shard of a summarize job's output; writes `<output>/metrics.json`."""
    from phi2sum.ray_summarize import read_predictions

    metrics, _ = score_table(read_predictions(output), references, seed)
    storage.write_json(storage.join(output, "metrics.json"), metrics)
    return metrics

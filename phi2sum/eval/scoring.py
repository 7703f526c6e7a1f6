"""Evaluation: ROUGE of predictions against references, written as metrics.json beside the predictions.

Works on a local run's `predictions.parquet` and on a (sharded) summarize job output; references come from
the predictions themselves, or are joined by id from a dataset when the predictions have none.
"""

from __future__ import annotations

import concurrent.futures
import multiprocessing
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from phi2sum import storage
from phi2sum.errors import DataError, Phi2SumError
from phi2sum.data import check_unique_ids
from phi2sum.eval.metrics import ROUGE_TYPES, aggregate, rouge, score_examples
from phi2sum.outputs import complete_parts, id_hashes, is_sharded_output


def evaluate(predictions: str, references: dict[str, str] | None = None,
             metrics_uri: str | None = None) -> tuple[dict[str, Any], str]:
    """Score what `predictions` names: a summarize job's output (shard folders), a predictions.parquet, or a run
    folder holding one. Returns the metrics and where metrics.json was written."""
    if is_sharded_output(predictions):
        metrics_uri = metrics_uri or storage.join(predictions, "metrics.json")
        return evaluate_output(predictions, references, metrics_uri=metrics_uri), metrics_uri
    if not predictions.endswith(".parquet"):
        if not storage.exists(storage.join(predictions, "predictions.parquet")):
            raise DataError(f"no predictions at {predictions}: pass a predictions.parquet, a run folder holding one, "
                            "or a summarize job's output (its shard-<i>-of-<n> folders)")
        predictions = storage.join(predictions, "predictions.parquet")
    metrics_uri = metrics_uri or storage.join(predictions.rsplit("/", 1)[0], "metrics.json")
    return evaluate_predictions(predictions, metrics_uri, references), metrics_uri


def evaluate_predictions(predictions_uri: str, metrics_uri: str, references: dict[str, str] | None = None,
                         seed: int = 0) -> dict[str, Any]:
    """Score a predictions.parquet: adds per-example ROUGE columns to it, writes metrics.json."""
    try:
        table = storage.read_parquet(predictions_uri)
    except pa.ArrowException:  # the file is there but is no Parquet (the storage layer maps I/O errors)
        raise DataError(f"{predictions_uri} is not a readable Parquet file; point --predictions at a "
                        "predictions.parquet") from None
    metrics, table = score_table(table, references, seed=seed)
    storage.write_parquet(table, predictions_uri)
    storage.write_json(metrics_uri, metrics)
    return metrics


def score_table(table: pa.Table, references: dict[str, str] | None = None, seed: int = 0) -> tuple[dict, pa.Table]:
    """Metrics and the table with per-example ROUGE columns; `references` (id -> text) fill in missing ones."""
    missing = [c for c in ("id", "prediction") if c not in table.column_names]
    if missing:
        raise DataError(f"the predictions have no {' or '.join(repr(c) for c in missing)} column (columns: "
                        f"{', '.join(table.column_names) or 'none'}); score a phi2sum predictions.parquet or a "
                        "summarize job's output")
    table = table.drop_columns([c for c in ROUGE_TYPES if c in table.column_names])
    ids, refs = joined_references(table, references)
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


def joined_references(table: pa.Table, references: dict[str, str] | None) -> tuple[list[str], list[str | None]]:
    """The table's ids, and for each its reference: the table's own, else `references[id]` (None when neither)."""
    ids = [str(i) for i in table.column("id").to_pylist()]
    given = table.column("reference").to_pylist() if "reference" in table.column_names else [None] * len(ids)
    return ids, [g if g else (references or {}).get(i) for i, g in zip(ids, given)]


_REFERENCES: dict[str, str] | None = None  # set before the worker processes fork: they inherit it, unpickled


def evaluate_output(output: str, references: dict[str, str] | None = None, seed: int = 0,
                    metrics_uri: str | None = None, processes: int | None = None) -> dict[str, Any]:
    """Score every shard of a summarize job's output; writes `<output>/metrics.json`.

    Part by part, in `processes` worker processes (default: one per CPU): this process never holds the output's
    texts, only each example's four scores and an 8-byte hash of its id (for the duplicate check; the ids
    themselves only to report missing references), so an output of any size is scored in the time its ROUGE
    takes."""
    global _REFERENCES
    parts = complete_parts(output)
    _REFERENCES = references
    try:
        with concurrent.futures.ProcessPoolExecutor(max_workers=processes or os.cpu_count() or 1,
                                                    mp_context=multiprocessing.get_context("fork")) as pool:
            results = list(pool.map(_score_part, parts))
    finally:
        _REFERENCES = None
    hashes = np.concatenate([np.empty(0, np.uint64), *(r.hashes for r in results)])
    if np.unique(hashes).size < hashes.size:
        ids = (str(i) for uri in parts for i in storage.read_parquet(uri, ["id"]).column("id").to_pylist())
        check_unique_ids(ids, output,  # read again, only now: the message names one duplicate id
                         fix="the outputs mix two datasets or two runs: evaluate one output at a time")
    scores = [row for r in results for row in r.scores]
    if not scores:
        raise Phi2SumError("the predictions have no references to score against; pass the dataset with its "
                           "summaries (data.source=...) so they can be joined by id")
    metrics = aggregate(scores, seed)
    metrics["unscored"] = sum(r.unscored for r in results)
    if references is not None:
        missing = sorted(set(references) - {i for r in results for i in r.ids})
        metrics["missing_ids"] = {"count": len(missing), "examples": missing[:20]}
    storage.write_json(metrics_uri or storage.join(output, "metrics.json"), metrics)
    return metrics


@dataclass
class PartScores:
    ids: list[str]  # only when references were given, to report the ones with no prediction
    hashes: np.ndarray
    scores: list[dict[str, float]]
    unscored: int


def _score_part(uri: str) -> PartScores:
    """One part's per-example ROUGE (run in a worker process, with the references it inherited)."""
    columns = ["id", "prediction", *(["reference"] if "reference" in storage.parquet_columns(uri) else [])]
    table = storage.read_parquet(uri, columns)
    ids, refs = joined_references(table, _REFERENCES)
    predictions = table.column("prediction").to_pylist()
    scored = [k for k, r in enumerate(refs) if r]
    scores = score_examples([predictions[k] or "" for k in scored], [refs[k] for k in scored])
    return PartScores(ids if _REFERENCES is not None else [], id_hashes(ids), scores, len(ids) - len(scored))

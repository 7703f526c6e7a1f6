"""Reading a run folder for the report: every artifact on its own, so that a missing or corrupt one becomes a
line in the report (``RunArtifacts.missing``) instead of failing it."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import pandas as pd
import pyarrow as pa
import yaml

from phi2sum import storage
from phi2sum.config import config_from_dict
from phi2sum.errors import Phi2SumError, StorageError
from phi2sum.eval.metrics import ROUGE_TYPES, aggregate, score_examples
from phi2sum.outputs import read_predictions

log = logging.getLogger(__name__)

REPORT_DIR = "report"
SHARDED = "shard-*"  # marks a Ray summarize output (shard-<i>-of-<n>/part-*.parquet) in a location list
BASELINE = "baseline/"


@dataclass
class RunArtifacts:
    """What the run folder held; ``missing`` maps an artifact to why it is absent or unusable."""

    uri: str
    name: str
    config: dict[str, Any] | None = None
    cfg: Any = None  # phi2sum.config.Config when config.yaml validates
    run_stats: dict[str, Any] = field(default_factory=dict)  # summary.json: timings, data and memory statistics
    train_log: pd.DataFrame | None = None  # the training-loss rows only (kind "train"), one per worker and step
    eval_log: pd.DataFrame | None = None  # validation-loss rows (kind "eval"): step, epoch, eval_loss
    rouge_log: pd.DataFrame | None = None  # ROUGE-at-checkpoint rows (kind "rouge"): step, rouge1..., documents
    predictions: pd.DataFrame | None = None
    metrics: dict[str, Any] | None = None
    baseline_predictions: pd.DataFrame | None = None
    baseline_metrics: dict[str, Any] | None = None
    missing: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def setting(self, key: str, default: Any = None) -> Any:
        """A config value as the run used it: from the validated config (defaults filled in) when there is one,
        else as config.yaml wrote it."""
        if self.cfg is not None:
            return lookup(self.cfg.to_dict(), key, default)
        return lookup(self.config, key, default) if self.config else default


class MissingInput(Exception):
    """A report output has no input: reported as missing, not as a failure."""


def lookup(mapping: Any, dotted: str, default: Any = None) -> Any:
    """``mapping["a"]["b"]`` for ``"a.b"``, tolerating absent or null levels: artifacts of older or partial runs
    lack sections."""
    node = mapping
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return default
        node = node[part]
    return default if node is None else node


def reason(exc: BaseException) -> str:
    """One line, redacted, short: why something could not be used."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    if not isinstance(exc, Phi2SumError):
        text = f"{type(exc).__name__}: {text}"
    return storage.redact(text)[:240]


def load_run(run_uri: str) -> RunArtifacts:
    """Read every artifact the run folder has; raise only when the location is unreadable or holds nothing."""
    uri = os.fspath(run_uri).rstrip("/") or os.fspath(run_uri)
    files = _run_files(uri)
    art = RunArtifacts(uri=uri, name=uri.rstrip("/").rsplit("/", 1)[-1])
    art.config = _read_or_note(art, "config", "config.yaml", _holds(files, "config.yaml"), lambda: _read_config(uri),
                               "`config.yaml` is not in the run folder: configuration and config-based advice omitted")
    if art.config is not None:
        try:
            art.cfg = config_from_dict(art.config)
        except Exception as exc:  # noqa: BLE001 - an older/newer config still gets its brief from the dict
            art.notes.append(f"config.yaml does not validate with this version ({reason(exc)}); shown as written")
    art.run_stats = _read_or_note(art, "summary", "summary.json", _holds(files, "summary.json"),
                                  lambda: _read_mapping(storage.join(uri, "summary.json")),
                                  "`summary.json` is not in the run folder: timings, data and memory statistics "
                                  "omitted") or {}
    if art.cfg is not None and not art.run_stats.get("run_name"):
        art.name = art.cfg.run.name or art.name
    art.name = art.run_stats.get("run_name") or art.name
    logs = _read_or_note(art, "training", "train_log.parquet", _holds(files, "train_log.parquet"),
                         lambda: _read_train_log(uri),
                         "`train_log.parquet` is not in the run folder (the run did not train, e.g. it only "
                         "summarized): training statistics and the loss plot are missing")
    if logs is not None:
        art.train_log, art.eval_log, art.rouge_log = logs
    art.predictions, art.metrics = _load_scored(art, files, "", "fine-tuned")
    if _predictions_location(files, BASELINE):  # no baseline is normal: run.baseline=false
        art.baseline_predictions, art.baseline_metrics = _load_scored(art, files, BASELINE, "zero-shot baseline")
    return art


def _run_files(uri: str) -> set[str]:
    """The run folder's files relative to it, minus what the report does not read (its own output, checkpoints)."""
    files = {r for r in storage.list_relative(uri) if not r.startswith((REPORT_DIR + "/", "checkpoints/"))}
    if not files:
        raise StorageError(f"no run found at {uri}: the folder is empty or missing; pass a run folder "
                           "(<storage.output>/<run.name>) that holds summary.json, train_log.parquet or "
                           "predictions.parquet")
    if not any(_is_run_artifact(f) for f in files):
        raise StorageError(f"no run found at {uri}: it holds {len(files)} file(s) but none a run writes (e.g. "
                           f"{sorted(files)[0]}); pass a run folder (<storage.output>/<run.name>) or a summarize "
                           "job's output")
    return files


RUN_ARTIFACTS = ("config.yaml", "summary.json", "train_log.parquet", "predictions.parquet", "metrics.json",
                 "_phi2sum_run.json", "adapter/adapter_config.json")


def _is_run_artifact(relpath: str) -> bool:
    """A file a phi2sum run or summarize job writes (at the top or under baseline/), or a summarize shard part."""
    path = relpath.removeprefix(BASELINE)
    return path in RUN_ARTIFACTS or path.startswith("predictions.parquet/") or \
        (path.startswith("shard-") and "/part-" in path)


def _holds(files: set[str], path: str) -> bool:
    """``path`` is a file of the run or a folder of files (a Parquet dataset)."""
    return path in files or any(r.startswith(path + "/") for r in files)


def _read_or_note(art: RunArtifacts, label: str, path: str, present: bool, read: Callable[[], Any],
                  absent: str) -> Any:
    """``read()``, or None with the reason in ``art.missing[label]``: ``absent`` when the file is not there."""
    if not present:
        art.missing[label] = absent
        return None
    try:
        return read()
    except Exception as exc:  # noqa: BLE001 - a bad artifact becomes a note in the report
        art.missing[label] = f"`{path}` could not be read ({reason(exc)})"
        log.warning("report: %s unusable: %s", path, reason(exc))
        return None


def _load_scored(art: RunArtifacts, files: set[str], prefix: str, what: str) -> tuple[pd.DataFrame | None,
                                                                                       dict[str, Any] | None]:
    """Predictions and metrics under ``prefix``, each scored from the other when only one side has scores."""
    paths = _predictions_location(files, prefix)
    predictions = _read_or_note(art, f"{what} predictions", _shown_location(paths, prefix), bool(paths),
                                lambda: _read_predictions(art.uri, paths),
                                f"`{prefix}predictions.parquet` is not in the run folder (the run did not "
                                "summarize): examples, CSV and dataset analysis are missing")
    metrics_path = f"{prefix}metrics.json"
    metrics = _read_or_note(art, f"{what} metrics", metrics_path, _holds(files, metrics_path),
                            lambda: _read_mapping(storage.join(art.uri, metrics_path)),
                            f"`{metrics_path}` is not in the run folder (predictions were not scored)")
    if predictions is None:
        return None, metrics
    try:
        if _add_rouge_columns(predictions):
            art.notes.append(f"{what} predictions carry no per-example ROUGE; the report scored them "
                             "(same scorer as metrics.json)")
    except Exception as exc:  # noqa: BLE001 - examples then go unranked
        art.notes.append(f"per-example ROUGE of the {what} predictions could not be computed ({reason(exc)})")
    if metrics is None:
        metrics = _metrics_from_predictions(predictions)
        if metrics is not None:
            art.missing.pop(f"{what} metrics", None)
            art.notes.append(f"{what} metrics computed from the per-example ROUGE columns of "
                             f"{prefix}predictions.parquet ({metrics_path} absent)")
    return predictions, metrics


def _predictions_location(files: set[str], prefix: str) -> list[str]:
    """Relative paths holding predictions under ``prefix``: predictions.parquet (file or folder of parts); else
    the folder itself when it is a Ray summarize job's output (``shard-<i>-of-<n>/part-*.parquet``); else Parquet
    parts directly in the folder."""
    name = f"{prefix}predictions.parquet"
    if _holds(files, name):
        return [name]
    if any(r.startswith(prefix) and r[len(prefix):].startswith("shard-") and "/" in r[len(prefix):] for r in files):
        return [prefix + SHARDED]
    parts = []
    for r in sorted(files):
        if not r.startswith(prefix):
            continue
        tail = r[len(prefix):]
        if "/" in tail or not tail.endswith(".parquet") or tail.startswith(("_", ".")) or tail == "train_log.parquet":
            continue
        parts.append(r)
    return parts


def _shown_location(paths: list[str], prefix: str) -> str:
    """How the report names where the predictions are (or would be)."""
    if not paths:
        return f"{prefix}predictions.parquet"
    if paths[0].endswith(SHARDED):
        return f"{paths[0]}-of-*/part-*.parquet"
    return paths[0] if len(paths) == 1 else f"{paths[0]} (+{len(paths) - 1} parts)"


def _read_predictions(uri: str, paths: list[str]) -> pd.DataFrame:
    if paths[0].endswith(SHARDED):
        table = read_predictions(storage.join(uri, paths[0][:-len(SHARDED)]))  # checks every shard is complete
    else:
        tables = [storage.read_parquet(storage.join(uri, p)) for p in paths]
        table = tables[0] if len(tables) == 1 else pa.concat_tables(tables, promote_options="default")
    frame = table.to_pandas()
    if "prediction" not in frame.columns:
        raise ValueError(f"no 'prediction' column (columns: {', '.join(frame.columns)})")
    if "id" not in frame.columns:
        frame.insert(0, "id", [str(i) for i in range(len(frame))])
    for column in ("document", "reference", "prediction"):
        if column in frame.columns:
            frame[column] = frame[column].fillna("").astype(str)
    return frame.reset_index(drop=True)


def _add_rouge_columns(frame: pd.DataFrame) -> bool:
    """Per-example ROUGE for predictions that have references but no scores (a Ray summarize output keeps
    only metrics.json): best/worst examples and the CSV need them. True when added."""
    if all(c in frame.columns for c in ROUGE_TYPES) or "reference" not in frame.columns:
        return False
    has_ref = frame["reference"].str.strip() != ""
    if not has_ref.any():
        return False
    scores = score_examples(list(frame.loc[has_ref, "prediction"]), list(frame.loc[has_ref, "reference"]))
    for name in ROUGE_TYPES:
        column = pd.Series(np.nan, index=frame.index, dtype=float)
        column[has_ref] = [row[name] for row in scores]
        frame[name] = column
    return True


def _metrics_from_predictions(frame: pd.DataFrame) -> dict[str, Any] | None:
    """metrics.json's shape from the per-example ROUGE columns (when metrics.json itself is missing)."""
    if not all(c in frame.columns for c in ROUGE_TYPES):
        return None
    scored = frame.dropna(subset=list(ROUGE_TYPES))
    out = aggregate([{c: float(row[c]) for c in ROUGE_TYPES} for _, row in scored.iterrows()])
    out["unscored"] = int(len(frame) - len(scored))
    return out


def _read_config(uri: str) -> dict[str, Any]:
    data = yaml.safe_load(storage.read_text(storage.join(uri, "config.yaml")))
    if not isinstance(data, dict):
        raise ValueError("not a mapping of config sections")
    return data


def _read_mapping(uri: str) -> dict[str, Any]:
    data = storage.read_json(uri)
    if not isinstance(data, dict):
        raise ValueError("not a JSON object")
    return data


TRACKED_ROUGE = ("rouge1", "rouge2", "rougeL")  # what a ROUGE-at-checkpoint row must have (rougeLsum may be null)


def _read_train_log(uri: str) -> tuple[pd.DataFrame, pd.DataFrame | None, pd.DataFrame | None]:
    """(training-loss rows, validation-loss rows or None, ROUGE rows or None): the log mixes the three kinds (its
    `kind` column), and every training-loss number of the report must come from the training rows alone. A log
    written before `kind` existed is all training rows."""
    frame = storage.read_parquet(storage.join(uri, "train_log.parquet")).to_pandas()
    for column in ("step", "loss"):
        if column not in frame.columns:
            raise ValueError(f"no '{column}' column")
    if "worker" not in frame.columns:
        frame["worker"] = 0
    kind = frame["kind"].fillna("train").astype(str) if "kind" in frame.columns else pd.Series("train", frame.index)
    return (_train_rows(frame[kind == "train"]), _kind_rows(frame[kind == "eval"], ("eval_loss",)),
            _kind_rows(frame[kind == "rouge"], TRACKED_ROUGE))


def _kind_rows(frame: pd.DataFrame, required: tuple[str, ...]) -> pd.DataFrame | None:
    """Rows with finite `required` values, one per step (the last: a resumed run logs a step again), by step;
    None when there are none. They come from worker 0 alone, so the first worker's are kept."""
    if frame.empty or not all(c in frame.columns for c in required):
        return None
    frame = frame[np.isfinite(frame[list(required)].astype(float)).all(axis=1)]
    frame = frame[frame["worker"] == frame["worker"].min()] if not frame.empty else frame
    if frame.empty:
        return None
    frame = frame.drop_duplicates(subset=["step"], keep="last")
    return frame.sort_values("step").reset_index(drop=True)


def _train_rows(frame: pd.DataFrame) -> pd.DataFrame:
    frame = frame[np.isfinite(frame["loss"].astype(float))]
    if frame.empty:
        raise ValueError("no logged steps with a finite loss")
    frame = frame.drop_duplicates(subset=["worker", "step"], keep="last")  # a resumed run re-logs steps
    return frame.sort_values(["worker", "step"]).reset_index(drop=True)

"""Run report: plots, tables and run-specific next steps for one run folder, written to ``<run>/report/``.

``write_report(run_uri)`` reads whatever the run folder (local or ``s3://``) holds -- config.yaml, summary.json,
train_log.parquet, predictions.parquet + metrics.json, baseline/ -- renders everything in a local temp folder
and uploads it through :mod:`phi2sum.storage`:

* ``training_loss.png``    loss per step (raw + EMA, one curve per worker) with the learning rate
* ``rouge_scores.png``     ROUGE-1/2/L/Lsum x100 with 95% intervals, baseline, notebook and published marks
* ``dataset_analysis.png`` document/summary lengths (words, tokens), compression ratio, truncation shares
* ``sample_predictions.txt``, ``all_predictions.csv``
* ``report.md``            config, data and training statistics, metrics table, plots, best/worst examples
                           and next steps derived from this run's numbers

A run that only trained or only summarized gets the report of what it has: every artifact and every section
is loaded/rendered on its own, and a failure is written into the report (what is missing and why) instead of
failing it. Only an unreadable or empty run location is an error (:class:`~phi2sum.errors.Phi2SumError`).
"""

from __future__ import annotations

import csv
import logging
import math
import os
import tempfile
import textwrap
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Callable

import numpy as np
import pandas as pd

from phi2sum import storage
from phi2sum.errors import Phi2SumError, StorageError

log = logging.getLogger(__name__)

REPORT_DIR = "report"
SHARDED = "shard-*"  # marks a Ray summarize output (shard-<i>-of-<n>/part-*.parquet) in a location list
DPI = 120
ROUGE_TYPES = ("rouge1", "rouge2", "rougeL", "rougeLsum")
ROUGE_LABELS = {"rouge1": "ROUGE-1", "rouge2": "ROUGE-2", "rougeL": "ROUGE-L", "rougeLsum": "ROUGE-Lsum"}
# Published ROUGE F1 x100 on XSum (no ROUGE-Lsum published for these): (label, scores, colour, line style).
PUBLISHED = (
    ("Original notebook (Phi-2 + LoRA, 1 epoch)", {"rouge1": 7.13, "rouge2": 0.21, "rougeL": 6.03}, "black", ":"),
    ("PEGASUS (published, XSum)", {"rouge1": 47.21, "rouge2": 24.56, "rougeL": 39.25}, "tab:red", "--"),
    ("BART-large (published, XSum)", {"rouge1": 45.14, "rouge2": 22.27, "rougeL": 37.25}, "tab:purple", "-."),
)
NOTEBOOK = PUBLISHED[0][1]


def on_xsum(art: "RunArtifacts") -> bool:
    """The notebook's and the published marks are XSum scores: only a run scored on XSum is set against them
    (the demo's synthetic corpus is not, though its name says xsum)."""
    source = str(_get(art.config, "data.source", ""))
    return "xsum" in source.lower() and not source.startswith("embedded:")

# Thresholds of the next-step rules (fractions unless noted).
TRUNCATED_SHARE = 0.20  # documents cut to fit the prompt budget
LOSS_TAIL_DROP = 0.05  # smoothed loss still falling by this much over the last quarter of training
LOSS_TAIL_RISE = 0.05  # ... or rising by this much
LOSS_FLAT = 0.03  # first -> final smoothed loss moved less than this
LENGTH_RATIO_HIGH = 1.5  # median generated words / median reference words
LENGTH_RATIO_LOW = 0.67
HIT_MAX_NEW_TOKENS = 0.20  # summaries that stopped at generation.max_new_tokens
BASELINE_MARGIN = 2.0  # ROUGE-L points (x100) the fine-tuned model should clear the baseline by
SKIPPED_SHARE = 0.02  # records dropped by validation
PADDING_FRACTION = 0.25  # pad tokens / (pad + prompt tokens) in generation batches
CI_WIDTH = 6.0  # ROUGE-L 95% interval width (x100 points)
EMPTY_SHARE = 0.05  # empty predictions
CLIP_FACTOR = 3.0  # median grad norm / max_grad_norm


# --------------------------------------------------------------------------------------------- loading


@dataclass
class RunArtifacts:
    """What the run folder held; ``missing`` maps an artifact to why it is absent or unusable."""

    uri: str
    name: str
    config: dict[str, Any] | None = None
    cfg: Any = None  # phi2sum.config.Config when config.yaml validates
    summary: dict[str, Any] = field(default_factory=dict)
    train_log: pd.DataFrame | None = None
    predictions: pd.DataFrame | None = None
    metrics: dict[str, Any] | None = None
    baseline_predictions: pd.DataFrame | None = None
    baseline_metrics: dict[str, Any] | None = None
    missing: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def _reason(exc: BaseException) -> str:
    """One line, redacted, short: why something could not be used."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    if not isinstance(exc, Phi2SumError):
        text = f"{type(exc).__name__}: {text}"
    return storage.redact(text)[:240]


def _predictions_location(rel: set[str], prefix: str) -> list[str]:
    """Relative paths holding predictions under ``prefix``: predictions.parquet (file or folder of parts); else
    the folder itself when it is a Ray summarize job's output (``shard-<i>-of-<n>/part-*.parquet``); else Parquet
    parts directly in the folder."""
    name = f"{prefix}predictions.parquet"
    if name in rel or any(r.startswith(name + "/") for r in rel):
        return [name]
    if any(r.startswith(prefix) and r[len(prefix):].startswith("shard-") and "/" in r[len(prefix):] for r in rel):
        return [prefix + SHARDED]
    shards = []
    for r in sorted(rel):
        if not r.startswith(prefix):
            continue
        tail = r[len(prefix):]
        if "/" in tail or not tail.endswith(".parquet") or tail.startswith(("_", ".")) or tail == "train_log.parquet":
            continue
        shards.append(r)
    return shards


def _read_predictions(uri: str, paths: list[str]) -> pd.DataFrame:
    import pyarrow as pa

    if paths[0].endswith(SHARDED):
        from phi2sum.ray_summarize import read_predictions  # checks every shard is complete, ids unique

        table = read_predictions(storage.join(uri, paths[0][:-len(SHARDED)]))
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
    from phi2sum.metrics import score_examples

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
    from phi2sum.metrics import aggregate

    if not all(c in frame.columns for c in ROUGE_TYPES):
        return None
    scored = frame.dropna(subset=list(ROUGE_TYPES))
    out = aggregate([{c: float(row[c]) for c in ROUGE_TYPES} for _, row in scored.iterrows()])
    out["unscored"] = int(len(frame) - len(scored))
    return out


def load_run(run_uri: str) -> RunArtifacts:
    """Read every artifact the run folder has; raise only when the location is unreadable or holds nothing."""
    uri = os.fspath(run_uri).rstrip("/") or os.fspath(run_uri)
    rel = {r for r in storage.list_relative(uri) if not r.startswith((REPORT_DIR + "/", "checkpoints/"))}
    if not rel:
        raise StorageError(f"no run found at {uri}: the folder is empty or missing; pass a run folder "
                           "(<storage.output>/<run.name>) that holds summary.json, train_log.parquet or "
                           "predictions.parquet")
    art = RunArtifacts(uri=uri, name=uri.rstrip("/").rsplit("/", 1)[-1])

    def attempt(label: str, path: str, read: Callable[[], Any], absent: str, present: bool | None = None) -> Any:
        if present is None:
            present = path in rel or any(r.startswith(path + "/") for r in rel)
        if not present:
            art.missing[label] = absent
            return None
        try:
            return read()
        except Exception as exc:  # noqa: BLE001 - a bad artifact becomes a note in the report
            art.missing[label] = f"`{path}` could not be read ({_reason(exc)})"
            log.warning("report: %s unusable: %s", path, _reason(exc))
            return None

    art.config = attempt("config", "config.yaml", lambda: _read_config(uri),
                         "`config.yaml` is not in the run folder: configuration and config-based advice omitted")
    if art.config is not None:
        try:
            from phi2sum.config import config_from_dict

            art.cfg = config_from_dict(art.config)
        except Exception as exc:  # noqa: BLE001 - an older/newer config still gets its brief from the dict
            art.notes.append(f"config.yaml does not validate with this version ({_reason(exc)}); shown as written")
    art.summary = attempt("summary", "summary.json", lambda: _read_mapping(storage.join(uri, "summary.json")),
                          "`summary.json` is not in the run folder: timings, data and memory statistics "
                          "omitted") or {}
    if art.cfg is not None and not art.summary.get("run_name"):
        art.name = art.cfg.run.name or art.name
    art.name = art.summary.get("run_name") or art.name
    art.train_log = attempt("training", "train_log.parquet", lambda: _read_train_log(uri),
                            "`train_log.parquet` is not in the run folder (the run did not train, e.g. it only "
                            "summarized): training statistics and the loss plot are missing")

    for key, prefix_, what in (("", "", "fine-tuned"), ("baseline", "baseline/", "zero-shot baseline")):
        paths = _predictions_location(rel, prefix_)
        if not paths and key:
            continue  # no baseline is normal: run.baseline=false
        shown = (f"{paths[0]}-of-*/part-*.parquet" if paths[0].endswith(SHARDED) else
                 paths[0] if len(paths) == 1 else f"{paths[0]} (+{len(paths) - 1} parts)") if paths else \
            f"{prefix_}predictions.parquet"
        predictions = attempt(f"{what} predictions", shown, lambda p=paths: _read_predictions(uri, p),
                              f"`{prefix_}predictions.parquet` is not in the run folder (the run did not "
                              "summarize): examples, CSV and dataset analysis are missing", present=bool(paths))
        metrics = attempt(f"{what} metrics", f"{prefix_}metrics.json",
                          lambda p=prefix_: _read_mapping(storage.join(uri, f"{p}metrics.json")),
                          f"`{prefix_}metrics.json` is not in the run folder (predictions were not scored)")
        if predictions is not None:
            try:
                if _add_rouge_columns(predictions):
                    art.notes.append(f"{what} predictions carry no per-example ROUGE; the report scored them "
                                     "(same scorer as metrics.json)")
            except Exception as exc:  # noqa: BLE001 - examples then go unranked
                art.notes.append(f"per-example ROUGE of the {what} predictions could not be computed ({_reason(exc)})")
        if metrics is None and predictions is not None:
            metrics = _metrics_from_predictions(predictions)
            if metrics is not None:
                art.missing.pop(f"{what} metrics", None)
                art.notes.append(f"{what} metrics computed from the per-example ROUGE columns of "
                                 f"{prefix_}predictions.parquet ({prefix_}metrics.json absent)")
        if key:
            art.baseline_predictions, art.baseline_metrics = predictions, metrics
        else:
            art.predictions, art.metrics = predictions, metrics
    return art


def _read_config(uri: str) -> dict[str, Any]:
    import yaml

    data = yaml.safe_load(storage.read_text(storage.join(uri, "config.yaml")))
    if not isinstance(data, dict):
        raise ValueError("not a mapping of config sections")
    return data


def _read_mapping(uri: str) -> dict[str, Any]:
    data = storage.read_json(uri)
    if not isinstance(data, dict):
        raise ValueError("not a JSON object")
    return data


def _read_train_log(uri: str) -> pd.DataFrame:
    frame = storage.read_parquet(storage.join(uri, "train_log.parquet")).to_pandas()
    for column in ("step", "loss"):
        if column not in frame.columns:
            raise ValueError(f"no '{column}' column")
    if "worker" not in frame.columns:
        frame["worker"] = 0
    frame = frame[np.isfinite(frame["loss"].astype(float))]
    if frame.empty:
        raise ValueError("no logged steps with a finite loss")
    frame = frame.drop_duplicates(subset=["worker", "step"], keep="last")  # a resumed run re-logs steps
    return frame.sort_values(["worker", "step"]).reset_index(drop=True)


# --------------------------------------------------------------------------------------------- helpers


def _get(mapping: Any, dotted: str, default: Any = None) -> Any:
    node = mapping
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return default
        node = node[part]
    return default if node is None else node


def _num(value: Any) -> str:
    """Numbers as in summary.json (ints with thousands separators, floats rounded to 4 decimals)."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{round(value, 4):,}"
    return str(value)


def _pct(part: float, whole: float) -> str:
    return f"{100 * part / whole:.1f}%" if whole else "n/a"


def _shorten(text: Any, limit: int) -> str:
    text = " ".join(str(text or "").split())
    if len(text) <= limit:
        return text
    return text[:limit].rsplit(" ", 1)[0].rstrip(" ,;:") + " …"


def _md(text: str) -> str:
    """Text safe inside a markdown table cell or block quote."""
    return " ".join(str(text).split()).replace("|", "\\|")


def _words(series: pd.Series) -> np.ndarray:
    return np.array([len(str(t).split()) for t in series], dtype=float)


def _x100(value: Any) -> float | None:
    return None if value is None else 100 * float(value)


def _ema(values: np.ndarray) -> tuple[np.ndarray, int]:
    span = int(min(25, max(2, round(len(values) / 8))))
    return pd.Series(values).ewm(span=span, adjust=True).mean().to_numpy(), span


# --------------------------------------------------------------------------------------------- statistics


@dataclass
class EvalStats:
    """Per-document lengths of the eval set, shared by the plots, the markdown and the next-step rules."""

    frame: pd.DataFrame  # doc_words, ref_words, pred_words, [base_words], prompt_tokens, doc_tokens, ref_tokens, ...
    token_source: str  # where doc_tokens came from
    prompt_budget: int | None
    max_length: int | None
    max_new_tokens: int | None


def eval_stats(art: RunArtifacts, tokenizer: Any) -> EvalStats | None:
    pred = art.predictions
    if pred is None:
        return None
    frame = pd.DataFrame({"id": pred["id"].astype(str)})
    if "document" in pred.columns:
        frame["doc_words"] = _words(pred["document"])
    if "reference" in pred.columns:
        frame["ref_words"] = _words(pred["reference"])
    frame["pred_words"] = _words(pred["prediction"])
    for column in ("prompt_tokens", "generated_tokens", "padding_tokens", "truncated", *ROUGE_TYPES):
        if column in pred.columns:
            frame[column] = pred[column].to_numpy()
    base = art.baseline_predictions
    if base is not None:
        by_id = dict(zip(base["id"].astype(str), base["prediction"]))
        frame["base_words"] = [len(str(by_id[i]).split()) if i in by_id else np.nan for i in frame["id"]]
        if "rougeL" in base.columns:
            scores = dict(zip(base["id"].astype(str), base["rougeL"]))
            frame["base_rougeL"] = [scores.get(i, np.nan) for i in frame["id"]]
    token_source = "prompt_tokens (prompt as fed to the model, after truncation)"
    if tokenizer is not None and "document" in pred.columns:
        encode = lambda texts: [len(ids) for ids in tokenizer(list(texts), add_special_tokens=False)["input_ids"]]  # noqa: E731
        frame["doc_tokens"] = encode(pred["document"])
        if "reference" in pred.columns:
            frame["ref_tokens"] = encode(pred["reference"])
        token_source = f"tokenizer of {art.cfg.model.base}" if art.cfg is not None else "the model's tokenizer"
    budget = max_length = max_new = None
    if art.cfg is not None:
        from phi2sum.config import prompt_token_budget

        budget, max_length = prompt_token_budget(art.cfg), art.cfg.prompt.max_length
        max_new = art.cfg.generation.max_new_tokens
    elif art.config is not None:
        max_length = _get(art.config, "prompt.max_length")
        max_new = _get(art.config, "generation.max_new_tokens")
        budget = _get(art.config, "generation.max_prompt_tokens") or (
            max_length - max_new if max_length and max_new else None)
    return EvalStats(frame, token_source, budget, max_length, max_new)


def load_tokenizer_cheaply(art: RunArtifacts) -> tuple[Any, str]:
    """The run's tokenizer when it is on this machine (embedded, a local folder or the HF cache), else None and
    why: a report never downloads a model and never fails for want of one."""
    if art.cfg is None:
        return None, "no usable config.yaml, so the tokenizer is unknown"
    base = art.cfg.model.base
    try:
        from phi2sum.model import EMBEDDED_PREFIX, load_tokenizer

        if base.startswith(EMBEDDED_PREFIX):
            from phi2sum import embedded

            built = embedded._cache_root(None) / f"tiny-phi-{embedded.recipe_hash()}" / embedded.BUILD_INFO_FILE
            if not built.is_file():
                return None, f"{base} is not built on this machine (building it takes minutes)"
        elif not os.path.isdir(os.path.expanduser(base)):
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(base, "tokenizer_config.json", revision=art.cfg.model.revision)
            if not isinstance(cached, str):
                return None, f"the tokenizer of {base} is not in the local Hugging Face cache (not downloaded)"
        return load_tokenizer(art.cfg), ""
    except Exception as exc:  # noqa: BLE001 - token counts are optional
        return None, f"the tokenizer of {base} could not be loaded ({_reason(exc)})"


def loss_trend(train_log: pd.DataFrame) -> dict[str, Any] | None:
    """Smoothed loss at start, three quarters and end of the first worker's log (the reference curve)."""
    worker = sorted(train_log["worker"].unique())[0]
    part = train_log[train_log["worker"] == worker]
    loss = part["loss"].to_numpy(dtype=float)
    steps = part["step"].to_numpy()
    if len(loss) < 4:
        return None
    smooth, _ = _ema(loss)
    q3 = int(np.searchsorted(steps, steps[0] + 0.75 * (steps[-1] - steps[0])))
    q3 = min(max(q3, 1), len(loss) - 2)
    return {"first": float(loss[0]), "final": float(loss[-1]), "smooth_first": float(smooth[0]),
            "smooth_q3": float(smooth[q3]), "smooth_final": float(smooth[-1]), "step_q3": int(steps[q3]),
            "step_final": int(steps[-1]), "points": len(loss)}


# --------------------------------------------------------------------------------------------- plots


def _figure(**kwargs):
    from matplotlib.figure import Figure

    return Figure(layout="constrained", **kwargs)  # no pyplot: no global state, always the Agg canvas


def plot_training_loss(art: RunArtifacts, path: str) -> None:
    from matplotlib.ticker import MaxNLocator

    frame = art.train_log
    if frame is None:
        raise _Missing(art.missing.get("training", "no training log"))
    fig = _figure(figsize=(9, 5.2))
    ax = fig.add_subplot()
    workers = sorted(frame["worker"].unique())
    colors = [f"C{i % 10}" for i in range(len(workers))]
    handles = []
    for worker, color in zip(workers, colors):
        part = frame[frame["worker"] == worker]
        steps, loss = part["step"].to_numpy(), part["loss"].to_numpy(dtype=float)
        smooth, span = _ema(loss)
        tag = f"worker {worker}: " if len(workers) > 1 else ""
        handles += ax.plot(steps, loss, color=color, alpha=0.45, lw=1, marker="o", ms=3.5, label=f"{tag}loss (raw)")
        handles += ax.plot(steps, smooth, color=color, lw=2.4, label=f"{tag}loss (EMA, span {span})")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss (cross-entropy, nats/token)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    if "learning_rate" in frame.columns:
        lr_part = frame[frame["worker"] == workers[0]]
        ax2 = ax.twinx()
        handles += ax2.plot(lr_part["step"], lr_part["learning_rate"], color="tab:gray", ls="--", lw=1.5,
                            label="learning rate (right axis)")
        ax2.set_ylabel("learning rate")
        ax2.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
        ax2.set_ylim(bottom=0)
    first, final = frame[frame["worker"] == workers[0]]["loss"].iloc[[0, -1]]
    steps_total = int(frame["step"].max())
    who = f", {len(workers)} workers" if len(workers) > 1 else ""
    ax.set_title(f"Training loss per step: run {art.name}\n{steps_total} steps{who}; "
                 f"loss {first:.3f} (first) -> {final:.3f} (final)")
    fig.legend(handles=handles, loc="outside lower center", ncols=min(3, len(handles)), fontsize=9, frameon=False)
    fig.savefig(path, dpi=DPI)


def plot_rouge(art: RunArtifacts, path: str) -> None:
    series = [(label, m, color) for label, m, color in (
        ("Zero-shot baseline", art.baseline_metrics, "tab:orange"),
        ("Fine-tuned (LoRA)", art.metrics, "tab:blue")) if m is not None and _get(m, "rougeL.mean") is not None]
    if not series:
        raise _Missing(art.missing.get("fine-tuned metrics") or "no scored predictions (metrics.json)")
    fig = _figure(figsize=(9.5, 5.6))
    ax = fig.add_subplot()
    x = np.arange(len(ROUGE_TYPES))
    width = 0.8 / len(series)
    handles = []
    top = 0.0
    for k, (label, metrics, color) in enumerate(series):
        offset = (k - (len(series) - 1) / 2) * width
        means = np.array([_x100(_get(metrics, f"{r}.mean")) or 0.0 for r in ROUGE_TYPES])
        lows = np.array([_x100(_get(metrics, f"{r}.low", _get(metrics, f"{r}.mean"))) or 0.0 for r in ROUGE_TYPES])
        highs = np.array([_x100(_get(metrics, f"{r}.high", _get(metrics, f"{r}.mean"))) or 0.0 for r in ROUGE_TYPES])
        err = np.vstack([np.clip(means - lows, 0, None), np.clip(highs - means, 0, None)])
        bars = ax.bar(x + offset, means, width * 0.92, yerr=err, capsize=4, color=color, alpha=0.85,
                      error_kw={"elinewidth": 1.2, "ecolor": "black"},
                      label=f"{label} (n={metrics.get('count', '?')}, 95% CI)")
        handles.append(bars)
        for xi, hi, mean in zip(x + offset, highs, means):
            ax.text(xi, hi + 0.6, f"{mean:.2f}", ha="center", va="bottom", fontsize=8, zorder=5,
                    bbox={"boxstyle": "round,pad=0.15", "facecolor": "white", "edgecolor": "none", "alpha": 0.85})
        top = max(top, float(highs.max()))
    for label, scores, color, style in PUBLISHED if on_xsum(art) else ():
        for i, name in enumerate(ROUGE_TYPES):
            if name in scores:
                line = ax.hlines(scores[name], i - 0.46, i + 0.46, colors=color, linestyles=style, lw=2, label=label)
        handles.append(line)
        top = max(top, max(scores.values()))
    ax.set_xticks(x, [ROUGE_LABELS[r] if r != "rougeLsum" or not on_xsum(art) else "ROUGE-Lsum\n(no published marks)"
                      for r in ROUGE_TYPES])
    ax.set_ylabel("ROUGE F1 (x100)")
    ax.set_ylim(0, top * 1.1 + 2)
    ax.grid(axis="y", alpha=0.3)
    count = (art.metrics or art.baseline_metrics or {}).get("count", "?")
    ax.set_title(f"ROUGE on {count} eval documents: run {art.name}\n"
                 "bars: this run (error bars: 95% bootstrap interval)"
                 + ("; lines: original notebook and published XSum results" if on_xsum(art) else ""))
    fig.legend(handles=handles, loc="outside lower center", ncols=2, fontsize=9, frameon=False)
    fig.savefig(path, dpi=DPI)


def plot_dataset(art: RunArtifacts, stats: EvalStats | None, path: str) -> None:
    from matplotlib.ticker import MaxNLocator

    if stats is None:
        raise _Missing(art.missing.get("fine-tuned predictions") or "no predictions")
    f = stats.frame
    fig = _figure(figsize=(15, 9))
    axes = fig.subplots(2, 3)
    n = len(f)
    fig.suptitle(f"Eval set analysis: {n} documents, run {art.name}", fontsize=14)

    def hist(ax, values, label, color, bins, **kw):
        values = np.asarray(values, dtype=float)
        values = values[np.isfinite(values)]
        if len(values):
            ax.hist(values, bins=bins, color=color, alpha=kw.pop("alpha", 0.75), label=label, **kw)

    def median_line(ax, values) -> str:
        values = np.asarray(values, dtype=float)
        values = values[np.isfinite(values)]
        if not len(values):
            return ""
        med = float(np.median(values))
        ax.axvline(med, color="black", ls=":", lw=1.5)
        return f"{med:.1f}"

    def empty(ax, title, why):
        ax.set_title(title)
        ax.text(0.5, 0.5, textwrap.fill(why, 40), ha="center", va="center", transform=ax.transAxes, fontsize=10,
                color="dimgray")
        ax.set_xticks([])
        ax.set_yticks([])

    bins = min(30, max(5, n // 3))
    ax = axes[0, 0]
    if "doc_words" in f:
        hist(ax, f["doc_words"], "documents", "tab:blue", bins)
        med = median_line(ax, f["doc_words"])
        ax.set(title=f"Document length (words); dotted: median {med}", xlabel="words per document",
               ylabel="documents")
    else:
        empty(ax, "Document length (words)", "predictions carry no 'document' column")

    ax = axes[0, 1]
    column = "doc_tokens" if "doc_tokens" in f else "prompt_tokens" if "prompt_tokens" in f else None
    if column:
        what = "full documents" if column == "doc_tokens" else "prompts as fed (after truncation)"
        hist(ax, f[column], what, "tab:green", bins)
        if stats.prompt_budget:
            ax.axvline(stats.prompt_budget, color="tab:red", lw=2,
                       label=f"generation prompt budget ({stats.prompt_budget} tok)")
        if stats.max_length and column == "doc_tokens":
            ax.axvline(stats.max_length, color="tab:purple", lw=2, ls="--",
                       label=f"prompt.max_length ({stats.max_length} tok)")
        source = stats.token_source.split(" (")[0]
        ax.set(title="Document length (tokens)", ylabel="documents",
               xlabel=f"tokens per document ({source})" if column == "doc_tokens"
               else "prompt tokens per document (as fed, after truncation)")
        ax.legend(fontsize=8)
    else:
        empty(ax, "Document length (tokens)", "no token counts: no prompt_tokens column and no tokenizer")

    ax = axes[0, 2]
    lengths = [(c, label, color) for c, label, color in (
        ("ref_words", "reference", "tab:gray"), ("pred_words", "fine-tuned prediction", "tab:blue"),
        ("base_words", "zero-shot baseline", "tab:orange")) if c in f]
    top = max(float(np.nanmax(f[c])) for c, _, _ in lengths) if lengths else 1.0
    shared = np.linspace(0, max(top, 1.0) + 1, 21)
    for c, label, color in lengths:
        if c == "ref_words":
            hist(ax, f[c], label, color, shared, alpha=0.45)
        else:
            hist(ax, f[c], label, color, shared, alpha=0.95, histtype="step", lw=2.2)
    ax.set(title="Summary length (words)", xlabel="words per summary", ylabel="summaries")
    ax.legend(fontsize=8)

    ax = axes[1, 0]
    if "doc_words" in f and "ref_words" in f:
        ratio = (f["doc_words"] / f["ref_words"].replace(0, np.nan)).to_numpy(dtype=float)
        hist(ax, ratio, "document / reference", "tab:cyan", bins)
        med = median_line(ax, ratio)
        ax.set(title=f"Compression ratio; dotted: median {med}x", ylabel="documents",
               xlabel="document words / reference words (x)")
    else:
        empty(ax, "Compression ratio", "needs 'document' and 'reference' columns")

    ax = axes[1, 1]
    shares = truncation_shares(art, stats)
    if shares:
        labels = [textwrap.fill(s[0], 26) for s in shares]
        values = [100 * s[1] / s[2] for s in shares]
        y = np.arange(len(shares))
        ax.barh(y, values, color=["tab:red" if v >= 100 * TRUNCATED_SHARE else "tab:green" for v in values],
                alpha=0.8)
        ax.barh(y, [100 - v for v in values], left=values, color="lightgray", alpha=0.6)
        for yi, v, (_, part, whole) in zip(y, values, shares):
            ax.text(min(v + 1.5, 70), yi, f"{v:.1f}% ({part} of {whole})", va="center", fontsize=9)
        ax.set_yticks(y, labels, fontsize=8.5)
        ax.invert_yaxis()
        ax.set_xlim(0, 100)
        ax.set(title="Truncated to fit max_length (share)", xlabel="% truncated (red: over "
               f"{100 * TRUNCATED_SHARE:.0f}%)")
    else:
        empty(ax, "Truncation", "no truncation counts (no 'truncated' column or training statistics)")

    ax = axes[1, 2]
    if "ref_words" in f:
        for c, label, color, marker in (("pred_words", "fine-tuned", "tab:blue", "o"),
                                        ("base_words", "zero-shot baseline", "tab:orange", "s")):
            if c in f:
                ax.scatter(f["ref_words"], f[c], s=18, alpha=0.7, color=color, marker=marker, label=label)
        lim = max(float(np.nanmax(f[[c for c in ("ref_words", "pred_words", "base_words") if c in f]].to_numpy())),
                  1.0) * 1.05
        ax.plot([0, lim], [0, lim], color="black", lw=1, ls="--", label="same length")
        ax.set(xlim=(0, lim), ylim=(0, lim), title="Generated vs reference length (words)",
               xlabel="reference words", ylabel="generated words")
        ax.legend(fontsize=8)
    else:
        empty(ax, "Generated vs reference length", "predictions carry no 'reference' column")
    for ax in (axes[0, 0], axes[0, 1], axes[0, 2], axes[1, 0]):
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    fig.savefig(path, dpi=DPI)


def truncation_shares(art: RunArtifacts, stats: EvalStats | None) -> list[tuple[str, int, int]]:
    """(what, truncated, out of) for the eval prompts, the training examples and (with a tokenizer) the
    eval documents longer than prompt.max_length."""
    out = []
    if stats is not None and "truncated" in stats.frame:
        cut = int(stats.frame["truncated"].fillna(False).astype(bool).sum())
        budget = f" (budget {stats.prompt_budget} tok)" if stats.prompt_budget else ""
        out.append((f"eval prompts{budget}", cut, len(stats.frame)))
    examples = _get(art.summary, "train.examples")
    if isinstance(examples, dict) and examples.get("used"):
        out.append((f"training examples (max_length {stats.max_length if stats and stats.max_length else '?'} tok)",
                    int(examples.get("truncated", 0)), int(examples["used"])))
    if stats is not None and "doc_tokens" in stats.frame and stats.max_length:
        over = int((stats.frame["doc_tokens"] > stats.max_length).sum())
        out.append((f"eval documents > max_length ({stats.max_length} tok)", over, len(stats.frame)))
    return out


class _Missing(Exception):
    """A section has no input: reported as missing, not as a failure."""


# --------------------------------------------------------------------------------------------- text outputs


def write_predictions_csv(art: RunArtifacts, path: str) -> None:
    if art.predictions is None:
        raise _Missing(art.missing.get("fine-tuned predictions") or "no predictions")
    pred = art.predictions
    columns = [c for c in ("id", "reference", "prediction", *ROUGE_TYPES) if c in pred.columns]
    out = pred[columns].copy()
    out["id"] = out["id"].astype(str)
    out.to_csv(path, index=False, quoting=csv.QUOTE_MINIMAL, lineterminator="\n", encoding="utf-8",
               float_format="%.6f")


def write_samples(art: RunArtifacts, path: str, count: int = 5) -> None:
    pred = art.predictions
    if pred is None:
        raise _Missing(art.missing.get("fine-tuned predictions") or "no predictions")
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
            lines += ["DOCUMENT (shortened):", textwrap.fill(_shorten(row["document"], 500), 100), ""]
        if "reference" in row:
            lines += ["REFERENCE:", textwrap.fill(_shorten(row["reference"], 400), 100), ""]
        lines += ["PREDICTION (fine-tuned):", textwrap.fill(_shorten(row["prediction"], 400) or "(empty)", 100), ""]
        if str(row["id"]) in base:
            lines += ["PREDICTION (zero-shot baseline):",
                      textwrap.fill(_shorten(base[str(row["id"])], 400) or "(empty)", 100), ""]
        lines += ["-" * 100, ""]
    with open(path, "w", encoding="utf-8") as handle:
        handle.write("\n".join(lines))


# --------------------------------------------------------------------------------------------- markdown


def _section_config(art: RunArtifacts) -> list[str]:
    c = art.cfg.to_dict() if art.cfg is not None else art.config
    if c is None:
        return [f"_Configuration missing: {art.missing.get('config', 'no config.yaml')}._"]
    g = lambda key, default=None: _get(c, key, default)  # noqa: E731
    quant = ("none (full precision)" if not g("quantization.load_in_4bit") else
             f"4-bit {str(g('quantization.quant_type', '?')).upper()}"
             f"{', double quantization' if g('quantization.double_quant') else ''}")
    r, alpha = g("lora.r"), g("lora.alpha")
    scale = f" (scale {alpha / r:g})" if isinstance(r, (int, float)) and isinstance(alpha, (int, float)) and r else ""
    targets = ", ".join(g("lora.target_modules", []) or [])
    length = (f"{g('train.max_steps')} steps" if (g("train.max_steps") or -1) > 0 else f"{g('train.epochs')} epoch(s)")
    budget = g("generation.max_prompt_tokens") or (
        (g("prompt.max_length") or 0) - (g("generation.max_new_tokens") or 0))
    rows = [
        ("Model", f"`{g('model.base')}`" + (f" @ {g('model.revision')}" if g("model.revision") else "")
         + f", dtype {g('model.dtype')}, device {g('model.device')}"),
        ("Quantization", quant),
        ("LoRA", f"r={r}, alpha={alpha}{scale}, dropout {g('lora.dropout')}, bias {g('lora.bias')}, "
                 f"targets {targets}"),
        ("Data", f"`{g('data.source')}`: {g('data.num_train', 'all')} records of split '{g('data.train_split')}' "
                 f"for training, {g('data.num_eval', 'all')} of '{g('data.eval_split')}' for eval (seeded subset, "
                 f"seed {g('data.seed')})"),
        ("Prompt", f"max_length {g('prompt.max_length')} tokens (training); generation prompt budget {budget} "
                   "tokens"),
        ("Train", f"{length}, batch {g('train.batch_size')} x accumulation {g('train.grad_accum')}, "
                  f"lr {g('train.learning_rate')} ({g('train.lr_scheduler')}, warmup {g('train.warmup_steps')}), "
                  f"optimizer {g('train.optim')}, max_grad_norm {g('train.max_grad_norm')}, seed {g('train.seed')}"),
        ("Generation", f"beams {g('generation.num_beams')}, max_new_tokens {g('generation.max_new_tokens')}, "
                       f"length_penalty {g('generation.length_penalty')}, no_repeat_ngram_size "
                       f"{g('generation.no_repeat_ngram_size')}, batch {g('generation.batch_size')}"),
    ]
    return ["| Setting | Value |", "|:--|:--|", *[f"| {k} | {_md(v)} |" for k, v in rows]]


def _section_data(art: RunArtifacts, stats: EvalStats | None) -> list[str]:
    out = []
    data = art.summary.get("data") if isinstance(art.summary.get("data"), dict) else {}
    if data:
        out += ["| Split | Source | Records read | Kept | Skipped | Cut at max_document_chars |", "|:--|:--|--:|--:|--:|--:|"]
        for split in ("train", "eval"):
            s = data.get(split)
            if not isinstance(s, dict):
                continue
            skipped = s.get("skipped") or {}
            reasons = ", ".join(f"{k}: {v}" for k, v in skipped.items())
            out.append(f"| {split} | `{_md(s.get('source', '?'))}` | {_num(s.get('total'))} | {_num(s.get('kept'))} | "
                       f"{_num(sum(skipped.values()))}{f' ({_md(reasons)})' if reasons else ''} | "
                       f"{_num(s.get('cut_documents'))} |")
        out.append("")
    else:
        out.append(f"_Data validation statistics missing: {art.missing.get('summary', 'summary.json has no data')}._")
        out.append("")
    if stats is not None:
        f = stats.frame

        def describe(column: str, unit: str) -> str:
            v = f[column].to_numpy(dtype=float)
            v = v[np.isfinite(v)]
            return (f"mean {v.mean():.1f}, median {np.median(v):.0f}, p90 {np.percentile(v, 90):.0f}, max {v.max():.0f}"
                    f" {unit}") if len(v) else "n/a"

        rows = [("Eval documents", f"{len(f)}")]
        for column, label, unit in (("doc_words", "Document length", "words"),
                                    ("doc_tokens", "Document length", "tokens"),
                                    ("prompt_tokens", "Prompt as fed", "tokens"),
                                    ("ref_words", "Reference length", "words"),
                                    ("ref_tokens", "Reference length", "tokens"),
                                    ("pred_words", "Fine-tuned prediction length", "words"),
                                    ("base_words", "Baseline prediction length", "words")):
            if column in f:
                rows.append((f"{label} ({unit})", describe(column, unit)))
        if "doc_words" in f and "ref_words" in f:
            ratio = (f["doc_words"] / f["ref_words"].replace(0, np.nan)).dropna()
            if len(ratio):
                rows.append(("Compression ratio (doc / reference words)", f"median {ratio.median():.1f}x"))
        for what, part, whole in truncation_shares(art, stats):
            rows.append((f"Truncated: {what}", f"{part} of {whole} ({_pct(part, whole)})"))
        out += ["| Eval set | Value |", "|:--|:--|", *[f"| {k} | {_md(v)} |" for k, v in rows], ""]
        out.append(f"Token counts: {stats.token_source}.")
    return out


TRAIN_ROWS = (
    ("Optimizer steps", "train.steps"),
    ("Training time (s)", "train.seconds"),
    ("Ray fit() incl. start-up (s)", "train.fit_seconds"),  # Ray runs only: rows without a value are left out
    ("Training tokens", "train.tokens"),
    ("Throughput (tokens/s)", "train.tokens_per_second"),
    ("Trainable parameters", "train.trainable_params"),
    ("Total parameters", "train.total_params"),
    ("Trainable (%)", "train.trainable_percent"),
    ("Examples used", "train.examples.used"),
    ("Examples truncated", "train.examples.truncated"),
    ("Examples skipped (too long)", "train.examples.skipped_too_long"),
    ("Effective batch", "train.effective_batch"),
    ("Workers", "train.workers"),
    ("First loss", "train.first_loss"),
    ("Final loss", "train.final_loss"),
    ("Peak CPU memory RSS (MB)", "peak_memory_mb.cpu_rss"),
    ("Peak GPU memory (MB)", "peak_memory_mb.gpu"),
    ("Wall time, all stages (s)", "wall_seconds"),
)
"""(label, summary.json key) of the training statistics table: values are printed as summary.json holds them."""


def _section_training(art: RunArtifacts) -> list[str]:
    out = []
    train = art.summary.get("train")
    if "training" in art.missing:
        out.append(f"_Training missing: {art.missing['training']}._")
        out.append("")
    if isinstance(train, dict):
        rows = [(label, _get(art.summary, key)) for label, key in TRAIN_ROWS]
        rows = [(label, v) for label, v in rows if v is not None or label.startswith("Peak GPU")]
        out += ["| Statistic | Value |", "|:--|--:|", *[f"| {label} | {_num(v)} |" for label, v in rows]]
        if art.summary.get("device"):
            out.append(f"| Device | {_md(art.summary['device'])} |")
        out.append("")
    elif art.train_log is not None:
        frame = art.train_log
        out += ["_summary.json has no training statistics; from train_log.parquet:_", "",
                "| Statistic | Value |", "|:--|--:|",
                f"| Optimizer steps | {_num(int(frame['step'].max()))} |",
                f"| Workers | {_num(int(frame['worker'].nunique()))} |",
                f"| First loss | {_num(float(frame['loss'].iloc[0]))} |",
                f"| Final loss | {_num(float(frame['loss'].iloc[-1]))} |", ""]
    elif "training" not in art.missing:
        out += ["_Training statistics missing: summary.json has no `train` section._", ""]
    if art.train_log is not None:
        trend = loss_trend(art.train_log)
        if trend:
            out.append(f"Smoothed loss (EMA): {trend['smooth_first']:.3f} at the start, {trend['smooth_q3']:.3f} at "
                       f"step {trend['step_q3']}, {trend['smooth_final']:.3f} at step {trend['step_final']} "
                       f"({trend['points']} logged points).")
            out.append("")
        if "grad_norm" in art.train_log:
            norms = art.train_log["grad_norm"].to_numpy(dtype=float)
            norms = norms[np.isfinite(norms)]
            if len(norms):
                out += [f"Gradient norm: median {np.median(norms):.3f}, max {norms.max():.3f} (before clipping).", ""]
    return out


def _ci(m: dict[str, Any] | None, name: str) -> tuple[str, str]:
    if m is None or _get(m, f"{name}.mean") is None:
        return "n/a", "n/a"
    mean, low, high = (_x100(_get(m, f"{name}.{k}")) for k in ("mean", "low", "high"))
    interval = f"[{low:.2f}, {high:.2f}]" if low is not None and high is not None else "n/a"
    return f"{mean:.2f}", interval


def _section_metrics(art: RunArtifacts) -> list[str]:
    ft, base = art.metrics, art.baseline_metrics
    if ft is None and base is None:
        return [f"_Metrics missing: {art.missing.get('fine-tuned metrics') or art.missing.get('fine-tuned predictions') or 'no metrics.json'}._"]
    has_base, has_ft = base is not None, ft is not None
    header = ["Metric"]
    if has_ft:
        header += ["Fine-tuned", "95% CI"]
    if has_base:
        header += ["Zero-shot baseline", "95% CI (baseline)"]
    if has_ft and has_base:
        header += ["Delta (fine-tuned - baseline)"]
    marks = on_xsum(art)
    if marks:
        header += ["Original notebook"]
    out = ["ROUGE F1 x100 (95% bootstrap interval):", "",
           "| " + " | ".join(header) + " |", "|:--|" + "--:|" * (len(header) - 1)]
    for name in ROUGE_TYPES:
        cells = [ROUGE_LABELS[name]]
        if has_ft:
            cells += list(_ci(ft, name))
        if has_base:
            cells += list(_ci(base, name))
        if has_ft and has_base:
            a, b = _get(ft, f"{name}.mean"), _get(base, f"{name}.mean")
            cells.append(f"{100 * (a - b):+.2f}" if a is not None and b is not None else "n/a")
        if marks:
            cells.append(f"{NOTEBOOK[name]:.2f}" if name in NOTEBOOK else "n/a")
        out.append("| " + " | ".join(cells) + " |")
    out.append("")
    for label, m in (("fine-tuned", ft), ("baseline", base)):
        if m is not None:
            out.append(f"Scored {label}: {_num(m.get('count'))} documents"
                       + (f" ({_num(m['unscored'])} without a reference, unscored)" if m.get("unscored") else "") + ".")
    rl = _get(ft, "rougeL.mean") if ft else None
    if rl is not None and marks:
        best = max(PUBLISHED[1:], key=lambda p: p[1]["rougeL"])
        out += ["", f"Against the references: ROUGE-L {100 * rl:.2f} vs {NOTEBOOK['rougeL']:.2f} in the original "
                    f"notebook ({100 * rl - NOTEBOOK['rougeL']:+.2f}) and {best[1]['rougeL']:.2f} for "
                    f"{best[0].split(' (')[0]} (published, full XSum)."]
    return out


def _examples_md(art: RunArtifacts) -> list[str]:
    pred = art.predictions
    if pred is None:
        return [f"_Examples missing: {art.missing.get('fine-tuned predictions', 'no predictions')}._"]
    if "rougeL" not in pred.columns or pred["rougeL"].isna().all():
        return ["_Examples missing: the predictions carry no ROUGE-L scores (not evaluated)._"]
    scored = pred.dropna(subset=["rougeL"]).sort_values("rougeL", ascending=False, kind="stable")
    k = min(3, len(scored))
    out = []
    groups = [("Best", scored.head(k))]
    if len(scored) > k:
        groups.append(("Worst", scored.tail(min(k, len(scored) - k)).iloc[::-1]))
    for title, rows in groups:
        out += [f"### {title} {len(rows)} by ROUGE-L", ""]
        for _, row in rows.iterrows():
            out.append(f"**{_md(row['id'])}**, ROUGE-L {100 * row['rougeL']:.2f}")
            out.append("")
            if "document" in row:
                out.append(f"> **Document:** {_md(_shorten(row['document'], 300))}")
                out.append(">")
            if "reference" in row:
                out.append(f"> **Reference:** {_md(_shorten(row['reference'], 300))}")
                out.append(">")
            out.append(f"> **Prediction:** {_md(_shorten(row['prediction'], 300)) or '_(empty)_'}")
            out.append("")
    return out


def next_steps(art: RunArtifacts, stats: EvalStats | None) -> list[str]:
    """Advice from rules on this run's numbers; each item quotes the numbers that triggered it."""
    rules = (_rule_truncation, _rule_loss, _rule_length, _rule_baseline, _rule_skipped, _rule_padding,
             _rule_interval, _rule_empty, _rule_clipping, _rule_missing)
    steps: list[str] = []
    for rule in rules:
        try:
            steps += [s for s in rule(art, stats) if s]
        except Exception as exc:  # noqa: BLE001 - one broken rule must not drop the others
            log.warning("report: next-step rule %s failed: %s", rule.__name__, _reason(exc))
    if not steps:
        steps.append(_rule_default(art, stats))
    return steps


def _cfg(art: RunArtifacts, key: str, default: Any = None) -> Any:
    if art.cfg is not None:
        return _get(art.cfg.to_dict(), key, default)
    return _get(art.config, key, default) if art.config else default


def _suggest_max_length(art: RunArtifacts, stats: EvalStats | None) -> int | None:
    """A prompt.max_length that fits ~90% of documents + reference (from token counts, else words x tokens/word)."""
    if stats is None:
        return None
    f = stats.frame
    if "doc_tokens" in f and "ref_tokens" in f:
        need = np.percentile(f["doc_tokens"], 90) + np.percentile(f["ref_tokens"], 90)
    elif "doc_words" in f and "ref_words" in f:
        ratio = 1.35  # English BPE tokens per word; refined below from prompts that were not truncated
        if "prompt_tokens" in f and "truncated" in f:
            whole = f[~f["truncated"].astype(bool) & (f["doc_words"] > 0)]
            if len(whole) >= 3:
                ratio = float(np.median(whole["prompt_tokens"] / whole["doc_words"]))
        need = (np.percentile(f["doc_words"], 90) + np.percentile(f["ref_words"], 90)) * ratio
    else:
        return None
    return int(min(2048, 64 * math.ceil((need + 16) / 64)))


def _rule_truncation(art, stats) -> list[str]:
    out = []
    current = _cfg(art, "prompt.max_length")
    suggest = _suggest_max_length(art, stats)
    for what, part, whole in truncation_shares(art, stats):
        if whole and part / whole >= TRUNCATED_SHARE:
            target = (f" to about {suggest} (fits ~90% of documents + summaries)" if suggest and current and
                      suggest > current else "")
            out.append(f"**Truncation:** {_pct(part, whole)} of {what} were truncated ({part} of {whole}). The model "
                       f"sees cut articles: raise `prompt.max_length` (now {current}){target}, memory permitting; "
                       f"Phi-2's context is 2048 tokens.")
            break
    skipped = _get(art.summary, "train.examples.skipped_too_long") or 0
    used = _get(art.summary, "train.examples.used") or 0
    if skipped:
        out.append(f"**Too-long examples:** {skipped} training examples were dropped because the summary alone "
                   f"did not fit `prompt.max_length` ({current}) next to the prompt ({_pct(skipped, skipped + used)} "
                   "of the training set): raise it.")
    return out


def _rule_loss(art, stats) -> list[str]:
    if art.train_log is None:
        return []
    trend = loss_trend(art.train_log)
    if trend is None:
        return [f"**Loss trend unknown:** only {art.train_log['step'].nunique()} logged points; lower "
                f"`train.logging_steps` (now {_cfg(art, 'train.logging_steps')}) to see the curve."]
    steps_now = trend["step_final"]
    tail = (trend["smooth_q3"] - trend["smooth_final"]) / max(abs(trend["smooth_q3"]), 1e-9)
    overall = (trend["smooth_first"] - trend["smooth_final"]) / max(abs(trend["smooth_first"]), 1e-9)
    lr = _cfg(art, "train.learning_rate")
    if tail >= LOSS_TAIL_DROP:
        max_steps, epochs = _cfg(art, "train.max_steps") or -1, _cfg(art, "train.epochs")
        budget = (f"`train.max_steps` (now {max_steps}) to about {2 * max_steps}" if max_steps > 0 else
                  f"`train.epochs` (now {epochs}) to about {2 * epochs:g}" if epochs else
                  f"the number of steps (now {steps_now}) to about {2 * steps_now}")
        return [f"**Not converged:** the smoothed loss still fell {100 * tail:.1f}% over the last quarter of training "
                f"({trend['smooth_q3']:.3f} at step {trend['step_q3']} -> {trend['smooth_final']:.3f} at step "
                f"{steps_now}): train longer, e.g. raise {budget}, or add training data (`data.num_train`, now "
                f"{_cfg(art, 'data.num_train', 'all')})."]
    if tail <= -LOSS_TAIL_RISE:
        return [f"**Loss rising at the end:** the smoothed loss rose {100 * -tail:.1f}% over the last quarter "
                f"({trend['smooth_q3']:.3f} -> {trend['smooth_final']:.3f}): lower `train.learning_rate` (now {lr}) "
                "or stop earlier; check the learning-rate schedule."]
    if overall < LOSS_FLAT:
        return [f"**Loss barely moved:** {trend['smooth_first']:.3f} -> {trend['smooth_final']:.3f} "
                f"({100 * overall:+.1f}%) over {steps_now} steps: check `train.learning_rate` (now {lr}; LoRA usually "
                "needs 1e-4 to 3e-4 on Phi-2), that the LoRA targets exist, and the data."]
    return []


def _rule_length(art, stats) -> list[str]:
    if stats is None or "ref_words" not in stats.frame:
        return []
    f = stats.frame
    ref, gen = float(np.median(f["ref_words"])), float(np.median(f["pred_words"]))
    out = []
    beams = _cfg(art, "generation.num_beams")
    lp = _cfg(art, "generation.length_penalty")
    max_new = stats.max_new_tokens
    if ref > 0 and gen / ref >= LENGTH_RATIO_HIGH:
        knob = (f"lower `generation.length_penalty` (now {lp}; below 1 favours shorter beams)" if beams and beams > 1
                else f"use beam search (`generation.num_beams`, now {beams}) with `length_penalty` below 1")
        out.append(f"**Summaries too long:** median {gen:.0f} generated words vs {ref:.0f} in the references "
                   f"({gen / ref:.1f}x): {knob}, or lower `generation.max_new_tokens` (now {max_new}).")
    elif ref > 0 and gen / ref <= LENGTH_RATIO_LOW:
        out.append(f"**Summaries too short:** median {gen:.0f} generated words vs {ref:.0f} in the references "
                   f"({gen / ref:.1f}x): raise `generation.length_penalty` (now {lp}; above 1 favours longer beams)"
                   + (f" or `generation.max_new_tokens` (now {max_new})" if max_new else "") + ".")
    if max_new and "generated_tokens" in f:
        hit = int((f["generated_tokens"] >= max_new).sum())
        if hit / len(f) >= HIT_MAX_NEW_TOKENS:
            out.append(f"**Cut-off summaries:** {hit} of {len(f)} ({_pct(hit, len(f))}) generations stopped at "
                       f"`generation.max_new_tokens`={max_new} instead of ending: raise it if the references are "
                       "that long, otherwise the model has not learned to stop (train longer; check that EOS ends "
                       "the training targets).")
    return out


def _rule_baseline(art, stats) -> list[str]:
    ft, base = art.metrics, art.baseline_metrics
    if not ft or not base or _get(ft, "rougeL.mean") is None or _get(base, "rougeL.mean") is None:
        if ft and not base:
            return ["**No baseline:** this run has no zero-shot score to compare with; rerun with "
                    "`run.baseline=true` to see what fine-tuning adds."]
        return []
    a, b = 100 * _get(ft, "rougeL.mean"), 100 * _get(base, "rougeL.mean")
    low_a, high_b = 100 * (_get(ft, "rougeL.low") or 0), 100 * (_get(base, "rougeL.high") or 0)
    lr = _cfg(art, "train.learning_rate")
    steps = _get(art.summary, "train.steps")
    if a < b:
        return [f"**Fine-tuning hurt:** ROUGE-L {a:.2f} fine-tuned vs {b:.2f} zero-shot ({a - b:+.2f}): check "
                f"`train.learning_rate` (now {lr}) against the loss curve, and the prompt template used in training "
                "vs generation."]
    if a - b < BASELINE_MARGIN or low_a <= high_b:
        overlap = " and the 95% intervals overlap" if low_a <= high_b else ""
        return [f"**Barely above baseline:** ROUGE-L {a:.2f} fine-tuned vs {b:.2f} zero-shot ({a - b:+.2f}"
                f"{overlap}): check `train.learning_rate` (now {lr}) and whether {steps if steps else 'the'} "
                "training steps were enough (see the loss trend)."]
    return []


def _rule_skipped(art, stats) -> list[str]:
    out = []
    data = art.summary.get("data") if isinstance(art.summary.get("data"), dict) else {}
    for split, s in data.items():
        if not isinstance(s, dict) or not s.get("total"):
            continue
        skipped = sum((s.get("skipped") or {}).values())
        if skipped / s["total"] >= SKIPPED_SHARE:
            reasons = ", ".join(f"{k} ({v})" for k, v in sorted((s.get("skipped") or {}).items(), key=lambda kv: -kv[1]))
            out.append(f"**Skipped records:** {skipped} of {s['total']} {split} records ({_pct(skipped, s['total'])}) "
                       f"were dropped by validation: {reasons}. Check `data.source` and the `data.columns` mapping.")
        if s.get("cut_documents") and s["cut_documents"] / s["total"] >= SKIPPED_SHARE:
            out.append(f"**Very long documents:** {s['cut_documents']} {split} documents were cut at "
                       f"`data.max_document_chars` (now {_cfg(art, 'data.max_document_chars')}): check the source "
                       "for concatenated or malformed articles.")
    return out


def _rule_padding(art, stats) -> list[str]:
    out = []
    for key, what in (("summarize", "fine-tuned"), ("summarize_baseline", "baseline")):
        s = art.summary.get(key)
        if isinstance(s, dict) and (s.get("padding_fraction") or 0) >= PADDING_FRACTION:
            out.append(f"**Padding waste:** {100 * s['padding_fraction']:.0f}% of the prompt tokens in the {what} "
                       f"generation batches were padding (batch {s.get('batch_size')}, already longest-first): lower "
                       f"`generation.batch_size` (now {_cfg(art, 'generation.batch_size')}) or cap prompts with "
                       "`generation.max_prompt_tokens`.")
            break
    return out


def _rule_interval(art, stats) -> list[str]:
    m = art.metrics
    if not m or _get(m, "rougeL.high") is None or _get(m, "rougeL.low") is None:
        return []
    width = 100 * (m["rougeL"]["high"] - m["rougeL"]["low"])
    if width >= CI_WIDTH:
        return [f"**Noisy estimate:** the ROUGE-L 95% interval is {width:.1f} points wide over {m.get('count')} "
                f"documents: raise `data.num_eval` (now {_cfg(art, 'data.num_eval', m.get('count'))}) before "
                "comparing runs."]
    return []


def _rule_empty(art, stats) -> list[str]:
    if art.predictions is None or not len(art.predictions):
        return []
    empty = int((art.predictions["prediction"].str.strip() == "").sum())
    if empty / len(art.predictions) >= EMPTY_SHARE:
        return [f"**Empty summaries:** {empty} of {len(art.predictions)} predictions are empty (the model emitted "
                "EOS at once): check the prompt template matches training and the EOS/pad handling."]
    return []


def _rule_clipping(art, stats) -> list[str]:
    if art.train_log is None or "grad_norm" not in art.train_log:
        return []
    norms = art.train_log["grad_norm"].to_numpy(dtype=float)
    norms = norms[np.isfinite(norms)]
    clip = _cfg(art, "train.max_grad_norm")
    if len(norms) and clip and np.median(norms) >= CLIP_FACTOR * clip:
        return [f"**Clipped updates:** the median gradient norm {np.median(norms):.2f} is {np.median(norms) / clip:.1f}x "
                f"`train.max_grad_norm`={clip}, so almost every step is clipped: the learning rate "
                f"({_cfg(art, 'train.learning_rate')}) is effectively capped; raise max_grad_norm or lower the rate."]
    return []


def _rule_missing(art, stats) -> list[str]:
    out = []
    if "training" in art.missing and art.predictions is not None:
        out.append("**No training in this run:** these are predictions only; train "
                   "(`phi2sum train`) and summarize with the adapter to compare against them.")
    if art.predictions is None and art.train_log is not None:
        out.append("**Not evaluated:** the run trained but has no predictions; run `phi2sum summarize` with "
                   f"`model.adapter={storage.join(art.uri, 'adapter')}` to get ROUGE.")
    elif art.predictions is not None and art.metrics is None:
        out.append("**Not scored:** predictions exist without metrics; run `phi2sum evaluate --predictions "
                   f"{storage.join(art.uri, 'predictions.parquet')}`.")
    return out


def _rule_default(art, stats) -> str:
    n = _get(art.summary, "data.train.kept") or _cfg(art, "data.num_train")
    rl = _get(art.metrics, "rougeL.mean") if art.metrics else None
    score = f" (ROUGE-L now {100 * rl:.2f})" if rl is not None else ""
    return (f"**No rule fired**{score}: the run is converged, unclipped and untruncated by these checks. The largest "
            f"remaining lever is data: this run trained on {n if n is not None else 'an unknown number of'} examples "
            "(`data.num_train`); then a larger LoRA rank (`lora.r`, now "
            f"{_cfg(art, 'lora.r')}).")


def render_markdown(art: RunArtifacts, stats: EvalStats | None, produced: dict[str, str | None],
                    tokenizer_note: str) -> str:
    """report.md; ``produced`` maps each output file to None (written) or why it is missing."""
    lines = [f"# Run report: {art.name}", ""]
    meta = [f"Run folder: `{art.uri}`"]
    for key, label in (("config_fingerprint", "config fingerprint"), ("finished_at", "finished"),
                       ("device", "device")):
        if art.summary.get(key):
            meta.append(f"{label} `{art.summary[key]}`" if key == "config_fingerprint" else f"{label} {art.summary[key]}")
    meta.append(f"report written {datetime.now(timezone.utc).isoformat(timespec='seconds')}")
    lines += ["; ".join(meta) + ".", ""]

    def section(title: str, build: Callable[[], list[str]]) -> None:
        lines.extend([f"## {title}", ""])
        try:
            lines.extend(build())
        except Exception as exc:  # noqa: BLE001 - the rest of the report still gets written
            log.warning("report: section %s failed: %s", title, _reason(exc))
            lines.append(f"_This section could not be produced: {_reason(exc)}._")
        lines.append("")

    def headline() -> list[str]:
        items = []
        if art.metrics and _get(art.metrics, "rougeL.mean") is not None:
            text = f"ROUGE-L **{100 * art.metrics['rougeL']['mean']:.2f}** fine-tuned"
            if art.baseline_metrics and _get(art.baseline_metrics, "rougeL.mean") is not None:
                b = 100 * art.baseline_metrics["rougeL"]["mean"]
                text += f" vs {b:.2f} zero-shot ({100 * art.metrics['rougeL']['mean'] - b:+.2f})"
            if on_xsum(art):
                text += f"; original notebook {NOTEBOOK['rougeL']:.2f}"
            items.append(text)
        trend = loss_trend(art.train_log) if art.train_log is not None else None
        if _get(art.summary, "train.steps") is not None:
            items.append(f"{_get(art.summary, 'train.steps')} training steps in {_num(_get(art.summary, 'train.seconds'))} s, "
                         f"loss {_num(_get(art.summary, 'train.first_loss'))} -> {_num(_get(art.summary, 'train.final_loss'))}")
        elif trend:
            items.append(f"loss {trend['first']:.3f} -> {trend['final']:.3f} over {trend['step_final']} steps")
        items.append(f"{len(steps)} next step(s) below, first: {steps[0].split(':**')[0].strip('*')}")
        return [f"- {i}" for i in items]

    steps = next_steps(art, stats)
    section("At a glance", headline)
    gaps = dict(art.missing)  # missing inputs; outputs that failed despite their input being there:
    gaps.update({f"`{name}`": why for name, why in produced.items() if why and not why.startswith("missing input")})
    if gaps or art.notes or tokenizer_note:
        def missing() -> list[str]:
            out = [f"- **Missing: {label}**: {why}" for label, why in gaps.items()]
            out += [f"- Note: {note}" for note in art.notes]
            if tokenizer_note:
                out.append(f"- Note: token counts use `prompt_tokens` only; {tokenizer_note}")
            return out
        section("Missing or incomplete", missing)
    section("Configuration", lambda: _section_config(art))
    section("Data", lambda: _section_data(art, stats))

    def training() -> list[str]:
        out = _section_training(art)
        out.append(_image("training_loss.png", "Training loss per step", produced))
        return out
    section("Training", training)

    def metrics() -> list[str]:
        out = _section_metrics(art)
        out += ["", _image("rouge_scores.png", "ROUGE scores", produced)]
        return out
    section("ROUGE", metrics)
    section("Dataset analysis", lambda: [_image("dataset_analysis.png", "Dataset analysis", produced)])
    section("Best and worst examples", lambda: _examples_md(art))
    section("Next steps", lambda: [f"{i}. {s}" for i, s in enumerate(steps, 1)])

    def files() -> list[str]:
        return [f"- [`{name}`]({name})" + (f": not produced ({why})" if why else "") for name, why in produced.items()]
    section("Files", files)
    return "\n".join(lines).rstrip() + "\n"


def _image(name: str, alt: str, produced: dict[str, str | None]) -> str:
    why = produced.get(name)
    return f"![{alt}]({name})" if why is None and name in produced else f"_`{name}` not produced: {why}._"


# --------------------------------------------------------------------------------------------- entry point


def write_report(run_uri: str) -> str:
    """Write ``<run>/report/`` for the run folder ``run_uri`` (local or ``s3://``); returns the report folder URI.

    Raises :class:`~phi2sum.errors.Phi2SumError` only when the run cannot be read at all (no such folder, no
    access) or the report cannot be uploaded; missing or corrupt artifacts and failed plots go into the report.
    """
    art = load_run(run_uri)
    report_uri = storage.join(art.uri, REPORT_DIR)
    tokenizer, tokenizer_note = (None, "")
    if art.predictions is not None:
        tokenizer, tokenizer_note = load_tokenizer_cheaply(art)
    try:
        stats = eval_stats(art, tokenizer)
    except Exception as exc:  # noqa: BLE001
        log.warning("report: eval statistics failed: %s", _reason(exc))
        art.notes.append(f"eval statistics could not be computed ({_reason(exc)})")
        stats = None

    produced: dict[str, str | None] = {}
    with tempfile.TemporaryDirectory(prefix="phi2sum-report-") as work:
        tmp = os.path.join(work, REPORT_DIR)
        os.mkdir(tmp)  # mode from the umask (mkdtemp's 0700 would be copied into a local run folder)
        for name, make in (("training_loss.png", lambda p: plot_training_loss(art, p)),
                           ("rouge_scores.png", lambda p: plot_rouge(art, p)),
                           ("dataset_analysis.png", lambda p: plot_dataset(art, stats, p)),
                           ("sample_predictions.txt", lambda p: write_samples(art, p)),
                           ("all_predictions.csv", lambda p: write_predictions_csv(art, p))):
            path = os.path.join(tmp, name)
            try:
                make(path)
                produced[name] = None
            except _Missing as exc:
                produced[name] = f"missing input: {exc}"
            except Exception as exc:  # noqa: BLE001 - a failed plot never fails the report
                log.warning("report: %s failed: %s", name, _reason(exc))
                produced[name] = f"failed: {_reason(exc)}"
            if produced[name] is not None and os.path.exists(path):
                os.remove(path)  # never upload half a file
        markdown = render_markdown(art, stats, produced, tokenizer_note)
        with open(os.path.join(tmp, "report.md"), "w", encoding="utf-8") as handle:
            handle.write(markdown)
        storage.upload_dir(tmp, report_uri)
    log.info("report for run %s written to %s", art.name, report_uri)
    return report_uri

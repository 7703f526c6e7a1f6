"""Paired comparison of two sets of predictions of the same documents: is B's ROUGE really above A's?

Two runs scored on the same eval ids are not two independent samples: a hard document is hard for both. The
per-run 95% intervals of metrics.json ignore that pairing and overlap long after the difference is clear, so the
difference B − A is bootstrapped on the paired ids instead: each resample draws the shared ids with replacement
and takes the *same* draw for A and B (which is resampling the per-id differences), and every ROUGE type uses the
same draws (the same seed).

* Interval: the 2.5th and 97.5th percentiles of the resampled mean differences δ*.
* p-value (two-sided): ``2 · min(P(δ* ≤ 0), P(δ* ≥ 0))``, clipped to 1, over the resamples. Identical inputs give
  δ* = 0 throughout, so p = 1; a p of 0 means "below 1 / samples" (no resample crossed zero), which is how the
  markdown prints it.

A location is a run folder (its predictions.parquet), a predictions.parquet, or a summarize job's output
(``shard-<i>-of-<n>/`` folders), local or ``s3://``. Per-example scores come from the predictions' own
rouge1/rouge2/rougeL/rougeLsum columns when they have them (``phi2sum evaluate`` writes them), else they are scored
here from the ``reference`` column. All numbers are fractions in [0, 1], as in metrics.json; the markdown shows
them x100.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from phi2sum import storage
from phi2sum.data import check_unique_ids
from phi2sum.errors import ConfigError, DataError
from phi2sum.eval.metrics import ROUGE_LABELS, ROUGE_TYPES, score_examples
from phi2sum.outputs import is_sharded_output, read_predictions

DEFAULT_SAMPLES = 10_000
CONFIDENCE = 0.95
OUTPUT_FILES = ("comparison.md", "comparison.json", "comparison.png")
P_VALUE_DEFINITION = ("two-sided paired-bootstrap p-value: 2 * min(P(d* <= 0), P(d* >= 0)) over the resampled mean "
                      "differences d* (B - A), clipped to 1; 0 means below 1/samples")
_CHUNK_ELEMENTS = 1 << 22  # resampled indices held at once (32 MB): any number of ids fits in memory


# --------------------------------------------------------------------------------------------- per-example scores


@dataclass(frozen=True)
class ExampleScores:
    """Per-example ROUGE of one set of predictions: what a paired comparison pairs, by id."""

    location: str
    name: str
    frame: pd.DataFrame  # index: id (str); columns: ROUGE_TYPES, every value finite
    unscored: int = 0  # rows without scores (no reference): left out of the comparison
    scored_here: bool = False  # the predictions had no ROUGE columns: scored from their references


def load_scores(location: str, name: str | None = None) -> ExampleScores:
    """The per-example scores of a run folder, a predictions.parquet or a summarize job's output."""
    table, uri = _read_predictions_table(location)
    wanted = [c for c in ("id", "prediction", "reference", *ROUGE_TYPES) if c in table.column_names]
    return scores_from_frame(table.select(wanted).to_pandas(), uri, name or location_name(location))


def _read_predictions_table(location: str) -> tuple[pa.Table, str]:
    location = location.rstrip("/") or location
    if is_sharded_output(location):
        return read_predictions(location), location  # refuses missing or incomplete shards and duplicate ids
    uri = location if location.endswith(".parquet") else storage.join(location, "predictions.parquet")
    if not storage.exists(uri):
        raise DataError(f"no predictions at {location}: pass a predictions.parquet, a run folder holding one, or "
                        "a summarize job's output (its shard-<i>-of-<n> folders)")
    try:
        return storage.read_parquet(uri), uri
    except pa.ArrowException:  # there, but not Parquet (the storage layer maps I/O errors itself)
        raise DataError(f"{uri} is not a readable Parquet file; pass a phi2sum predictions.parquet") from None


def scores_from_frame(frame: pd.DataFrame, location: str, name: str) -> ExampleScores:
    """Scores from a predictions frame: its ROUGE columns when it has all four, else scored from `reference`."""
    if "id" not in frame.columns:
        raise DataError(f"{location} has no 'id' column: a paired comparison matches the predictions by id")
    ids = frame["id"].astype(str)
    check_unique_ids(ids, location, fix="a paired comparison needs one prediction per id")
    scored_here = not all(c in frame.columns for c in ROUGE_TYPES)
    scores = _score_references(frame, location) if scored_here else frame[list(ROUGE_TYPES)].astype(float)
    scores.index = pd.Index(ids.to_numpy(), name="id")
    finite = np.isfinite(scores.to_numpy(dtype=float)).all(axis=1)
    return ExampleScores(location, name, scores[finite], int((~finite).sum()), scored_here)


def _score_references(frame: pd.DataFrame, location: str) -> pd.DataFrame:
    """Per-example ROUGE of the rows that have a reference (NaN for the others: unscored)."""
    if "reference" not in frame.columns or "prediction" not in frame.columns:
        raise DataError(f"{location} has no per-example ROUGE columns ({', '.join(ROUGE_TYPES)}) and no 'reference' "
                        f"column to score against; run `phi2sum evaluate predictions={location} data.source=...` "
                        "first (it joins the references by id)")
    references = frame["reference"].fillna("").astype(str)
    has_reference = (references.str.strip() != "").to_numpy()
    predictions = frame["prediction"].fillna("").astype(str)
    rows = score_examples(list(predictions[has_reference]), list(references[has_reference]))
    scores = pd.DataFrame(np.nan, index=range(len(frame)), columns=list(ROUGE_TYPES))
    if rows:
        scores.loc[np.flatnonzero(has_reference), list(ROUGE_TYPES)] = [[r[c] for c in ROUGE_TYPES] for r in rows]
    return scores


def location_name(location: str) -> str:
    """A short name for a location: its folder's name (a predictions.parquet: the folder holding it)."""
    parts = [p for p in location.rstrip("/").split("/") if p and p != "s3:"]
    if parts and parts[-1] == "predictions.parquet" and len(parts) > 1:
        parts = parts[:-1]
    name = parts[-1] if parts else "predictions"
    name = name.removesuffix(".parquet") if name != "predictions.parquet" else "predictions"
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.") or "predictions"


# --------------------------------------------------------------------------------------------- the bootstrap


@dataclass(frozen=True)
class Bootstrap:
    """The mean paired difference (B − A), its percentile interval and two-sided p-value."""

    delta: float
    low: float
    high: float
    p_value: float


def paired_bootstrap(a, b, n_samples: int = DEFAULT_SAMPLES, seed: int = 0,
                     confidence: float = CONFIDENCE) -> Bootstrap:
    """Paired bootstrap of mean(b) − mean(a) for per-example scores of the same ids in the same order.

    Drawing the same ids for A and B is resampling the differences b − a, which is what this does: seeded, so
    the same inputs always give the same numbers, and the same seed draws the same ids for every metric."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.ndim != 1 or a.shape != b.shape or not a.size:
        raise ValueError(f"need two non-empty 1-d arrays of the same length, got shapes {a.shape} and {b.shape}")
    if n_samples < 1:
        raise ValueError(f"n_samples must be at least 1, got {n_samples}")
    differences = b - a
    deltas = resampled_means(differences, n_samples, seed)
    tail = (1 - confidence) / 2
    low, high = np.quantile(deltas, [tail, 1 - tail])
    p_value = min(1.0, 2 * min(float(np.mean(deltas <= 0)), float(np.mean(deltas >= 0))))
    return Bootstrap(float(differences.mean()), float(low), float(high), p_value)


def resampled_means(values: np.ndarray, n_samples: int, seed: int) -> np.ndarray:
    """The means of `n_samples` resamples of `values` with replacement, a chunk of resamples at a time (one
    matrix of 10,000 x n indices would not fit in memory for a large eval set)."""
    rng = np.random.default_rng(seed)
    n = values.size
    per_chunk = max(1, _CHUNK_ELEMENTS // n)
    means = np.empty(n_samples)
    for start in range(0, n_samples, per_chunk):
        stop = min(n_samples, start + per_chunk)
        means[start:stop] = values[rng.integers(0, n, size=(stop - start, n))].mean(axis=1)
    return means


# --------------------------------------------------------------------------------------------- the comparison


@dataclass(frozen=True)
class MetricComparison:
    metric: str
    mean_a: float  # on the shared ids
    mean_b: float
    delta: float  # mean_b - mean_a
    low: float
    high: float
    p_value: float


@dataclass(frozen=True)
class Side:
    """One side of a comparison as the outputs name it."""

    location: str
    name: str
    ids: int  # scored ids
    unscored: int
    scored_here: bool


@dataclass(frozen=True)
class Comparison:
    a: Side
    b: Side
    shared: int
    intersect: bool
    n_samples: int
    seed: int
    confidence: float
    metrics: tuple[MetricComparison, ...]

    @property
    def ids_differ(self) -> bool:
        return not self.shared == self.a.ids == self.b.ids

    def to_dict(self) -> dict[str, Any]:
        """Every number, for comparison.json (fractions in [0, 1], as in metrics.json)."""
        return {"a": asdict(self.a), "b": asdict(self.b), "shared_ids": self.shared,
                "only_a": self.a.ids - self.shared, "only_b": self.b.ids - self.shared, "intersect": self.intersect,
                "bootstrap": {"samples": self.n_samples, "seed": self.seed, "confidence": self.confidence,
                              "paired": True, "p_value": P_VALUE_DEFINITION},
                "metrics": {m.metric: {k: v for k, v in asdict(m).items() if k != "metric"} for m in self.metrics}}


def compare(a: ExampleScores, b: ExampleScores, intersect: bool = False, n_samples: int = DEFAULT_SAMPLES,
            seed: int = 0, confidence: float = CONFIDENCE) -> Comparison:
    """B − A per ROUGE type on the ids both have, with a paired bootstrap interval and p-value.

    Refuses (a DataError) when the scored id sets differ, unless `intersect`: a difference measured on other
    documents than the ones the user thinks of is worse than none."""
    if n_samples < 1:
        raise ConfigError(f"--samples must be at least 1, got {n_samples}")
    ids = paired_ids(a, b, intersect)
    left, right = a.frame.loc[ids], b.frame.loc[ids]
    metrics = []
    for name in ROUGE_TYPES:
        boot = paired_bootstrap(left[name].to_numpy(), right[name].to_numpy(), n_samples, seed, confidence)
        metrics.append(MetricComparison(name, float(left[name].mean()), float(right[name].mean()), boot.delta,
                                        boot.low, boot.high, boot.p_value))
    return Comparison(_side(a), _side(b), len(ids), intersect, n_samples, seed, confidence, tuple(metrics))


def _side(scores: ExampleScores) -> Side:
    return Side(scores.location, scores.name, len(scores.frame), scores.unscored, scores.scored_here)


def paired_ids(a: ExampleScores, b: ExampleScores, intersect: bool) -> pd.Index:
    """The scored ids of both, sorted (so the resamples do not depend on the files' row order)."""
    shared = a.frame.index.intersection(b.frame.index).sort_values()
    if not len(a.frame) or not len(b.frame):
        empty = a if not len(a.frame) else b
        raise DataError(f"{empty.location} has no scored predictions ({empty.unscored} without a reference); "
                        "score it with `phi2sum evaluate` first")
    if not intersect and not len(shared) == len(a.frame) == len(b.frame):
        raise DataError(f"A has {len(a.frame)} ids and B {len(b.frame)}, {len(shared)} shared; pass --intersect to "
                        "compare on the shared ids")
    if not len(shared):
        raise DataError(f"A ({a.location}) and B ({b.location}) share no ids: they are predictions of different "
                        "documents, so there is nothing to pair")
    return shared


# --------------------------------------------------------------------------------------------- rendering


def format_p(p_value: float, n_samples: int) -> str:
    """A p of 0 is only below the bootstrap's resolution: printed as such."""
    return f"< {1 / n_samples:.2g}" if p_value == 0 else f"{p_value:.4f}" if p_value < 0.01 else f"{p_value:.3f}"


def markdown_table(result: Comparison) -> list[str]:
    """The table: means on the shared ids, B − A, its paired interval and p-value, ROUGE F1 x100."""
    pct = f"{100 * result.confidence:g}%"
    lines = [f"| Metric | A: {_cell(result.a.name)} | B: {_cell(result.b.name)} | B - A | {pct} CI (paired) | p |",
             "|:--|--:|--:|--:|--:|--:|"]
    for m in result.metrics:
        lines.append(f"| {ROUGE_LABELS[m.metric]} | {100 * m.mean_a:.2f} | {100 * m.mean_b:.2f} | "
                     f"{100 * m.delta:+.2f} | [{100 * m.low:+.2f}, {100 * m.high:+.2f}] | "
                     f"{format_p(m.p_value, result.n_samples)} |")
    return lines


def describe(result: Comparison) -> str:
    """One line: what was compared, on how many ids, and how."""
    ids = f"{result.shared:,} shared ids"
    if result.ids_differ:
        ids += f" (A has {result.a.ids:,}, B {result.b.ids:,}; --intersect)"
    unscored = [f"{s.unscored} of {label} unscored (no reference)" for label, s in (("A", result.a), ("B", result.b))
                if s.unscored]
    return (f"B `{result.b.location}` vs A `{result.a.location}` on {ids}; ROUGE F1 x100; paired bootstrap, "
            f"{result.n_samples:,} resamples, seed {result.seed}" + (f"; {', '.join(unscored)}" if unscored else "")
            + ".")


def render_markdown(result: Comparison) -> str:
    """comparison.md (and what `phi2sum compare` prints)."""
    scored = [f"{s.name} was scored from its references here (no per-example ROUGE columns)"
              for s in (result.a, result.b) if s.scored_here]
    lines = [f"# Comparison: {result.b.name} vs {result.a.name}", "", describe(result), "", *markdown_table(result),
             "", f"p: {P_VALUE_DEFINITION}."]
    return "\n".join(lines + [f"Note: {s}." for s in scored]) + "\n"


def _cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def plot_comparison(result: Comparison, path: str) -> None:
    """B − A per ROUGE type with its paired interval, and the zero line the interval must clear."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 4.8), layout="constrained")  # no pyplot: no global state, always the Agg canvas
    ax = fig.add_subplot()
    x = np.arange(len(result.metrics))
    delta = np.array([100 * m.delta for m in result.metrics])
    err = np.array([[100 * (m.delta - m.low) for m in result.metrics],
                    [100 * (m.high - m.delta) for m in result.metrics]])
    colors = ["tab:green" if m.low > 0 else "tab:red" if m.high < 0 else "tab:gray" for m in result.metrics]
    ax.axhline(0, color="black", lw=1.2)
    ax.bar(x, delta, 0.55, color=colors, alpha=0.8)
    ax.errorbar(x, delta, yerr=np.clip(err, 0, None), fmt="none", ecolor="black", capsize=6, lw=1.5)
    for xi, m in zip(x, result.metrics):
        ax.annotate(f"{100 * m.delta:+.2f}\np {format_p(m.p_value, result.n_samples)}", (xi, 100 * max(m.high, 0)),
                    textcoords="offset points", xytext=(0, 6), ha="center", va="bottom", fontsize=9)
    ax.set_xticks(x, [ROUGE_LABELS[m.metric] for m in result.metrics])
    ax.set_ylabel(f"B - A, ROUGE F1 x100 ({100 * result.confidence:g}% paired interval)")
    top = max(0.0, *(100 * m.high for m in result.metrics))
    bottom = min(0.0, *(100 * m.low for m in result.metrics))
    ax.set_ylim(bottom - 0.1 * (top - bottom) - 0.5, top + 0.25 * (top - bottom) + 0.5)
    ax.grid(axis="y", alpha=0.3)
    ax.set_title(f"{result.b.name} (B) vs {result.a.name} (A) on {result.shared:,} shared ids\n"
                 "green: interval above 0, red: below 0, gray: includes 0")
    fig.savefig(path, dpi=120)


# --------------------------------------------------------------------------------------------- writing


def default_out_dir(a_location: str, b_location: str) -> str:
    """``<B>/compare-vs-<name of A>`` for a folder B; beside the file for a predictions.parquet B."""
    b = b_location.rstrip("/") or b_location
    folder = (b.rsplit("/", 1)[0] if "/" in b else ".") if b.endswith(".parquet") else b
    return storage.join(folder, f"compare-vs-{location_name(a_location)}")


def write_comparison(result: Comparison, out_dir: str) -> str:
    """comparison.md, .json and .png into `out_dir` (local or s3://), rendered in a temp folder first and then
    uploaded, so a failure leaves nothing half-written; returns `out_dir`."""
    _check_out_dir(out_dir)
    with tempfile.TemporaryDirectory(prefix="phi2sum-compare-") as work:
        folder = os.path.join(work, "comparison")
        os.mkdir(folder)  # mode from the umask (mkdtemp's 0700 would be copied into a local folder)
        with open(os.path.join(folder, "comparison.md"), "w", encoding="utf-8") as handle:
            handle.write(render_markdown(result))
        with open(os.path.join(folder, "comparison.json"), "w", encoding="utf-8") as handle:
            json.dump(result.to_dict(), handle, indent=2, sort_keys=True)
        plot_comparison(result, os.path.join(folder, "comparison.png"))
        storage.upload_dir(folder, out_dir)
    return out_dir


def _check_out_dir(out_dir: str) -> None:
    """The upload replaces the folder as a whole: refuse one that holds anything but an earlier comparison."""
    relative = storage.list_relative(out_dir)
    if not relative and storage.list_files(out_dir):
        raise DataError(f"--out {out_dir} is a file; pass a folder for comparison.md, .json and .png")
    others = [r for r in relative if r not in OUTPUT_FILES]
    if others:
        raise DataError(f"--out {out_dir} already holds other files (e.g. {others[0]}); the comparison replaces "
                        "its folder as a whole, so pass a new folder (or one holding only an earlier comparison)")

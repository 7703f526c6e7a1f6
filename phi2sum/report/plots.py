"""The report's figures, each written to a PNG path; matplotlib is imported inside the functions, so that
importing the report (e.g. for ``phi2sum --help``) does not pay for it."""

from __future__ import annotations

import textwrap

import numpy as np

from phi2sum.eval.metrics import ROUGE_TYPES
from phi2sum.report.advice import TRUNCATED_SHARE
from phi2sum.report.formatting import x100
from phi2sum.report.load import MissingInput, RunArtifacts, lookup
from phi2sum.report.published import PUBLISHED, ROUGE_LABELS, on_xsum
from phi2sum.report.stats import EvalStats, best_eval, ema, truncation_shares

DPI = 120


def _figure(**kwargs):
    from matplotlib.figure import Figure

    return Figure(layout="constrained", **kwargs)  # no pyplot: no global state, always the Agg canvas


# --------------------------------------------------------------------------------------------- training loss


def plot_training_loss(art: RunArtifacts, path: str) -> None:
    from matplotlib.ticker import MaxNLocator

    frame = art.train_log
    if frame is None:
        raise MissingInput(art.missing.get("training", "no training log"))
    fig = _figure(figsize=(9, 5.2))
    ax = fig.add_subplot()
    workers = sorted(frame["worker"].unique())
    handles = []
    for i, worker in enumerate(workers):
        part = frame[frame["worker"] == worker]
        steps, loss = part["step"].to_numpy(), part["loss"].to_numpy(dtype=float)
        smooth, span = ema(loss)
        tag = f"worker {worker}: " if len(workers) > 1 else ""
        color = f"C{i % 10}"
        handles += ax.plot(steps, loss, color=color, alpha=0.45, lw=1, marker="o", ms=3.5, label=f"{tag}loss (raw)")
        handles += ax.plot(steps, smooth, color=color, lw=2.4, label=f"{tag}loss (EMA, span {span})")
    handles += _validation_loss(ax, art.eval_log)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (cross-entropy, nats/token)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    reference = frame[frame["worker"] == workers[0]]  # the learning rate and the title follow the first worker
    if "learning_rate" in frame.columns:
        ax2 = ax.twinx()
        handles += ax2.plot(reference["step"], reference["learning_rate"], color="tab:gray", ls="--", lw=1.5,
                            label="learning rate (right axis)")
        ax2.set_ylabel("learning rate")
        ax2.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
        ax2.set_ylim(bottom=0)
    first, final = reference["loss"].iloc[[0, -1]]
    who = f", {len(workers)} workers" if len(workers) > 1 else ""
    best = best_eval(art.eval_log)
    best_text = "" if best is None else f"; best validation loss {best['eval_loss']:.3f} at step {int(best['step'])}"
    ax.set_title(f"Training loss per step: run {art.name}\n{int(frame['step'].max())} steps{who}; "
                 f"loss {first:.3f} (first) -> {final:.3f} (final){best_text}")
    fig.legend(handles=handles, loc="outside lower center", ncols=min(3, len(handles)), fontsize=9, frameon=False)
    fig.savefig(path, dpi=DPI)


def _validation_loss(ax, eval_log) -> list:
    """The validation loss beside the training loss (black, open diamonds: no worker's colour) and a star on its
    best step; returns the legend handles (none without validation rows)."""
    if eval_log is None:
        return []
    handles = ax.plot(eval_log["step"], eval_log["eval_loss"].astype(float), color="black", lw=1.8, marker="D",
                      ms=6, mfc="white", mew=1.5, zorder=4, label="validation loss")
    best = best_eval(eval_log)
    handles.append(ax.scatter([best["step"]], [best["eval_loss"]], marker="*", s=260, color="gold",
                              edgecolors="black", zorder=5,
                              label=f"best validation loss {best['eval_loss']:.3f} (step {int(best['step'])})"))
    return handles


def plot_rouge_by_step(art: RunArtifacts, path: str) -> None:
    """ROUGE-1/2/L x100 of the validation summaries at each checkpoint, against the optimizer step."""
    from matplotlib.ticker import MaxNLocator

    frame = art.rouge_log
    if frame is None:
        raise MissingInput(art.missing.get("training") or "train_log.parquet has no ROUGE rows (kind 'rouge'): "
                                                          "set train.rouge_steps to score checkpoints")
    fig = _figure(figsize=(9, 5.2))
    ax = fig.add_subplot()
    steps = frame["step"].to_numpy()
    for name, color in (("rouge1", "tab:blue"), ("rouge2", "tab:orange"), ("rougeL", "tab:green")):
        values = 100 * frame[name].to_numpy(dtype=float)
        ax.plot(steps, values, color=color, lw=2, marker="o", ms=5, label=ROUGE_LABELS[name])
        ax.annotate(f"{values[-1]:.2f}", (steps[-1], values[-1]), textcoords="offset points", xytext=(6, 0),
                    va="center", fontsize=9, color=color)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("ROUGE F1 (x100)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    documents = frame["rouge_documents"].dropna() if "rouge_documents" in frame.columns else None
    count = f" on {int(documents.iloc[-1])} validation documents" if documents is not None and len(documents) else ""
    ax.set_title(f"ROUGE at each checkpoint{count}: run {art.name}")
    ax.legend(loc="lower right", fontsize=9)
    fig.savefig(path, dpi=DPI)


# --------------------------------------------------------------------------------------------- ROUGE


def plot_rouge(art: RunArtifacts, path: str) -> None:
    series = [(label, m, color) for label, m, color in (
        ("Zero-shot baseline", art.baseline_metrics, "tab:orange"),
        ("Fine-tuned (LoRA)", art.metrics, "tab:blue")) if m is not None and lookup(m, "rougeL.mean") is not None]
    if not series:
        raise MissingInput(art.missing.get("fine-tuned metrics") or "no scored predictions (metrics.json)")
    fig = _figure(figsize=(9.5, 5.6))
    ax = fig.add_subplot()
    x = np.arange(len(ROUGE_TYPES))
    handles, top = _rouge_bars(ax, x, series)
    if on_xsum(art):
        marks, marks_top = _published_marks(ax)
        handles += marks
        top = max(top, marks_top)
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


def _rouge_bars(ax, x: np.ndarray, series: list[tuple[str, dict, str]]) -> tuple[list, float]:
    """One group of bars per ROUGE type, one bar per scored model, labelled with its mean; returns the legend
    handles and the highest interval end (for the y limit)."""
    width = 0.8 / len(series)
    handles, top = [], 0.0
    for k, (label, metrics, color) in enumerate(series):
        offset = (k - (len(series) - 1) / 2) * width
        means = np.array([x100(lookup(metrics, f"{r}.mean")) or 0.0 for r in ROUGE_TYPES])
        lows = np.array([x100(lookup(metrics, f"{r}.low", lookup(metrics, f"{r}.mean"))) or 0.0 for r in ROUGE_TYPES])
        highs = np.array([x100(lookup(metrics, f"{r}.high", lookup(metrics, f"{r}.mean"))) or 0.0
                          for r in ROUGE_TYPES])
        err = np.vstack([np.clip(means - lows, 0, None), np.clip(highs - means, 0, None)])
        handles.append(ax.bar(x + offset, means, width * 0.92, yerr=err, capsize=4, color=color, alpha=0.85,
                              error_kw={"elinewidth": 1.2, "ecolor": "black"},
                              label=f"{label} (n={metrics.get('count', '?')}, 95% CI)"))
        for xi, hi, mean in zip(x + offset, highs, means):
            ax.text(xi, hi + 0.6, f"{mean:.2f}", ha="center", va="bottom", fontsize=8, zorder=5,
                    bbox={"boxstyle": "round,pad=0.15", "facecolor": "white", "edgecolor": "none", "alpha": 0.85})
        top = max(top, float(highs.max()))
    return handles, top


def _published_marks(ax) -> tuple[list, float]:
    """A horizontal line per published result across each ROUGE type it reports; returns legend handles and
    the highest mark."""
    handles, top = [], 0.0
    for label, scores, color, style in PUBLISHED:
        for i, name in enumerate(ROUGE_TYPES):
            if name in scores:
                line = ax.hlines(scores[name], i - 0.46, i + 0.46, colors=color, linestyles=style, lw=2, label=label)
        handles.append(line)
        top = max(top, max(scores.values()))
    return handles, top


# --------------------------------------------------------------------------------------------- dataset analysis


def plot_dataset(art: RunArtifacts, stats: EvalStats | None, path: str) -> None:
    """Six panels on the eval set's lengths and truncation; a panel whose input is missing says so in place."""
    from matplotlib.ticker import MaxNLocator

    if stats is None:
        raise MissingInput(art.missing.get("fine-tuned predictions") or "no predictions")
    f = stats.frame
    fig = _figure(figsize=(15, 9))
    axes = fig.subplots(2, 3)
    fig.suptitle(f"Eval set analysis: {len(f)} documents, run {art.name}", fontsize=14)
    bins = min(30, max(5, len(f) // 3))
    _panel_document_words(axes[0, 0], f, bins)
    _panel_document_tokens(axes[0, 1], stats, bins)
    _panel_summary_words(axes[0, 2], f)
    _panel_compression(axes[1, 0], f, bins)
    _panel_truncation(axes[1, 1], truncation_shares(art, stats))
    _panel_generated_vs_reference(axes[1, 2], f)
    for ax in (axes[0, 0], axes[0, 1], axes[0, 2], axes[1, 0]):
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    fig.savefig(path, dpi=DPI)


def _finite(values) -> np.ndarray:
    values = np.asarray(values, dtype=float)
    return values[np.isfinite(values)]


def _hist(ax, values, label: str, color: str, bins, alpha: float = 0.75, **kw) -> None:
    values = _finite(values)
    if len(values):
        ax.hist(values, bins=bins, color=color, alpha=alpha, label=label, **kw)


def _median_line(ax, values) -> str:
    """Marks the median and returns it as text for the panel's title ('' when there are no values)."""
    values = _finite(values)
    if not len(values):
        return ""
    med = float(np.median(values))
    ax.axvline(med, color="black", ls=":", lw=1.5)
    return f"{med:.1f}"


def _empty(ax, title: str, why: str) -> None:
    ax.set_title(title)
    ax.text(0.5, 0.5, textwrap.fill(why, 40), ha="center", va="center", transform=ax.transAxes, fontsize=10,
            color="dimgray")
    ax.set_xticks([])
    ax.set_yticks([])


def _panel_document_words(ax, f, bins: int) -> None:
    if "doc_words" not in f:
        return _empty(ax, "Document length (words)", "predictions carry no 'document' column")
    _hist(ax, f["doc_words"], "documents", "tab:blue", bins)
    med = _median_line(ax, f["doc_words"])
    ax.set(title=f"Document length (words); dotted: median {med}", xlabel="words per document", ylabel="documents")


def _panel_document_tokens(ax, stats: EvalStats, bins: int) -> None:
    """Full-document tokens when a tokenizer counted them, else the prompts' own (truncated) counts."""
    f = stats.frame
    column = "doc_tokens" if "doc_tokens" in f else "prompt_tokens" if "prompt_tokens" in f else None
    if not column:
        return _empty(ax, "Document length (tokens)", "no token counts: no prompt_tokens column and no tokenizer")
    what = "full documents" if column == "doc_tokens" else "prompts as fed (after truncation)"
    _hist(ax, f[column], what, "tab:green", bins)
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


def _panel_summary_words(ax, f) -> None:
    """References filled, predictions as outlines on shared bins, so that the shapes compare."""
    lengths = [(c, label, color) for c, label, color in (
        ("ref_words", "reference", "tab:gray"), ("pred_words", "fine-tuned prediction", "tab:blue"),
        ("base_words", "zero-shot baseline", "tab:orange")) if c in f]
    top = max(float(np.nanmax(f[c])) for c, _, _ in lengths) if lengths else 1.0
    shared = np.linspace(0, max(top, 1.0) + 1, 21)
    for c, label, color in lengths:
        if c == "ref_words":
            _hist(ax, f[c], label, color, shared, alpha=0.45)
        else:
            _hist(ax, f[c], label, color, shared, alpha=0.95, histtype="step", lw=2.2)
    ax.set(title="Summary length (words)", xlabel="words per summary", ylabel="summaries")
    ax.legend(fontsize=8)


def _panel_compression(ax, f, bins: int) -> None:
    if "doc_words" not in f or "ref_words" not in f:
        return _empty(ax, "Compression ratio", "needs 'document' and 'reference' columns")
    ratio = (f["doc_words"] / f["ref_words"].replace(0, np.nan)).to_numpy(dtype=float)
    _hist(ax, ratio, "document / reference", "tab:cyan", bins)
    med = _median_line(ax, ratio)
    ax.set(title=f"Compression ratio; dotted: median {med}x", ylabel="documents",
           xlabel="document words / reference words (x)")


def _panel_truncation(ax, shares: list[tuple[str, int, int]]) -> None:
    """One bar per truncation share, red where it is high enough for the next-step rule to fire."""
    if not shares:
        return _empty(ax, "Truncation", "no truncation counts (no 'truncated' column or training statistics)")
    labels = [textwrap.fill(s[0], 26) for s in shares]
    values = [100 * s[1] / s[2] for s in shares]
    y = np.arange(len(shares))
    ax.barh(y, values, color=["tab:red" if v >= 100 * TRUNCATED_SHARE else "tab:green" for v in values], alpha=0.8)
    ax.barh(y, [100 - v for v in values], left=values, color="lightgray", alpha=0.6)
    for yi, v, (_, part, whole) in zip(y, values, shares):
        ax.text(min(v + 1.5, 70), yi, f"{v:.1f}% ({part} of {whole})", va="center", fontsize=9)
    ax.set_yticks(y, labels, fontsize=8.5)
    ax.invert_yaxis()
    ax.set_xlim(0, 100)
    ax.set(title="Truncated to fit max_length (share)", xlabel="% truncated (red: over "
           f"{100 * TRUNCATED_SHARE:.0f}%)")


def _panel_generated_vs_reference(ax, f) -> None:
    if "ref_words" not in f:
        return _empty(ax, "Generated vs reference length", "predictions carry no 'reference' column")
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

"""report.md: the run's configuration, data, training and ROUGE as tables, the plots, examples and next steps.

Every section is built on its own: one that fails says so in its place and the rest is still written.
"""

from __future__ import annotations

import logging
from datetime import datetime, timezone
from typing import Any, Callable

import numpy as np

from phi2sum.eval.metrics import ROUGE_TYPES
from phi2sum.report.advice import next_steps
from phi2sum.report.comparison import TITLE as COMPARISON_TITLE
from phi2sum.report.comparison import RunComparison, comparison_lines
from phi2sum.report.formatting import md_cell, number, percent, shorten, x100
from phi2sum.report.load import RunArtifacts, lookup, reason
from phi2sum.report.progress import eval_loss_table, rouge_by_step_table
from phi2sum.report.published import NOTEBOOK, PUBLISHED, ROUGE_LABELS, on_xsum
from phi2sum.report.stats import EvalStats, loss_trend, truncation_shares

log = logging.getLogger(__name__)


def render_markdown(art: RunArtifacts, stats: EvalStats | None, produced: dict[str, str | None],
                    tokenizer_note: str, comparison: RunComparison | None = None) -> str:
    """report.md; ``produced`` maps each output file to None (written) or why it is missing; ``comparison`` is
    the paired baseline comparison (:func:`~phi2sum.report.comparison.baseline_comparison`)."""
    steps = next_steps(art, stats)
    gaps = dict(art.missing)  # missing inputs; outputs that failed despite their input being there:
    gaps.update({f"`{name}`": why for name, why in produced.items() if why and not why.startswith("missing input")})
    sections: list[tuple[str, Callable[[], list[str]]]] = [("At a glance", lambda: _section_glance(art, steps))]
    if gaps or art.notes or tokenizer_note:
        sections.append(("Missing or incomplete", lambda: _section_missing(gaps, art.notes, tokenizer_note)))
    sections += [
        ("Configuration", lambda: _section_config(art)),
        ("Data", lambda: _section_data(art, stats)),
        ("Training", lambda: [*_section_training(art), *eval_loss_table(art), *rouge_by_step_table(art),
                              _image("training_loss.png", "Training and validation loss per step", produced), "",
                              _image("rouge_by_step.png", "ROUGE per optimizer step", produced)]),
        ("ROUGE", lambda: [*_section_metrics(art), "", _image("rouge_scores.png", "ROUGE scores", produced)]),
        (COMPARISON_TITLE, lambda: [*comparison_lines(comparison), *_comparison_image(comparison, produced)]),
        ("Dataset analysis", lambda: [_image("dataset_analysis.png", "Dataset analysis", produced)]),
        ("Best and worst examples", lambda: _section_examples(art)),
        ("Next steps", lambda: [f"{i}. {s}" for i, s in enumerate(steps, 1)]),
        ("Files", lambda: [f"- [`{name}`]({name})" + (f": not produced ({why})" if why else "")
                           for name, why in produced.items()]),
    ]
    lines = [f"# Run report: {art.name}", "", _provenance(art), ""]
    for title, build in sections:
        lines += _section(title, build)
    return "\n".join(lines).rstrip() + "\n"


def _provenance(art: RunArtifacts) -> str:
    """Where the run is and which run it was, so that a report read apart from its run folder still says."""
    meta = [f"Run folder: `{art.uri}`"]
    for key, label in (("config_fingerprint", "config fingerprint"), ("finished_at", "finished"),
                       ("device", "device")):
        value = art.run_stats.get(key)
        if value:
            meta.append(f"{label} `{value}`" if key == "config_fingerprint" else f"{label} {value}")
    meta.append(f"report written {datetime.now(timezone.utc).isoformat(timespec='seconds')}")
    return "; ".join(meta) + "."


def _section(title: str, build: Callable[[], list[str]]) -> list[str]:
    """A section's lines; when building it fails, the failure in its place so the rest of the report is written."""
    try:
        body = build()
    except Exception as exc:  # noqa: BLE001 - the rest of the report still gets written
        log.warning("report: section %s failed: %s", title, reason(exc))
        body = [f"_This section could not be produced: {reason(exc)}._"]
    return [f"## {title}", "", *body, ""]


def _section_glance(art: RunArtifacts, steps: list[str]) -> list[str]:
    items = []
    if art.metrics and lookup(art.metrics, "rougeL.mean") is not None:
        fine_tuned = 100 * art.metrics["rougeL"]["mean"]
        text = f"ROUGE-L **{fine_tuned:.2f}** fine-tuned"
        if art.baseline_metrics and lookup(art.baseline_metrics, "rougeL.mean") is not None:
            b = 100 * art.baseline_metrics["rougeL"]["mean"]
            text += f" vs {b:.2f} zero-shot ({fine_tuned - b:+.2f})"
        if on_xsum(art):
            text += f"; original notebook {NOTEBOOK['rougeL']:.2f}"
        items.append(text)
    trend = loss_trend(art.train_log) if art.train_log is not None else None
    train = lambda key: lookup(art.run_stats, f"train.{key}")  # noqa: E731
    if train("steps") is not None:
        items.append(f"{train('steps')} training steps in {number(train('seconds'))} s, "
                     f"loss {number(train('first_loss'))} -> {number(train('final_loss'))}")
    elif trend:
        items.append(f"loss {trend['first']:.3f} -> {trend['final']:.3f} over {trend['step_final']} steps")
    items.append(f"{len(steps)} next step(s) below, first: {steps[0].split(':**')[0].strip('*')}")
    return [f"- {i}" for i in items]


def _section_missing(gaps: dict[str, str], notes: list[str], tokenizer_note: str) -> list[str]:
    out = [f"- **Missing: {label}**: {why}" for label, why in gaps.items()]
    out += [f"- Note: {note}" for note in notes]
    if tokenizer_note:
        out.append(f"- Note: token counts use `prompt_tokens` only; {tokenizer_note}")
    return out


def _image(name: str, alt: str, produced: dict[str, str | None]) -> str:
    why = produced.get(name)
    return f"![{alt}]({name})" if why is None and name in produced else f"_`{name}` not produced: {why}._"


def _comparison_image(comparison: RunComparison | None, produced: dict[str, str | None]) -> list[str]:
    """The plot, when there is a comparison to plot (otherwise the text already says why not)."""
    if comparison is None or comparison.result is None:
        return []
    return ["", _image("comparison.png", "Fine-tuned - zero-shot ROUGE with paired 95% intervals", produced)]


def _section_config(art: RunArtifacts) -> list[str]:
    c = art.cfg.to_dict() if art.cfg is not None else art.config
    if c is None:
        return [f"_Configuration missing: {art.missing.get('config', 'no config.yaml')}._"]
    g = lambda key, default=None: lookup(c, key, default)  # noqa: E731
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
    return ["| Setting | Value |", "|:--|:--|", *[f"| {k} | {md_cell(v)} |" for k, v in rows]]


def _section_data(art: RunArtifacts, stats: EvalStats | None) -> list[str]:
    return _validation_table(art) + (_eval_set_table(art, stats) if stats is not None else [])


def _validation_table(art: RunArtifacts) -> list[str]:
    """What data validation kept and dropped per split, as summary.json recorded it."""
    out = []
    data = art.run_stats.get("data") if isinstance(art.run_stats.get("data"), dict) else {}
    if data:
        out += ["| Split | Source | Records read | Kept | Skipped | Cut at max_document_chars |",
                "|:--|:--|--:|--:|--:|--:|"]
        for split in ("train", "eval"):
            s = data.get(split)
            if not isinstance(s, dict):
                continue
            skipped = s.get("skipped") or {}
            reasons = ", ".join(f"{k}: {v}" for k, v in skipped.items())
            out.append(f"| {split} | `{md_cell(s.get('source', '?'))}` | {number(s.get('total'))} | "
                       f"{number(s.get('kept'))} | "
                       f"{number(sum(skipped.values()))}{f' ({md_cell(reasons)})' if reasons else ''} | "
                       f"{number(s.get('cut_documents'))} |")
        out.append("")
    else:
        out.append(f"_Data validation statistics missing: {art.missing.get('summary', 'summary.json has no data')}._")
        out.append("")
    return out


EVAL_SET_ROWS = (("doc_words", "Document length", "words"), ("doc_tokens", "Document length", "tokens"),
                 ("prompt_tokens", "Prompt as fed", "tokens"), ("ref_words", "Reference length", "words"),
                 ("ref_tokens", "Reference length", "tokens"),
                 ("pred_words", "Fine-tuned prediction length", "words"),
                 ("base_words", "Baseline prediction length", "words"))
"""(EvalStats column, label, unit) of the eval set table, in table order; absent columns are left out."""


def _eval_set_table(art: RunArtifacts, stats: EvalStats) -> list[str]:
    f = stats.frame
    rows = [("Eval documents", f"{len(f)}")]
    rows += [(f"{label} ({unit})", _describe(f[column], unit)) for column, label, unit in EVAL_SET_ROWS if column in f]
    if "doc_words" in f and "ref_words" in f:
        ratio = (f["doc_words"] / f["ref_words"].replace(0, np.nan)).dropna()
        if len(ratio):
            rows.append(("Compression ratio (doc / reference words)", f"median {ratio.median():.1f}x"))
    for what, part, whole in truncation_shares(art, stats):
        rows.append((f"Truncated: {what}", f"{part} of {whole} ({percent(part, whole)})"))
    return ["| Eval set | Value |", "|:--|:--|", *[f"| {k} | {md_cell(v)} |" for k, v in rows], "",
            f"Token counts: {stats.token_source}."]


def _describe(values, unit: str) -> str:
    v = values.to_numpy(dtype=float)
    v = v[np.isfinite(v)]
    if not len(v):
        return "n/a"
    return f"mean {v.mean():.1f}, median {np.median(v):.0f}, p90 {np.percentile(v, 90):.0f}, max {v.max():.0f} {unit}"


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
    train = art.run_stats.get("train")
    if "training" in art.missing:
        out.append(f"_Training missing: {art.missing['training']}._")
        out.append("")
    if isinstance(train, dict):
        rows = [(label, lookup(art.run_stats, key)) for label, key in TRAIN_ROWS]
        rows = [(label, v) for label, v in rows if v is not None or label.startswith("Peak GPU")]
        out += ["| Statistic | Value |", "|:--|--:|", *[f"| {label} | {number(v)} |" for label, v in rows]]
        if art.run_stats.get("device"):
            out.append(f"| Device | {md_cell(art.run_stats['device'])} |")
        out.append("")
    elif art.train_log is not None:
        frame = art.train_log
        out += ["_summary.json has no training statistics; from train_log.parquet:_", "",
                "| Statistic | Value |", "|:--|--:|",
                f"| Optimizer steps | {number(int(frame['step'].max()))} |",
                f"| Workers | {number(int(frame['worker'].nunique()))} |",
                f"| First loss | {number(float(frame['loss'].iloc[0]))} |",
                f"| Final loss | {number(float(frame['loss'].iloc[-1]))} |", ""]
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


def _mean_and_interval(m: dict[str, Any] | None, name: str) -> tuple[str, str]:
    if m is None or lookup(m, f"{name}.mean") is None:
        return "n/a", "n/a"
    mean, low, high = (x100(lookup(m, f"{name}.{k}")) for k in ("mean", "low", "high"))
    interval = f"[{low:.2f}, {high:.2f}]" if low is not None and high is not None else "n/a"
    return f"{mean:.2f}", interval


def _section_metrics(art: RunArtifacts) -> list[str]:
    ft, base = art.metrics, art.baseline_metrics
    if ft is None and base is None:
        why = art.missing.get("fine-tuned metrics") or art.missing.get("fine-tuned predictions") or "no metrics.json"
        return [f"_Metrics missing: {why}._"]
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
            cells += list(_mean_and_interval(ft, name))
        if has_base:
            cells += list(_mean_and_interval(base, name))
        if has_ft and has_base:
            a, b = lookup(ft, f"{name}.mean"), lookup(base, f"{name}.mean")
            cells.append(f"{100 * (a - b):+.2f}" if a is not None and b is not None else "n/a")
        if marks:
            cells.append(f"{NOTEBOOK[name]:.2f}" if name in NOTEBOOK else "n/a")
        out.append("| " + " | ".join(cells) + " |")
    out.append("")
    for label, m in (("fine-tuned", ft), ("baseline", base)):
        if m is not None:
            unscored = f" ({number(m['unscored'])} without a reference, unscored)" if m.get("unscored") else ""
            out.append(f"Scored {label}: {number(m.get('count'))} documents{unscored}.")
    rl = lookup(ft, "rougeL.mean") if ft else None
    if rl is not None and marks:
        best = max(PUBLISHED[1:], key=lambda p: p[1]["rougeL"])
        out += ["", f"Against the references: ROUGE-L {100 * rl:.2f} vs {NOTEBOOK['rougeL']:.2f} in the original "
                    f"notebook ({100 * rl - NOTEBOOK['rougeL']:+.2f}) and {best[1]['rougeL']:.2f} for "
                    f"{best[0].split(' (')[0]} (published, full XSum)."]
    return out


def _section_examples(art: RunArtifacts) -> list[str]:
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
            out.append(f"**{md_cell(row['id'])}**, ROUGE-L {100 * row['rougeL']:.2f}")
            out.append("")
            if "document" in row:
                out.append(f"> **Document:** {md_cell(shorten(row['document'], 300))}")
                out.append(">")
            if "reference" in row:
                out.append(f"> **Reference:** {md_cell(shorten(row['reference'], 300))}")
                out.append(">")
            out.append(f"> **Prediction:** {md_cell(shorten(row['prediction'], 300)) or '_(empty)_'}")
            out.append("")
    return out


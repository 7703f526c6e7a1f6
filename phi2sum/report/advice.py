"""Next steps for a run, from rules on its own numbers: each piece of advice quotes the numbers that triggered
it and names the setting to change, so that the report says what to try rather than what went wrong."""

from __future__ import annotations

import logging
import math

import numpy as np

from phi2sum import storage
from phi2sum.report.formatting import percent
from phi2sum.report.load import RunArtifacts, lookup, reason
from phi2sum.report.stats import EvalStats, loss_trend, truncation_shares

log = logging.getLogger(__name__)

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


def next_steps(art: RunArtifacts, stats: EvalStats | None) -> list[str]:
    """Advice from rules on this run's numbers; each item quotes the numbers that triggered it."""
    rules = (_rule_truncation, _rule_loss, _rule_length, _rule_baseline, _rule_skipped, _rule_padding,
             _rule_interval, _rule_empty, _rule_clipping, _rule_missing)
    steps: list[str] = []
    for rule in rules:
        try:
            steps += [s for s in rule(art, stats) if s]
        except Exception as exc:  # noqa: BLE001 - one broken rule must not drop the others
            log.warning("report: next-step rule %s failed: %s", rule.__name__, reason(exc))
    if not steps:
        steps.append(_rule_default(art, stats))
    return steps


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


def _rule_truncation(art: RunArtifacts, stats: EvalStats | None) -> list[str]:
    out = []
    current = art.setting("prompt.max_length")
    suggest = _suggest_max_length(art, stats)
    for what, part, whole in truncation_shares(art, stats):
        if whole and part / whole >= TRUNCATED_SHARE:
            target = (f" to about {suggest} (fits ~90% of documents + summaries)" if suggest and current and
                      suggest > current else "")
            out.append(f"**Truncation:** {percent(part, whole)} of {what} were truncated ({part} of {whole}). "
                       f"The model sees cut articles: raise `prompt.max_length` (now {current}){target}, memory "
                       "permitting; Phi-2's context is 2048 tokens.")
            break
    skipped = lookup(art.run_stats, "train.examples.skipped_too_long") or 0
    used = lookup(art.run_stats, "train.examples.used") or 0
    if skipped:
        out.append(f"**Too-long examples:** {skipped} training examples were dropped because the summary alone "
                   f"did not fit `prompt.max_length` ({current}) next to the prompt "
                   f"({percent(skipped, skipped + used)} of the training set): raise it.")
    return out


def _rule_loss(art: RunArtifacts, stats: EvalStats | None) -> list[str]:
    if art.train_log is None:
        return []
    trend = loss_trend(art.train_log)
    if trend is None:
        return [f"**Loss trend unknown:** only {art.train_log['step'].nunique()} logged points; lower "
                f"`train.logging_steps` (now {art.setting('train.logging_steps')}) to see the curve."]
    steps_now = trend["step_final"]
    tail = (trend["smooth_q3"] - trend["smooth_final"]) / max(abs(trend["smooth_q3"]), 1e-9)
    overall = (trend["smooth_first"] - trend["smooth_final"]) / max(abs(trend["smooth_first"]), 1e-9)
    lr = art.setting("train.learning_rate")
    if tail >= LOSS_TAIL_DROP:
        max_steps, epochs = art.setting("train.max_steps") or -1, art.setting("train.epochs")
        budget = (f"`train.max_steps` (now {max_steps}) to about {2 * max_steps}" if max_steps > 0 else
                  f"`train.epochs` (now {epochs}) to about {2 * epochs:g}" if epochs else
                  f"the number of steps (now {steps_now}) to about {2 * steps_now}")
        return [f"**Not converged:** the smoothed loss still fell {100 * tail:.1f}% over the last quarter of training "
                f"({trend['smooth_q3']:.3f} at step {trend['step_q3']} -> {trend['smooth_final']:.3f} at step "
                f"{steps_now}): train longer, e.g. raise {budget}, or add training data (`data.num_train`, now "
                f"{art.setting('data.num_train', 'all')})."]
    if tail <= -LOSS_TAIL_RISE:
        return [f"**Loss rising at the end:** the smoothed loss rose {100 * -tail:.1f}% over the last quarter "
                f"({trend['smooth_q3']:.3f} -> {trend['smooth_final']:.3f}): lower `train.learning_rate` (now {lr}) "
                "or stop earlier; check the learning-rate schedule."]
    if overall < LOSS_FLAT:
        return [f"**Loss barely moved:** {trend['smooth_first']:.3f} -> {trend['smooth_final']:.3f} "
                f"({100 * overall:+.1f}%) over {steps_now} steps: check `train.learning_rate` (now {lr}; LoRA usually "
                "needs 1e-4 to 3e-4 on Phi-2), that the LoRA targets exist, and the data."]
    return []


def _rule_length(art: RunArtifacts, stats: EvalStats | None) -> list[str]:
    if stats is None or "ref_words" not in stats.frame:
        return []
    f = stats.frame
    ref, gen = float(np.median(f["ref_words"])), float(np.median(f["pred_words"]))
    out = []
    beams = art.setting("generation.num_beams")
    lp = art.setting("generation.length_penalty")
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
            out.append(f"**Cut-off summaries:** {hit} of {len(f)} ({percent(hit, len(f))}) generations stopped at "
                       f"`generation.max_new_tokens`={max_new} instead of ending: raise it if the references are "
                       "that long, otherwise the model has not learned to stop (train longer; check that EOS ends "
                       "the training targets).")
    return out


def _rule_baseline(art: RunArtifacts, stats: EvalStats | None) -> list[str]:
    ft, base = art.metrics, art.baseline_metrics
    if not ft or not base or lookup(ft, "rougeL.mean") is None or lookup(base, "rougeL.mean") is None:
        if ft and not base:
            return ["**No baseline:** this run has no zero-shot score to compare with; rerun with "
                    "`run.baseline=true` to see what fine-tuning adds."]
        return []
    a, b = 100 * lookup(ft, "rougeL.mean"), 100 * lookup(base, "rougeL.mean")
    low_a, high_b = 100 * (lookup(ft, "rougeL.low") or 0), 100 * (lookup(base, "rougeL.high") or 0)
    lr = art.setting("train.learning_rate")
    steps = lookup(art.run_stats, "train.steps")
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


def _rule_skipped(art: RunArtifacts, stats: EvalStats | None) -> list[str]:
    out = []
    data = art.run_stats.get("data") if isinstance(art.run_stats.get("data"), dict) else {}
    for split, s in data.items():
        if not isinstance(s, dict) or not s.get("total"):
            continue
        by_reason = s.get("skipped") or {}
        skipped = sum(by_reason.values())
        if skipped / s["total"] >= SKIPPED_SHARE:
            reasons = ", ".join(f"{k} ({v})" for k, v in sorted(by_reason.items(), key=lambda kv: -kv[1]))
            out.append(f"**Skipped records:** {skipped} of {s['total']} {split} records "
                       f"({percent(skipped, s['total'])}) were dropped by validation: {reasons}. Check "
                       "`data.source` and the `data.columns` mapping.")
        if s.get("cut_documents") and s["cut_documents"] / s["total"] >= SKIPPED_SHARE:
            out.append(f"**Very long documents:** {s['cut_documents']} {split} documents were cut at "
                       f"`data.max_document_chars` (now {art.setting('data.max_document_chars')}): check the source "
                       "for concatenated or malformed articles.")
    return out


def _rule_padding(art: RunArtifacts, stats: EvalStats | None) -> list[str]:
    out = []
    for key, what in (("summarize", "fine-tuned"), ("summarize_baseline", "baseline")):
        s = art.run_stats.get(key)
        if isinstance(s, dict) and (s.get("padding_fraction") or 0) >= PADDING_FRACTION:
            out.append(f"**Padding waste:** {100 * s['padding_fraction']:.0f}% of the prompt tokens in the {what} "
                       f"generation batches were padding (batch {s.get('batch_size')}, already longest-first): lower "
                       f"`generation.batch_size` (now {art.setting('generation.batch_size')}) or cap prompts with "
                       "`generation.max_prompt_tokens`.")
            break
    return out


def _rule_interval(art: RunArtifacts, stats: EvalStats | None) -> list[str]:
    m = art.metrics
    if not m or lookup(m, "rougeL.high") is None or lookup(m, "rougeL.low") is None:
        return []
    width = 100 * (m["rougeL"]["high"] - m["rougeL"]["low"])
    if width >= CI_WIDTH:
        return [f"**Noisy estimate:** the ROUGE-L 95% interval is {width:.1f} points wide over {m.get('count')} "
                f"documents: raise `data.num_eval` (now {art.setting('data.num_eval', m.get('count'))}) before "
                "comparing runs."]
    return []


def _rule_empty(art: RunArtifacts, stats: EvalStats | None) -> list[str]:
    if art.predictions is None or not len(art.predictions):
        return []
    empty = int((art.predictions["prediction"].str.strip() == "").sum())
    if empty / len(art.predictions) >= EMPTY_SHARE:
        return [f"**Empty summaries:** {empty} of {len(art.predictions)} predictions are empty (the model emitted "
                "EOS at once): check the prompt template matches training and the EOS/pad handling."]
    return []


def _rule_clipping(art: RunArtifacts, stats: EvalStats | None) -> list[str]:
    if art.train_log is None or "grad_norm" not in art.train_log:
        return []
    norms = art.train_log["grad_norm"].to_numpy(dtype=float)
    norms = norms[np.isfinite(norms)]
    clip = art.setting("train.max_grad_norm")
    median = np.median(norms) if len(norms) else None
    if median is not None and clip and median >= CLIP_FACTOR * clip:
        return [f"**Clipped updates:** the median gradient norm {median:.2f} is {median / clip:.1f}x "
                f"`train.max_grad_norm`={clip}, so almost every step is clipped: the learning rate "
                f"({art.setting('train.learning_rate')}) is effectively capped; raise max_grad_norm or lower the "
                "rate."]
    return []


def _rule_missing(art: RunArtifacts, stats: EvalStats | None) -> list[str]:
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


def _rule_default(art: RunArtifacts, stats: EvalStats | None) -> str:
    n = lookup(art.run_stats, "data.train.kept") or art.setting("data.num_train")
    rl = lookup(art.metrics, "rougeL.mean") if art.metrics else None
    score = f" (ROUGE-L now {100 * rl:.2f})" if rl is not None else ""
    if art.train_log is None:  # no training log: nothing can be said of convergence or clipping
        return (f"**No rule fired**{score}: these predictions are untruncated and score as expected by these "
                "checks; the run has no training log, so nothing is said of its training.")
    return (f"**No rule fired**{score}: the run is converged, unclipped and untruncated by these checks. The largest "
            f"remaining lever is data: this run trained on {n if n is not None else 'an unknown number of'} examples "
            "(`data.num_train`); then a larger LoRA rank (`lora.r`, now "
            f"{art.setting('lora.r')}).")


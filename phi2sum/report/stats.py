"""Numbers derived from the run's artifacts that more than one part of the report reads: per-document lengths
of the eval set, the loss trend, the best validation step and the truncation shares."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from phi2sum import demo
from phi2sum.config import prompt_token_budget
from phi2sum.eval.metrics import ROUGE_TYPES
from phi2sum.report.load import RunArtifacts, lookup, reason

PROMPT_TOKENS_SOURCE = "prompt_tokens (prompt as fed to the model, after truncation)"


@dataclass
class EvalStats:
    """Per-document lengths of the eval set, shared by the plots, the markdown and the next-step rules."""

    frame: pd.DataFrame  # doc_words, ref_words, pred_words, [base_words], prompt_tokens, doc_tokens, ref_tokens, ...
    token_source: str  # where doc_tokens came from
    prompt_budget: int | None
    max_length: int | None
    max_new_tokens: int | None


def eval_stats(art: RunArtifacts, tokenizer: Any) -> EvalStats | None:
    """None without predictions; ``tokenizer`` (optional) adds full-document token counts, which the prompts'
    own counts cannot show because they are taken after truncation."""
    pred = art.predictions
    if pred is None:
        return None
    frame = pd.DataFrame({"id": pred["id"].astype(str)})
    if "document" in pred.columns:
        frame["doc_words"] = word_counts(pred["document"])
    if "reference" in pred.columns:
        frame["ref_words"] = word_counts(pred["reference"])
    frame["pred_words"] = word_counts(pred["prediction"])
    for column in ("prompt_tokens", "generated_tokens", "padding_tokens", "truncated", *ROUGE_TYPES):
        if column in pred.columns:
            frame[column] = pred[column].to_numpy()
    if art.baseline_predictions is not None:
        _add_baseline_columns(frame, art.baseline_predictions)
    token_source = PROMPT_TOKENS_SOURCE
    if tokenizer is not None and "document" in pred.columns:
        _add_token_columns(frame, pred, tokenizer)
        token_source = f"tokenizer of {art.cfg.model.base}" if art.cfg is not None else "the model's tokenizer"
    return EvalStats(frame, token_source, *_length_limits(art))


def word_counts(series: pd.Series) -> np.ndarray:
    return np.array([len(str(t).split()) for t in series], dtype=float)


def _add_baseline_columns(frame: pd.DataFrame, base: pd.DataFrame) -> None:
    """Baseline lengths and ROUGE-L beside the fine-tuned ones, matched by id (the two may differ in order)."""
    by_id = dict(zip(base["id"].astype(str), base["prediction"]))
    frame["base_words"] = [len(str(by_id[i]).split()) if i in by_id else np.nan for i in frame["id"]]
    if "rougeL" in base.columns:
        scores = dict(zip(base["id"].astype(str), base["rougeL"]))
        frame["base_rougeL"] = [scores.get(i, np.nan) for i in frame["id"]]


def _add_token_columns(frame: pd.DataFrame, pred: pd.DataFrame, tokenizer: Any) -> None:
    def count(texts: pd.Series) -> list[int]:
        return [len(ids) for ids in tokenizer(list(texts), add_special_tokens=False)["input_ids"]]

    frame["doc_tokens"] = count(pred["document"])
    if "reference" in pred.columns:
        frame["ref_tokens"] = count(pred["reference"])


def _length_limits(art: RunArtifacts) -> tuple[int | None, int | None, int | None]:
    """(generation prompt budget, prompt.max_length, generation.max_new_tokens); from config.yaml as written when
    it does not validate, computing the budget the way the config package does."""
    if art.cfg is not None:
        return prompt_token_budget(art.cfg), art.cfg.prompt.max_length, art.cfg.generation.max_new_tokens
    if art.config is None:
        return None, None, None
    max_length = lookup(art.config, "prompt.max_length")
    max_new = lookup(art.config, "generation.max_new_tokens")
    budget = lookup(art.config, "generation.max_prompt_tokens") or (
        max_length - max_new if max_length and max_new else None)
    return budget, max_length, max_new


def load_tokenizer_cheaply(art: RunArtifacts) -> tuple[Any, str]:
    """The run's tokenizer when it is on this machine (embedded, a local folder or the HF cache), else None and
    why: a report never downloads a model and never fails for want of one."""
    if art.cfg is None:
        return None, "no usable config.yaml, so the tokenizer is unknown"
    base = art.cfg.model.base
    try:
        from phi2sum.model import EMBEDDED_PREFIX, load_tokenizer  # deferred: phi2sum.model imports torch

        if base.startswith(EMBEDDED_PREFIX):
            if not demo.is_built():  # never build it (minutes) just to count tokens
                return None, f"{base} is not built on this machine (building it takes minutes)"
        elif not os.path.isdir(os.path.expanduser(base)):
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(base, "tokenizer_config.json", revision=art.cfg.model.revision)
            if not isinstance(cached, str):
                return None, f"the tokenizer of {base} is not in the local Hugging Face cache (not downloaded)"
        return load_tokenizer(art.cfg), ""
    except Exception as exc:  # noqa: BLE001 - token counts are optional
        return None, f"the tokenizer of {base} could not be loaded ({reason(exc)})"



def ema(values: np.ndarray) -> tuple[np.ndarray, int]:
    """Exponential moving average with a span that grows with the log's length (few points: light smoothing);
    returns the span too, for the plot's legend."""
    span = int(min(25, max(2, round(len(values) / 8))))
    return pd.Series(values).ewm(span=span, adjust=True).mean().to_numpy(), span


def loss_trend(train_log: pd.DataFrame) -> dict[str, Any] | None:
    """Smoothed loss at start, three quarters and end of the first worker's log (the reference curve)."""
    worker = sorted(train_log["worker"].unique())[0]
    part = train_log[train_log["worker"] == worker]
    loss = part["loss"].to_numpy(dtype=float)
    steps = part["step"].to_numpy()
    if len(loss) < 4:
        return None
    smooth, _ = ema(loss)
    q3 = int(np.searchsorted(steps, steps[0] + 0.75 * (steps[-1] - steps[0])))
    q3 = min(max(q3, 1), len(loss) - 2)
    return {"first": float(loss[0]), "final": float(loss[-1]), "smooth_first": float(smooth[0]),
            "smooth_q3": float(smooth[q3]), "smooth_final": float(smooth[-1]), "step_q3": int(steps[q3]),
            "step_final": int(steps[-1]), "points": len(loss)}


def best_eval(eval_log: pd.DataFrame | None) -> pd.Series | None:
    """The validation-loss row with the lowest loss (the earliest of equals: where training could have stopped)."""
    if eval_log is None or eval_log.empty:
        return None
    return eval_log.loc[eval_log["eval_loss"].astype(float).idxmin()]


def truncation_shares(art: RunArtifacts, stats: EvalStats | None) -> list[tuple[str, int, int]]:
    """(what, truncated, out of) for the eval prompts, the training examples and (with a tokenizer) the
    eval documents longer than prompt.max_length."""
    out = []
    if stats is not None and "truncated" in stats.frame:
        cut = int(stats.frame["truncated"].fillna(False).astype(bool).sum())
        budget = f" (budget {stats.prompt_budget} tok)" if stats.prompt_budget else ""
        out.append((f"eval prompts{budget}", cut, len(stats.frame)))
    examples = lookup(art.run_stats, "train.examples")
    if isinstance(examples, dict) and examples.get("used"):
        out.append((f"training examples (max_length {stats.max_length if stats and stats.max_length else '?'} tok)",
                    int(examples.get("truncated", 0)), int(examples["used"])))
    if stats is not None and "doc_tokens" in stats.frame and stats.max_length:
        over = int((stats.frame["doc_tokens"] > stats.max_length).sum())
        out.append((f"eval documents > max_length ({stats.max_length} tok)", over, len(stats.frame)))
    return out

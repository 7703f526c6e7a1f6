"""In-training validation: the best adapter by validation loss, early stopping, and ROUGE at checkpoints.

The validation loss itself is the Trainer's own evaluation (`train.eval_steps`); these callbacks act on it. The
best adapter is saved beside the checkpoints when the loss improves and copied into every checkpoint, so a
resumed run (local or a retried Ray worker) keeps it. ROUGE by generation is what the summarize job measures,
measured on `train.rouge_documents` validation documents while training: under Ray each worker summarizes its
own share and the scores are gathered, so the overhead is a share of the documents, not all of them on rank 0
while the other workers wait at the next all-reduce.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import time
from typing import Any

import torch
from transformers import TrainerCallback

from phi2sum.config import Config
from phi2sum.eval.metrics import score_examples
from phi2sum.generate import Summarizer
from phi2sum.model import load_tokenizer

log = logging.getLogger(__name__)

BEST_ADAPTER = "phi2sum_best_adapter"  # beside the checkpoints, and inside each one
ROUGE_LOGGED = ("rouge1", "rouge2", "rougeL", "rougeLsum")


def wants_validation(cfg: Config) -> bool:
    """Whether training reads a validation set: for the validation loss or for ROUGE at checkpoints."""
    return cfg.train.eval_steps > 0 or cfg.train.rouge_steps > 0


def best_eval(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The eval row with the lowest validation loss (the earliest of equals), or None without one."""
    evals = [r for r in rows if r.get("kind") == "eval" and r.get("eval_loss") is not None
             and math.isfinite(r["eval_loss"])]
    return min(evals, key=lambda r: (r["eval_loss"], r["step"])) if evals else None


def validation_summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """summary.json's view of the validation rows: first, best and final validation loss, last ROUGE."""
    evals = [r for r in rows if r.get("kind") == "eval"]
    rouges = [r for r in rows if r.get("kind") == "rouge"]
    out: dict[str, Any] = {}
    if evals:
        best = best_eval(rows)
        out.update(first_eval_loss=evals[0]["eval_loss"], final_eval_loss=evals[-1]["eval_loss"],
                   best_eval_loss=best["eval_loss"] if best else None, best_step=best["step"] if best else None,
                   evaluations=len(evals))
    if rouges:
        out["rouge_at_steps"] = {r["step"]: {k: r[k] for k in ROUGE_LOGGED} for r in rouges}
        out["rouge_seconds"] = round(sum(r["rouge_seconds"] for r in rouges), 2)
    return out


def kept_adapter(cfg: Config, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Which step's adapter a run exports (summary.json): the best validation loss's with `train.keep_best`."""
    best = best_eval(rows) if cfg.train.keep_best else None
    if best:
        return {"step": best["step"], "why": "lowest validation loss", "eval_loss": best["eval_loss"]}
    return {"step": max((r["step"] for r in rows), default=0), "why": "last step"}


class ValidationWatch(TrainerCallback):
    """After each validation: keep the best adapter (`train.keep_best`) and stop when the loss has not improved
    for `train.early_stopping_patience` validations. Every worker sees the same gathered loss, so under Ray all
    of them stop at the same step."""

    def __init__(self, cfg: Config, output_dir: str, rows: list[dict[str, Any]]):
        self.keep_best = cfg.train.keep_best
        self.patience = cfg.train.early_stopping_patience
        self.folder = os.path.join(output_dir, BEST_ADAPTER)
        self.stopped_at: int | None = None
        self.restore(rows)

    def restore(self, rows: list[dict[str, Any]]) -> None:
        """The best loss so far and the validations since it, from a resumed run's rows."""
        best = best_eval(rows)
        self.best_loss = best["eval_loss"] if best else math.inf
        self.best_step = best["step"] if best else None
        self.since_best = sum(1 for r in rows if r.get("kind") == "eval" and best and r["step"] > best["step"])

    def on_evaluate(self, args, state, control, metrics=None, model=None, **kwargs):
        loss = (metrics or {}).get("eval_loss")
        if loss is None or not math.isfinite(loss):
            return
        if loss < self.best_loss:
            self.best_loss, self.best_step, self.since_best = loss, state.global_step, 0
            if self.keep_best and state.is_world_process_zero:
                model.save_pretrained(self.folder)  # the adapter alone (PEFT), replacing the previous best
        else:
            self.since_best += 1
        if self.patience and self.since_best >= self.patience and state.global_step < state.max_steps:
            log.warning("early stopping at step %d: no lower validation loss in %d evaluations (best %.4f at step "
                        "%s)", state.global_step, self.since_best, self.best_loss, self.best_step)
            self.stopped_at = state.global_step
            control.should_training_stop = True
            control.should_save = True  # a last checkpoint, so Ray's final one holds the best adapter too

    def on_save(self, args, state, control, **kwargs):
        folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        if os.path.isdir(self.folder) and os.path.isdir(folder):
            shutil.copytree(self.folder, os.path.join(folder, BEST_ADAPTER), dirs_exist_ok=True)


def restore_best_adapter(checkpoint: str, output_dir: str) -> None:
    """On resume: the best adapter as of the checkpoint resumed from (a later one belonged to the lost steps)."""
    saved, live = os.path.join(checkpoint, BEST_ADAPTER), os.path.join(output_dir, BEST_ADAPTER)
    shutil.rmtree(live, ignore_errors=True)
    if os.path.isdir(saved):
        shutil.copytree(saved, live)


class RougeAtSteps(TrainerCallback):
    """ROUGE of the model as it trains: every `train.rouge_steps` steps and at the last step, the batched
    Summarizer (the summarize job's settings) summarizes the first `train.rouge_documents` validation documents.

    Under Ray each worker takes every world-th document and the per-document scores are gathered (one
    `all_gather_object`), so no worker waits for rank 0 to summarize them all. Rank 0 logs the row.
    """

    def __init__(self, cfg: Config, records: list[dict[str, str]], add_row, rank: int = 0, world: int = 1):
        self.cfg, self.add_row, self.rank, self.world = cfg, add_row, rank, world
        chosen = records[:cfg.train.rouge_documents]
        self.total = len(chosen)
        self.mine = chosen[rank::world]
        self.summarizer = None

    def due(self, state) -> bool:
        every = self.cfg.train.rouge_steps
        return state.global_step % every == 0 or state.global_step >= state.max_steps

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if self.due(state):
            self.measure(model, state)

    def measure(self, model, state) -> dict[str, float]:
        started = time.time()
        scores = gather(self._score_mine(model), self.world)
        means = {k: float(sum(s[k] for s in scores) / max(len(scores), 1)) for k in ROUGE_LOGGED}
        seconds = round(time.time() - started, 3)
        if self.rank == 0:
            self.add_row(state, "rouge", **means, rouge_seconds=seconds, rouge_documents=len(scores))
            log.info("step %d: ROUGE-1/2/L %.2f / %.2f / %.2f on %d validation documents (%.1fs)",
                     state.global_step, *(100 * means[k] for k in ("rouge1", "rouge2", "rougeL")), len(scores),
                     seconds)
        return means

    def _score_mine(self, model) -> list[dict[str, float]]:
        """Per-document ROUGE of this worker's share, with the model put back in training mode afterwards."""
        if not self.mine:
            return []
        summarizer = self._summarizer(model)
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                predictions = summarizer.summarize([r["document"] for r in self.mine])
        finally:
            model.train(was_training)
        return score_examples([p.prediction for p in predictions], [r["summary"] for r in self.mine])

    def _summarizer(self, model):
        """One Summarizer on the training model, with its own left-padding tokenizer (the trainer's pads right)."""
        if self.summarizer is None or self.summarizer.model is not model:
            self.summarizer = Summarizer(self.cfg, model=model, tokenizer=load_tokenizer(self.cfg, padding_side="left"))
        return self.summarizer


def gather(scores: list[dict[str, float]], world: int) -> list[dict[str, float]]:
    """Every worker's per-document scores, on every worker (a no-op outside a process group)."""
    if world == 1 or not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return scores
    shares: list[Any] = [None] * world
    torch.distributed.all_gather_object(shares, scores)
    return [s for share in shares for s in share]

"""Local mode: the whole job in one process (train, summarize, evaluate), on one GPU or the CPU.

A run lives at `<storage.output>/<run.name>/` (see `phi2sum.run`):
  config.yaml  adapter/  train_log.parquet  predictions.parquet  metrics.json  summary.json
  baseline/predictions.parquet  baseline/metrics.json   (with run.baseline=true: the model without adapter)
A stage whose output already exists is not redone, so re-running a finished run writes nothing new and an
interrupted one resumes (training from its last checkpoint).
"""

from __future__ import annotations

import logging
import os
import tempfile
import time

import pyarrow as pa

from phi2sum import storage
from phi2sum.config import Config, check_trainer_names, prompt_token_budget
from phi2sum.data import TrainingSplits, load_split, load_training_splits
from phi2sum.devices import compute_dtype, pin_one_gpu, resolve_device
from phi2sum.eval.metrics import ROUGE_TYPES
from phi2sum.eval.scoring import evaluate_predictions
from phi2sum.generate import Summarizer, summarize_records
from phi2sum.adapters import check_adapter, load_adapter, load_for_inference
from phi2sum.model import load_tokenizer, resolve_lora_targets
from phi2sum.prompt import check_template_fits
from phi2sum.run import Run, finish_summary, open_run, train_section, write_train_log
from phi2sum.tracking import TrackTarget, check_trackers
from phi2sum.train import train
from phi2sum.validation import kept_adapter, wants_validation

log = logging.getLogger(__name__)

STAGES = ("train", "summarize", "evaluate")


def run_local(cfg: Config, stages: tuple[str, ...] = STAGES) -> Run:
    """Every stage in this process; bad input fails before the run folder is claimed."""
    wall = time.time()
    pin_one_gpu(cfg)  # first, before anything starts CUDA
    if "train" in stages:
        check_trainer_names(cfg)
        resolve_lora_targets(cfg)  # `auto` -> this architecture's layers, before config.yaml is written
    # Fail fast, before any data is read or written, when the model cannot be had or the prompt cannot fit.
    check_template_fits(load_tokenizer(cfg), cfg.prompt.template, prompt_token_budget(cfg), cfg.prompt.chat_template)
    check_adapter(cfg)
    check_trackers(cfg)
    compute_dtype(cfg, resolve_device(cfg))  # refuses bf16 without native support, eager attention in fp16
    splits = _load_data(cfg, stages)
    with open_run(cfg) as run:
        _run_stages(run, stages, splits)
        finish_summary(run, time.time() - wall)
    return run


def _run_stages(run: Run, stages: tuple[str, ...], splits: TrainingSplits | None) -> None:
    cfg = run.cfg
    timings = run.stats.setdefault("stage_seconds", {})
    data = run.stats.setdefault("data", {})
    if splits is not None:
        data["eval"] = splits.eval.stats.to_dict()
    if "train" in stages:
        data["train"] = splits.train.stats.to_dict()
        if splits.validation is not None:
            data["validation"] = splits.validation.stats.to_dict()
        validation = splits.validation.records if splits.validation else None
        timings["train"] = _timed(lambda: train_stage(run, splits.train.records, validation))
    if "summarize" in stages:
        adapter = cfg.model.adapter or (run.adapter_uri if run.trained() else None)
        timings["summarize"] = _timed(lambda: summarize_all(run, splits.eval.records, adapter))
    if "evaluate" in stages:
        timings["evaluate"] = _timed(lambda: evaluate_stage(run))


def _load_data(cfg: Config, stages: tuple[str, ...]) -> TrainingSplits | None:
    if "train" in stages:
        return load_training_splits(cfg.data, with_validation=wants_validation(cfg))
    if "summarize" in stages:
        return TrainingSplits(None, None, load_split(cfg.data, cfg.data.eval_split, cfg.data.num_eval))
    return None


def _timed(stage) -> float:
    started = time.time()
    stage()
    return round(time.time() - started, 2)


def checkpoint_dir(run: Run) -> str:
    """Trainer checkpoints: inside the run when it is local, else in a local work folder keyed by the run."""
    if not storage.is_s3(run.uri):
        return run.path("checkpoints")
    base = os.environ.get("PHI2SUM_CACHE", os.path.expanduser("~/.cache/phi2sum"))
    return os.path.join(base, "work", f"{run.cfg.run.name}-{run.cfg.fingerprint()}", "checkpoints")


def train_stage(run: Run, train_records: list[dict[str, str]],
                validation: list[dict[str, str]] | None = None) -> None:
    if run.trained():
        log.info("training already done for run %s (adapter/ exists); skipping", run.cfg.run.name)
        return
    ckpt = checkpoint_dir(run)
    resume = os.path.isdir(ckpt) and any(n.startswith("checkpoint-") for n in os.listdir(ckpt))
    if resume:
        log.info("resuming training from the last checkpoint in %s", ckpt)
    with tempfile.TemporaryDirectory(prefix="phi2sum-adapter-") as local_adapter:
        result = train(run.cfg, train_records, ckpt, resume_from_checkpoint=True if resume else None,
                       adapter_dir=local_adapter, validation=validation,
                       track_to=TrackTarget(run.uri, run.run_id, os.path.dirname(ckpt)))
        write_train_log(run, result.log)
        run.save_adapter(local_adapter)  # last: its completion marker is what marks training as done
    run.stats["train"] = train_section(
        seconds=result.seconds, steps=result.steps, tokens=result.tokens, trainable_params=result.trainable_params,
        effective_batch=result.effective_batch, workers=1, log_rows=result.log, total_params=result.total_params,
        trainable_percent=round(100 * result.trainable_params / max(result.total_params, 1), 4),
        examples=result.examples, micro_batch=result.micro_batch, grad_accum=result.grad_accum,
        padding_fraction=result.padding_fraction, kept_adapter=kept_adapter(run.cfg, result.log),
        stopped_early_at=result.stopped_early_at)


def summarize_all(run: Run, records: list[dict[str, str]], adapter: str | None) -> None:
    """Fine-tuned predictions (and the zero-shot baseline when asked), loading the base model once."""
    wanted_baseline = run.cfg.run.baseline and not run.has("baseline", "predictions.parquet")
    if run.has("predictions.parquet") and not wanted_baseline:
        log.info("predictions already exist for run %s; skipping", run.cfg.run.name)
        return
    model, tokenizer = load_for_inference(run.cfg)
    if wanted_baseline:
        summarize_stage(run, records, Summarizer(run.cfg, model=model, tokenizer=tokenizer),
                        "baseline/predictions.parquet", "summarize_baseline")
    if adapter:
        model = load_adapter(model, adapter, run.cfg)
        model.eval()
    else:
        log.warning("no adapter (model.adapter unset and the run has no adapter/): summarizing with the base model")
    summarize_stage(run, records, Summarizer(run.cfg, model=model, tokenizer=tokenizer))
    run.stats.setdefault("model", {}).update({"base": run.cfg.model.base, "adapter": adapter})


def summarize_stage(run: Run, records: list[dict[str, str]], summarizer: Summarizer,
                    name: str = "predictions.parquet", key: str = "summarize") -> None:
    """Predictions for `records` to `<run>/<name>` (without ROUGE yet; the evaluate stage adds it)."""
    if run.has(name):
        log.info("%s already exists for run %s; skipping", name, run.cfg.run.name)
        return
    started = time.time()
    rows = summarize_records(summarizer, records)
    seconds = time.time() - started
    storage.write_parquet(pa.Table.from_pylist(rows), run.path(name))
    generated = sum(r["generated_tokens"] for r in rows)
    padded = sum(r["padding_tokens"] for r in rows)
    prompt = sum(r["prompt_tokens"] for r in rows)
    run.stats[key] = {
        "seconds": round(seconds, 2), "documents": len(rows),
        "documents_per_second": round(len(rows) / max(seconds, 1e-9), 3),
        "generated_tokens": generated, "generated_tokens_per_second": round(generated / max(seconds, 1e-9), 1),
        "padding_fraction": round(padded / max(padded + prompt, 1), 4),
        "truncated_documents": sum(bool(r["truncated"]) for r in rows),
        "num_beams": run.cfg.generation.num_beams, "batch_size": summarizer.batch_size,
    }


def evaluate_stage(run: Run) -> None:
    for prefix, key in (("baseline/", "baseline"), ("", "finetuned")):
        if run.has(f"{prefix}predictions.parquet"):
            metrics = evaluate_predictions(run.path(f"{prefix}predictions.parquet"), run.path(f"{prefix}metrics.json"))
            run.stats.setdefault("metrics", {})[key] = {name: metrics[name]["mean"] for name in ROUGE_TYPES}

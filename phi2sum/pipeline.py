"""Local mode: the whole job in one process — train, summarize, evaluate — writing every artifact of a run.

A run lives at `<storage.output>/<run.name>/`:
  config.yaml  adapter/  train_log.parquet  predictions.parquet  metrics.json  summary.json
  baseline/predictions.parquet  baseline/metrics.json   (with run.baseline=true: the model without adapter)
A stage whose output already exists is not redone, so re-running a finished run writes nothing new and an
interrupted one resumes (training from its last checkpoint). A location that holds another run's outputs is
refused rather than overwritten.
"""

from __future__ import annotations

import gc
import logging
import os
import platform
import resource
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import pyarrow as pa

from phi2sum import storage
from phi2sum.config import Config

log = logging.getLogger(__name__)

PACKAGES = ("phi2sum", "torch", "transformers", "peft", "trl", "bitsandbytes", "accelerate", "datasets",
            "rouge-score", "ray", "pyarrow", "boto3")


@dataclass
class Run:
    """Where a run's artifacts go, and what its stages recorded for summary.json."""

    cfg: Config
    uri: str
    summary: dict[str, Any] = field(default_factory=dict)

    def path(self, *parts: str) -> str:
        return storage.join(self.uri, *parts)

    @property
    def adapter_uri(self) -> str:
        return self.path("adapter")

    def has(self, *parts: str) -> bool:
        return storage.exists(self.path(*parts))


def default_run_name() -> str:
    return datetime.now(timezone.utc).strftime("run-%Y%m%d-%H%M%S")


def open_run(cfg: Config) -> Run:
    """Name the run, claim its location (refusing another run's outputs) and save the resolved config."""
    if cfg.storage.endpoint_url:
        os.environ["AWS_ENDPOINT_URL"] = cfg.storage.endpoint_url
    if not cfg.run.name:
        cfg.run.name = default_run_name()
    run = Run(cfg, storage.join(cfg.storage.output, cfg.run.name))
    storage.claim_run_dir(run.uri, f"{cfg.run.name}:{cfg.fingerprint()}")
    storage.write_text(run.path("config.yaml"), cfg.to_yaml())
    if run.has("summary.json"):
        run.summary = storage.read_json(run.path("summary.json"))
    run.summary.update({"run_name": cfg.run.name, "config_fingerprint": cfg.fingerprint()})
    log.info("run %s -> %s", cfg.run.name, run.uri)
    return run


# --- stages --------------------------------------------------------------------------------------------------


def checkpoint_dir(run: Run) -> str:
    """Trainer checkpoints: inside the run when it is local, else in a local work folder keyed by the run."""
    if not storage.is_s3(run.uri):
        return run.path("checkpoints")
    base = os.environ.get("PHI2SUM_CACHE", os.path.expanduser("~/.cache/phi2sum"))
    return os.path.join(base, "work", f"{run.cfg.run.name}-{run.cfg.fingerprint()}", "checkpoints")


def train_stage(run: Run, train_records: list[dict[str, str]]) -> None:
    from phi2sum.train import train

    if run.has("adapter", "adapter_config.json") and run.has("train_log.parquet"):
        log.info("training already done for run %s (adapter/ exists); skipping", run.cfg.run.name)
        return
    ckpt = checkpoint_dir(run)
    resume = os.path.isdir(ckpt) and any(n.startswith("checkpoint-") for n in os.listdir(ckpt))
    if resume:
        log.info("resuming training from the last checkpoint in %s", ckpt)
    with tempfile.TemporaryDirectory(prefix="phi2sum-adapter-") as local_adapter:
        result = train(run.cfg, train_records, ckpt, resume_from_checkpoint=True if resume else None,
                       adapter_dir=local_adapter)
        storage.write_parquet(train_log_table(result.log), run.path("train_log.parquet"))
        storage.upload_dir(local_adapter, run.adapter_uri)  # last: its presence marks training as done
    run.summary["train"] = {
        "seconds": round(result.seconds, 2), "steps": result.steps, "tokens": result.tokens,
        "tokens_per_second": round(result.tokens / max(result.seconds, 1e-9), 1),
        "trainable_params": result.trainable_params, "total_params": result.total_params,
        "trainable_percent": round(100 * result.trainable_params / max(result.total_params, 1), 4),
        "examples": result.examples, "effective_batch": result.effective_batch, "workers": 1,
        "first_loss": result.log[0]["loss"] if result.log else None,
        "final_loss": result.log[-1]["loss"] if result.log else None,
    }


def train_log_table(rows: list[dict[str, Any]]) -> pa.Table:
    schema = pa.schema([("worker", pa.int32()), ("step", pa.int64()), ("epoch", pa.float64()), ("loss", pa.float64()),
                        ("learning_rate", pa.float64()), ("grad_norm", pa.float64()), ("tokens", pa.int64()),
                        ("seconds", pa.float64())])
    return pa.Table.from_pylist(rows, schema=schema)


def summarize_stage(run: Run, records: list[dict[str, str]], summarizer, name: str = "predictions.parquet",
                    key: str = "summarize") -> None:
    """Summaries of `records` to `<run>/<name>` (without ROUGE yet; the evaluate stage adds it)."""
    from phi2sum.generate import summarize_records

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
    run.summary[key] = {
        "seconds": round(seconds, 2), "documents": len(rows),
        "documents_per_second": round(len(rows) / max(seconds, 1e-9), 3),
        "generated_tokens": generated, "generated_tokens_per_second": round(generated / max(seconds, 1e-9), 1),
        "padding_fraction": round(padded / max(padded + prompt, 1), 4),
        "truncated_documents": sum(bool(r["truncated"]) for r in rows),
        "num_beams": run.cfg.generation.num_beams, "batch_size": summarizer.batch_size,
    }


# --- the whole job -------------------------------------------------------------------------------------------


def run_local(cfg: Config, stages: tuple[str, ...] = ("train", "summarize", "evaluate")) -> Run:
    """The local single-GPU (or CPU) mode: every stage in this process."""
    from phi2sum.data import load_split, load_train_eval
    from phi2sum.model import load_tokenizer, pin_one_gpu

    wall = time.time()
    pin_one_gpu(cfg)  # first, before anything starts CUDA
    load_tokenizer(cfg)  # fail fast, before any data is read or written, when the model cannot be had
    # Data next, also before the run folder is claimed: bad input must not leave a half-made run behind.
    if "train" in stages:
        train_split, eval_split = load_train_eval(cfg.data)
    elif "summarize" in stages:
        eval_split = load_split(cfg.data, cfg.data.eval_split, cfg.data.num_eval)
    run = open_run(cfg)
    timings = run.summary.setdefault("stage_seconds", {})
    if "train" in stages:
        run.summary["data"] = {"train": train_split.stats.to_dict(), "eval": eval_split.stats.to_dict()}
        started = time.time()
        train_stage(run, train_split.records)
        timings["train"] = round(time.time() - started, 2)
        gc.collect()
    elif "summarize" in stages:
        run.summary.setdefault("data", {})["eval"] = eval_split.stats.to_dict()
    if "summarize" in stages:
        started = time.time()
        summarize_all(run, eval_split.records, adapter=cfg.model.adapter or (
            run.adapter_uri if run.has("adapter", "adapter_config.json") else None))
        timings["summarize"] = round(time.time() - started, 2)
    if "evaluate" in stages:
        from phi2sum.evaluate import evaluate_predictions

        started = time.time()
        for prefix in ("baseline/", ""):
            if run.has(f"{prefix}predictions.parquet"):
                metrics = evaluate_predictions(run.path(f"{prefix}predictions.parquet"),
                                               run.path(f"{prefix}metrics.json"))
                run.summary.setdefault("metrics", {})["baseline" if prefix else "finetuned"] = {
                    name: metrics[name]["mean"] for name in ("rouge1", "rouge2", "rougeL", "rougeLsum")}
        timings["evaluate"] = round(time.time() - started, 2)
    finish_summary(run, time.time() - wall)
    return run


def summarize_all(run: Run, records: list[dict[str, str]], adapter: str | None) -> None:
    """Fine-tuned predictions (and the zero-shot baseline when asked), loading the base model once."""
    from phi2sum.generate import Summarizer
    from phi2sum.model import load_adapter, load_for_inference

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
    run.summary.setdefault("model", {}).update({"base": run.cfg.model.base, "adapter": adapter})


def finish_summary(run: Run, wall_seconds: float, workers: list[dict[str, Any]] | None = None) -> None:
    """Timings, versions and where it ran; `workers` (Ray) replaces this process's device and peak memory with
    the workers' own, since the driver is often a CPU-only head that trained nothing."""
    run.summary["wall_seconds"] = round(wall_seconds, 2)
    run.summary["finished_at"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    if workers:
        run.summary["workers"] = workers
        run.summary["device"] = ", ".join(sorted({w["device"] for w in workers}))
        run.summary["peak_memory_mb"] = {
            "cpu_rss": max(w["peak_memory_mb"]["cpu_rss"] for w in workers),
            "gpu": max((w["peak_memory_mb"]["gpu"] or 0 for w in workers), default=None) or None,
        }
    else:
        run.summary["device"] = device_name()
        run.summary["peak_memory_mb"] = peak_memory_mb()
    run.summary["versions"] = package_versions()
    storage.write_json(run.path("summary.json"), run.summary)


def device_name() -> str:
    import torch

    return torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu"


def peak_memory_mb() -> dict[str, float | None]:
    """This process's peak resident memory and peak GPU memory allocated by PyTorch, in MiB."""
    import torch

    return {"cpu_rss": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "gpu": round(torch.cuda.max_memory_allocated() / 2**20, 1) if torch.cuda.is_available() else None}


def package_versions() -> dict[str, str | None]:
    from importlib.metadata import PackageNotFoundError, version

    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out

"""Distributed QLoRA training with Ray Train: `phi2sum.train.train` in every worker of a `TorchTrainer`.

Ray Train owns the run's storage: checkpoints (adapter + optimizer, scheduler, step and RNG state, and each
worker's step log) go to `<storage.output>/<run.name>/checkpoint_*` on a local path or S3, so a retried
worker, or a resubmitted job with the same run name, resumes from the latest one. Each worker loads its own
4-bit model on its own device; the Hugging Face Trainer shards the examples over workers (DistributedSampler),
so each example is seen once per epoch across the cluster.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from phi2sum import storage
from phi2sum.config import Config, check_trainer_names, config_from_dict
from phi2sum.data import load_training_splits
from phi2sum.devices import device_name, peak_memory_mb
from phi2sum.distributed.cluster import init_ray, use_gpu
from phi2sum.errors import TrainingError
from phi2sum.model import resolve_lora_targets
from phi2sum.run import ADAPTER, Run, finish_summary, open_run, train_section, write_train_log
from phi2sum.tracking import TrackTarget, check_trackers, mlflow_uri
from phi2sum.train import STEP_LOG_FILE, StepLog, checkpoint_step, grad_accum_steps, train
from phi2sum.validation import BEST_ADAPTER, kept_adapter, wants_validation

log = logging.getLogger(__name__)

RESUMES_FILE = "phi2sum_resumed_from.json"  # the steps this run resumed from, across attempts
WORKER_FILE = "phi2sum_worker_rank{rank}.json"  # training seconds, device, peak memory at the save (the last: the end)
HF_CHECKPOINT = "checkpoint"  # RayTrainReportCallback's folder inside a Ray checkpoint
ADAPTER_FILES = ("adapter_", "tokenizer", "special_tokens", "vocab", "merges", "README", "chat_template")


# --- inside each worker --------------------------------------------------------------------------------------


def _worker_loop(loop_config: dict[str, Any]) -> None:
    import ray.train
    import torch
    from ray.train.huggingface.transformers import RayTrainReportCallback
    from transformers import TrainerCallback

    cfg = config_from_dict(loop_config["config"])
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    if device.type == "cpu":  # one thread per CPU: oversubscribed OpenMP threads make CPU training crawl
        torch.set_num_threads(max(1, int(cfg.ray.cpus_per_worker)))
    splits = load_training_splits(cfg.data, with_validation=wants_validation(cfg))

    scratch = tempfile.mkdtemp(prefix=f"phi2sum-rank{rank}-")
    step_log = StepLog(worker=rank)
    resume, resumed_from = None, []
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as folder:
            resume = os.path.join(scratch, "resume")
            shutil.copytree(os.path.join(folder, HF_CHECKPOINT), resume)
        resumed_path = Path(resume, RESUMES_FILE)
        resumed_from = [*(json.loads(resumed_path.read_text()) if resumed_path.is_file() else []),
                        checkpoint_step(resume)]
        log.warning("worker %d resuming from %s (step %s)", rank, checkpoint.path, resumed_from[-1])

    class SaveWorkerStats(TrainerCallback):
        """Put the resume history and this worker's stats in each checkpoint before Ray copies it (the step
        log and the best adapter are put there by `phi2sum.train`)."""

        def on_save(self, args, state, control, **kwargs):
            folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
            if os.path.isdir(folder):
                Path(folder, RESUMES_FILE).write_text(json.dumps(resumed_from))
                Path(folder, WORKER_FILE.format(rank=rank)).write_text(json.dumps(
                    {"rank": rank, "train_seconds": step_log.elapsed(), "device": device_name(),
                     "peak_memory_mb": peak_memory_mb(), "micro_batch": args.per_device_train_batch_size,
                     "grad_accum": args.gradient_accumulation_steps}))

    class WaitUntilRegistered(TrainerCallback):
        """After a checkpoint is reported, wait until Ray Train's controller has taken it from this worker.

        Ray Train (V2) hands a report to the controller only when the controller next polls the worker (every
        RAY_TRAIN_HEALTH_CHECK_INTERVAL_S, 2 s by default): a worker killed in between takes the report with it,
        and the retry starts from the previous checkpoint (from scratch after the first one) although the new
        checkpoint is already in storage. Waiting for that poll costs at most one interval per checkpoint.
        """

        def on_save(self, args, state, control, **kwargs):
            wait_until_report_taken()

    target = TrackTarget(**loop_config["track_to"], work_dir=scratch)
    result = train(cfg, splits.train.records, os.path.join(scratch, "out"), device=device, world_size=world,
                   worker=rank, resume_from_checkpoint=resume, step_log=step_log,
                   adapter_dir=os.path.join(scratch, "adapter"), track_to=target,
                   validation=splits.validation.records if splits.validation else None,
                   callbacks=(SaveWorkerStats(), RayTrainReportCallback(), WaitUntilRegistered()),
                   disable_tqdm=rank != 0, save_only_model=False)
    log.info("worker %d done: %d steps, %d tokens in %.1fs", rank, result.steps, result.tokens, result.seconds)
    shutil.rmtree(scratch, ignore_errors=True)


def wait_until_report_taken(timeout_s: float = 120.0) -> bool:
    """Block until this Ray Train worker's pending report has been polled by the controller; False if unknown."""
    try:
        from ray.train.v2._internal.execution.context import get_train_context

        pending = get_train_context().get_result_queue()
    except Exception:  # noqa: BLE001 - not Ray Train V2 (or its internals moved): nothing to wait on
        return False
    deadline = time.monotonic() + timeout_s
    while pending.unfinished_tasks and time.monotonic() < deadline:
        time.sleep(0.05)
    return not pending.unfinished_tasks


# --- the driver ----------------------------------------------------------------------------------------------


def torch_trainer(cfg: Config, run: Run):
    """A TorchTrainer whose scaling, storage, checkpointing and retries all come from the config; the workers'
    trackers log for `run`."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    gpu = use_gpu(cfg)
    resources = {"CPU": cfg.ray.cpus_per_worker, **({"GPU": 1} if gpu else {})}
    filesystem, path = storage.filesystem(cfg.storage.output)
    return TorchTrainer(
        _worker_loop,
        train_loop_config={"config": cfg.to_dict(), "track_to": {
            "run_uri": run.uri, "run_id": run.run_id, "mlflow_uri": mlflow_uri(cfg) if "mlflow" in cfg.track else None}},
        torch_config=TorchConfig(backend="nccl" if gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=cfg.ray.num_workers, use_gpu=gpu, resources_per_worker=resources),
        run_config=RunConfig(
            name=cfg.run.name,
            storage_path=path,
            storage_filesystem=filesystem,
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.ray.checkpoints_to_keep),
            failure_config=FailureConfig(max_failures=cfg.ray.max_failures),
        ),
    )


def train_on_ray(cfg: Config) -> Run:
    """Train on the cluster, then export the final adapter and the merged step log into the run folder."""
    check_trainer_names(cfg)
    check_trackers(cfg)
    resolve_lora_targets(cfg)  # `auto` -> this architecture's layers, before config.yaml is written
    if not storage.is_s3(cfg.storage.output):  # every worker, and the trackers, must find the same folder
        cfg.storage.output = os.path.abspath(os.path.expanduser(cfg.storage.output))
    if finished(cfg):
        log.info("run %s already has a trained adapter; nothing to do (use a new run.name to train again)",
                 cfg.run.name)
        return Run(cfg, storage.join(cfg.storage.output, cfg.run.name))  # read only: no Ray, no claim
    init_ray(cfg)  # before the run folder is claimed: an unreachable cluster leaves nothing behind
    with open_run(cfg) as run:
        started = time.time()
        result = torch_trainer(cfg, run).fit()
        seconds = time.time() - started
        if result.checkpoint is None:
            raise TrainingError(f"run {cfg.run.name} finished without a checkpoint; see the Ray job logs")
        export_final(run, result.checkpoint, seconds)
    return run


def finished(cfg: Config) -> bool:
    """This very run (same name and config) already trained: answered from storage, before starting Ray."""
    if not cfg.run.name:
        return False
    folder = storage.join(cfg.storage.output, cfg.run.name)
    marker = storage.join(folder, storage.RUN_MARKER)
    return storage.is_complete(storage.join(folder, ADAPTER)) and storage.exists(marker) and \
        storage.read_json(marker).get("run_id") == f"{cfg.run.name}:{cfg.fingerprint()}"


@dataclass
class FinalCheckpoint:
    """What the driver takes from the last Ray checkpoint: every worker's log and stats, and the adapter."""

    rows: list[dict[str, Any]]
    state: dict[str, Any]
    resumed_from: list[int]
    workers: list[dict[str, Any]]


def read_final(hf: str, adapter_dir: str, keep_best: bool = False) -> FinalCheckpoint:
    """Read a Ray checkpoint's HF folder and copy its adapter (PEFT format, with the tokenizer) to `adapter_dir`:
    with `keep_best`, the best validation loss's adapter the checkpoint carries."""
    rows = [{"kind": "train", **row} for f in sorted(Path(hf).glob(STEP_LOG_FILE.format(rank="*")))
            for row in json.loads(f.read_text())]
    resumes = Path(hf, RESUMES_FILE)
    os.makedirs(adapter_dir)
    best = os.path.join(hf, BEST_ADAPTER)
    for name in os.listdir(hf):
        if name.startswith(ADAPTER_FILES) and not (keep_best and os.path.isdir(best) and name.startswith("adapter_")):
            shutil.copy2(os.path.join(hf, name), adapter_dir)
    if keep_best and os.path.isdir(best):
        shutil.copytree(best, adapter_dir, dirs_exist_ok=True)
    return FinalCheckpoint(
        rows=sorted(rows, key=lambda r: (r["worker"], r["step"])),
        state=json.loads(Path(hf, "trainer_state.json").read_text()),
        resumed_from=json.loads(resumes.read_text()) if resumes.is_file() else [],
        workers=[json.loads(f.read_text()) for f in sorted(Path(hf).glob(WORKER_FILE.format(rank="*")))])


def export_final(run: Run, checkpoint, fit_seconds: float) -> None:
    """The last checkpoint's adapter -> `<run>/adapter/`; every worker's log -> train_log.parquet; summary.json.

    `fit_seconds` is the driver's whole `fit()`; the training time proper comes from the workers' own clocks."""
    with tempfile.TemporaryDirectory(prefix="phi2sum-export-") as tmp:
        adapter = os.path.join(tmp, "adapter")
        with checkpoint.as_directory() as folder:
            final = read_final(os.path.join(folder, HF_CHECKPOINT), adapter, run.cfg.train.keep_best)
        trainable = _adapter_parameters(adapter)
        write_train_log(run, final.rows)
        run.save_adapter(adapter)  # last: its completion marker is what marks training as done
    cfg = run.cfg
    seconds = max((w["train_seconds"] for w in final.workers), default=fit_seconds)
    run.stats["train"] = train_section(
        seconds=seconds, steps=int(final.state["global_step"]), tokens=int(final.state.get("num_input_tokens_seen", 0)),
        trainable_params=trainable, workers=len({r["worker"] for r in final.rows}) or 1, log_rows=final.rows,
        effective_batch=_effective_batch(cfg, final.workers),
        fit_seconds=round(fit_seconds, 2), resumed_from_steps=final.resumed_from, backend="ray",
        kept_adapter=kept_adapter(cfg, final.rows))
    finish_summary(run, fit_seconds, workers=final.workers)


def _effective_batch(cfg: Config, workers: list[dict[str, Any]]) -> int:
    """Examples per optimizer step across the cluster, as the workers trained (their micro-batch may be `auto`)."""
    per_worker = [w["micro_batch"] * w["grad_accum"] for w in workers if "micro_batch" in w]
    if per_worker:
        return per_worker[0] * cfg.ray.num_workers
    return int(cfg.train.batch_size if cfg.train.batch_size != "auto" else 1) * \
        grad_accum_steps(cfg, cfg.ray.num_workers) * cfg.ray.num_workers


def _adapter_parameters(adapter_dir: str) -> int:
    """Trainable (LoRA) parameters, counted from the saved adapter weights."""
    from safetensors import safe_open

    path = os.path.join(adapter_dir, "adapter_model.safetensors")
    if not os.path.isfile(path):
        return 0
    with safe_open(path, framework="pt") as f:
        return sum(math.prod(f.get_slice(name).get_shape()) for name in f.keys())

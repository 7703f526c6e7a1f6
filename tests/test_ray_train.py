"""Distributed training through real `ray job submit` on a real Ray head (CPU workers, gloo)."""

from __future__ import annotations

import json
import os

import pyarrow.parquet as pq
import pytest

from phi2sum import storage

pytestmark = [pytest.mark.ray, pytest.mark.slow]

# Small and fast: 24 examples; with 2 workers x batch 2 x accum 1 that is 6 optimizer steps per epoch.
TINY = ["--config", "tiny-cpu", "data.num_train=24", "data.num_eval=4", "train.batch_size=2", "train.grad_accum=1",
        "train.epochs=1", "train.save_steps=2", "train.logging_steps=1", "train.warmup_steps=0", "ray.num_workers=2",
        "ray.cpus_per_worker=0.5", "train.eval_steps=0"]  # no validation loss but where a test asks for it


# The validation loss every 2 steps, ROUGE of 4 validation summaries (2 per worker) every 3, the best adapter kept,
# both trackers on: across the worker killed at step 3, each must hold every evaluation once.
VALIDATED = ["train.eval_steps=2", "data.num_validation=8", "train.rouge_steps=3", "train.rouge_documents=4",
             "generation.num_beams=1", "generation.max_new_tokens=16", "train.keep_best=true",
             "track=tensorboard,mlflow"]


def loads_as_peft_adapter(adapter_dir: str) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from phi2sum.demo import tiny_model_path

    base = AutoModelForCausalLM.from_pretrained(tiny_model_path())
    model = PeftModel.from_pretrained(base, adapter_dir)
    assert any("lora_A" in name for name, _ in model.named_parameters())


def test_two_workers_survive_a_sigkilled_worker_and_resume_from_checkpoint(ray_head, tmp_path):
    once = tmp_path / "fault-once"
    result = ray_head.submit("jobs.train", *TINY, *VALIDATED, f"storage.output={tmp_path}", "run.name=crash",
                             "ray.max_failures=1",
                             env_vars={"PHI2SUM_FAULT": "train_step@3:kill", "PHI2SUM_FAULT_ONCE": str(once)})
    assert result.status == "SUCCEEDED", result.logs[-3000:]
    assert once.exists() and "[FailurePolicy] RETRY" in result.logs  # a worker was SIGKILLed at step 3, retried
    assert f"resuming from {tmp_path}/crash/checkpoint_" in result.logs and "(step 2)" in result.logs
    run = tmp_path / "crash"
    assert json.loads((run / "summary.json").read_text())["train"]["resumed_from_steps"] == [2]  # not step 0
    assert sorted(p.name for p in run.glob("checkpoint_*"))  # Ray Train checkpoints in the run folder
    state = json.loads(next(run.glob("checkpoint_*/checkpoint/trainer_state.json")).read_text())
    summary = json.loads((run / "summary.json").read_text())
    assert summary["train"]["steps"] == 6 and summary["train"]["workers"] == 2
    # the workers' own device and memory, not the driver's (on a real cluster the driver is a CPU-only head)
    assert sorted(w["rank"] for w in summary["workers"]) == [0, 1]
    assert all(w["device"] and w["peak_memory_mb"]["cpu_rss"] > 100 for w in summary["workers"])
    assert summary["peak_memory_mb"]["cpu_rss"] == max(w["peak_memory_mb"]["cpu_rss"] for w in summary["workers"])
    loads_as_peft_adapter(str(run / "adapter"))

    log = [r for r in pq.read_table(run / "train_log.parquet").to_pylist() if r["kind"] == "train"]
    assert {r["worker"] for r in log} == {0, 1}
    steps = [r["step"] for r in log if r["worker"] == 0]
    assert steps == sorted(set(steps)) and steps[-1] == 6  # every step once, history kept across the restart
    # train.seconds is training time (both attempts, as the step log counts it), not Ray's start-up and restart
    train = summary["train"]
    assert max(r["seconds"] for r in log) <= train["seconds"] < train["fit_seconds"]
    assert train["tokens_per_second"] == pytest.approx(train["tokens"] / train["seconds"], rel=0.01)
    assert log[-1]["loss"] < log[0]["loss"]  # it learns
    assert state["global_step"] in (4, 6)
    assert len([p for p in run.glob("checkpoint_*") if p.is_dir()]) == 2  # checkpoints_to_keep: no orphan
    from safetensors.torch import load_file

    weights = load_file(str(run / "adapter" / "adapter_model.safetensors"))
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in weights.items())  # trained, not the zero init
    assert_validation_kept_across_the_restart(run, summary)


def assert_validation_kept_across_the_restart(run, summary) -> None:
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    rows = pq.read_table(run / "train_log.parquet").to_pylist()
    evals = [r for r in rows if r["kind"] == "eval"]
    rouges = [r for r in rows if r["kind"] == "rouge"]
    assert [r["step"] for r in evals] == [2, 4, 6] and {r["worker"] for r in evals + rouges} == {0}
    assert [r["step"] for r in rouges] == [3, 6] and all(r["rouge_documents"] == 4 for r in rouges)
    best = min(evals, key=lambda r: r["eval_loss"])
    assert summary["train"]["kept_adapter"]["step"] == best["step"] == summary["train"]["best_step"]
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    assert sorted({e.step for e in events.Scalars("eval/loss")}) == [2, 4, 6]
    client = MlflowClient(tracking_uri=f"sqlite:///{run.parent}/mlflow.db")
    (tracked,) = client.search_runs([client.get_experiment_by_name("phi2sum").experiment_id])
    assert tracked.info.run_name == "crash" and tracked.info.status == "FINISHED"
    assert sorted({m.step for m in client.get_metric_history(tracked.info.run_id, "eval/loss")}) == [2, 4, 6]


def test_checkpoints_and_adapter_on_s3(ray_head, s3_env, s3_server, tmp_path):
    env = {k: os.environ[k] for k in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                                      "AWS_DEFAULT_REGION")}
    result = ray_head.submit("jobs.train", *TINY, "train.max_steps=4", f"storage.output={s3_env}/runs",
                             "run.name=on-s3", "track=tensorboard", env_vars=env)
    assert result.status == "SUCCEEDED", result.logs[-3000:]
    files = storage.list_files(f"{s3_env}/runs/on-s3")
    assert any("/checkpoint_" in f and f.endswith("adapter_model.safetensors") for f in files)
    assert f"{s3_env}/runs/on-s3/train_log.parquet" in files
    assert any(f.startswith(f"{s3_env}/runs/on-s3/tensorboard/events.out.tfevents.") for f in files)
    local = tmp_path / "adapter"
    storage.download_dir(f"{s3_env}/runs/on-s3/adapter", str(local))
    loads_as_peft_adapter(str(local))
    assert env["AWS_SECRET_ACCESS_KEY"] not in result.logs


def test_resubmitting_resumes_an_interrupted_run_and_skips_a_finished_one(ray_head, tmp_path):
    once = tmp_path / "fault-once"
    args = [*TINY, f"storage.output={tmp_path}", "run.name=again", "ray.max_failures=0"]
    first = ray_head.submit("jobs.train", *args,
                            env_vars={"PHI2SUM_FAULT": "train_step@5:kill", "PHI2SUM_FAULT_ONCE": str(once)})
    assert first.status == "FAILED" and not (tmp_path / "again" / "adapter").exists()

    second = ray_head.submit("jobs.train", *args)
    assert second.status == "SUCCEEDED", second.logs[-3000:]
    summary = json.loads((tmp_path / "again" / "summary.json").read_text())["train"]
    assert summary["resumed_from_steps"] == [4]  # the checkpoint written before the kill, not step 0
    assert summary["steps"] == 6

    third = ray_head.submit("jobs.train", *args)
    assert third.status == "SUCCEEDED"
    assert "nothing to do" in third.logs and "RayTrainWorker" not in third.logs


def test_scaling_out_keeps_the_examples_seen_and_one_worker_equals_local(ray_head, tmp_path):
    """2 workers x grad-accum k and 1 worker x grad-accum 2k: same optimizer steps, same examples (tokens);
    and the Ray job with one worker trains exactly like `phi2sum train` (same losses step by step)."""
    from phi2sum.config import load_config
    from phi2sum.local import run_local

    common = ["data.num_train=32", "train.batch_size=2", "train.epochs=1", "train.logging_steps=1",
              "train.eval_steps=0", f"storage.output={tmp_path}"]
    for name, workers, accum in (("two", 2, 2), ("one", 1, 4)):
        result = ray_head.submit("jobs.train", "--config", "tiny-cpu", *common, f"train.grad_accum={accum}",
                                 f"ray.num_workers={workers}", "ray.cpus_per_worker=0.5", f"run.name={name}")
        assert result.status == "SUCCEEDED", result.logs[-3000:]
    local = run_local(load_config("tiny-cpu", [*common, "train.grad_accum=4", "run.name=local"]), stages=("train",))
    two, one = (json.loads((tmp_path / n / "summary.json").read_text())["train"] for n in ("two", "one"))
    mine = local.stats["train"]
    assert two["steps"] == one["steps"] == mine["steps"] == 32 // (2 * 2 * 2)
    assert two["effective_batch"] == one["effective_batch"] == mine["effective_batch"] == 8
    assert two["tokens"] == one["tokens"] == mine["tokens"]  # the same examples, split over the workers
    ray_losses, local_losses = ([r["loss"] for r in pq.read_table(tmp_path / name / "train_log.parquet").to_pylist()
                                 if r["kind"] == "train"] for name in ("one", "local"))
    # Same examples in the same order: the same losses, up to float summation order (1 vs 2 torch threads).
    assert ray_losses == pytest.approx(local_losses, rel=2e-2)
    assert ray_losses[0] == pytest.approx(local_losses[0], rel=1e-4)

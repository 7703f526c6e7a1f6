"""End to end in local mode: `phi2sum run` writes every output, locally and on S3, and reruns add nothing."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest
import torch

from phi2sum import storage
from phi2sum.config import load_config
from phi2sum.local import run_local

OUTPUTS = ["config.yaml", "adapter/adapter_config.json", "adapter/adapter_model.safetensors", "adapter/_COMPLETE.json",
           "train_log.parquet",
           "predictions.parquet", "metrics.json", "summary.json"]
PREDICTION_COLUMNS = {"id", "document", "reference", "prediction", "prompt_tokens", "generated_tokens",
                      "rouge1", "rouge2", "rougeL", "rougeLsum"}
SMALL = ["data.num_train=16", "data.num_eval=4", "train.max_steps=3", "train.batch_size=2", "train.grad_accum=1",
         "train.logging_steps=1", "generation.num_beams=2", "generation.max_new_tokens=12"]


def test_local_run_writes_every_output(tiny_run):
    run = tiny_run
    for name in OUTPUTS:
        assert run.has(*name.split("/")), name
    predictions = pq.read_table(run.path("predictions.parquet"))
    assert PREDICTION_COLUMNS <= set(predictions.column_names)
    assert predictions.num_rows == run.cfg.data.num_eval
    assert len(set(predictions.column("id").to_pylist())) == predictions.num_rows
    log = [r for r in pq.read_table(run.path("train_log.parquet")).to_pylist() if r["kind"] == "train"]
    assert [r["step"] for r in log] == sorted({r["step"] for r in log}) and log[-1]["loss"] < log[0]["loss"]
    summary = json.loads(open(run.path("summary.json")).read())
    for key in ("stage_seconds", "train", "summarize", "peak_memory_mb", "versions", "data"):
        assert key in summary, key
    assert summary["train"]["trainable_params"] > 0 and summary["summarize"]["generated_tokens_per_second"] > 0
    assert summary["data"]["train"]["skipped"] == {}
    config = open(run.path("config.yaml")).read()
    assert "run:\n  name: tiny" in config and load_config(run.path("config.yaml")).fingerprint() == run.cfg.fingerprint()
    metrics = json.loads(open(run.path("metrics.json")).read())
    mean = sum(predictions.column("rougeL").to_pylist()) / predictions.num_rows
    assert metrics["rougeL"]["mean"] == pytest.approx(mean)


def test_saved_adapter_reloads_and_gives_the_same_summaries(tiny_run):
    from peft import PeftModel

    from phi2sum.generate import Summarizer
    from phi2sum.adapters import load_for_inference

    model, _ = load_for_inference(tiny_run.cfg, adapter=tiny_run.adapter_uri, merged=False)
    assert isinstance(model, PeftModel)
    merged, _ = load_for_inference(tiny_run.cfg, adapter=tiny_run.adapter_uri)  # the job's default on a CPU
    assert not isinstance(merged, PeftModel) and merged.dtype == torch.float32
    predictions = pq.read_table(tiny_run.path("predictions.parquet")).to_pylist()
    from phi2sum.data import load_split

    records = load_split(tiny_run.cfg.data, tiny_run.cfg.data.eval_split, tiny_run.cfg.data.num_eval).records
    again = Summarizer(tiny_run.cfg, adapter=tiny_run.adapter_uri).summarize([r["document"] for r in records])
    assert [s.prediction for s in again] == [p["prediction"] for p in predictions]


def test_run_on_s3_and_rerun_adds_nothing(s3_env, tmp_path):
    cfg = load_config("tiny-cpu", [*SMALL, f"storage.output={s3_env}/runs", "run.name=s3run"])
    run = run_local(cfg)
    files = storage.list_files(f"{s3_env}/runs/s3run")
    for name in OUTPUTS:
        assert f"{s3_env}/runs/s3run/{name}" in files, name
    assert not any("/checkpoints/" in f for f in files)  # trainer checkpoints stay in a local work folder
    from peft import PeftModel

    from phi2sum.model import load_base_model

    local = tmp_path / "adapter"
    storage.download_dir(run.adapter_uri, str(local))
    assert isinstance(PeftModel.from_pretrained(load_base_model(cfg), str(local)), PeftModel)

    before = storage.read_parquet(run.path("predictions.parquet"))
    adapter_before = storage.read_bytes(run.path("adapter", "adapter_model.safetensors"))
    again = run_local(load_config("tiny-cpu", [*SMALL, f"storage.output={s3_env}/runs", "run.name=s3run"]))
    after = storage.read_parquet(again.path("predictions.parquet"))
    assert after.num_rows == before.num_rows and after.column("id").to_pylist() == before.column("id").to_pylist()
    assert storage.read_bytes(run.path("adapter", "adapter_model.safetensors")) == adapter_before  # not retrained


def test_same_name_with_another_config_is_refused(tmp_path):
    from phi2sum.errors import StorageError

    storage.claim_run_dir(str(tmp_path / "taken"), "taken:somethingelse")
    (tmp_path / "taken" / "metrics.json").write_text("{}")
    with pytest.raises(StorageError, match="another run"):
        run_local(load_config("tiny-cpu", [*SMALL, f"storage.output={tmp_path}", "run.name=taken"]))
    assert (tmp_path / "taken" / "metrics.json").read_text() == "{}"  # nothing of the other run was touched

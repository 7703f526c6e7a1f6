"""Validation during training: the validation set, the validation loss, the best adapter, early stopping, ROUGE
at checkpoints, and the experiment trackers (TensorBoard, MLflow) read back, across a resumed run."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest

from phi2sum.config import DataSettings, load_config
from phi2sum.data import load_training_splits
from phi2sum.errors import ConfigError
from phi2sum.faults import InjectedFault


def write_jsonl(path, prefix: str, n: int) -> None:
    path.write_text("".join(json.dumps({"id": f"{prefix}-{i}", "document": f"Document {prefix} {i} " * 8,
                                        "summary": f"Summary {i}."}) + "\n" for i in range(n)))


# --- the validation set ----------------------------------------------------------------------------------------


def test_the_source_validation_split_is_used_when_it_has_one():
    splits = load_training_splits(load_config("tiny-cpu").data, with_validation=True)
    ids = [r["id"] for r in splits.validation.records]
    assert len(ids) == 24 and all(i.startswith("syn-validation-") for i in ids)
    assert len(splits.train.records) == 480  # nothing taken from train


@pytest.mark.parametrize("validation_split", ["validation", None])
def test_without_a_validation_split_a_seeded_slice_of_train_is_held_out(tmp_path, validation_split):
    write_jsonl(tmp_path / "train.jsonl", "tr", 50)
    write_jsonl(tmp_path / "test.jsonl", "te", 10)
    cfg = DataSettings(source=str(tmp_path), num_train=None, num_eval=5, num_validation=8,
                       validation_split=validation_split)
    splits = load_training_splits(cfg, with_validation=True)
    validation = {r["id"] for r in splits.validation.records}
    train = {r["id"] for r in splits.train.records}
    assert len(validation) == 8 and all(i.startswith("tr-") for i in validation)
    assert not validation & train and len(train) == 42  # disjoint, and every other train record still trains
    capped = load_training_splits(DataSettings(source=str(tmp_path), num_train=20, num_eval=5, num_validation=8,
                                               validation_split=validation_split), with_validation=True)
    assert {r["id"] for r in capped.validation.records} == validation and len(capped.train.records) == 20
    assert not {r["id"] for r in capped.train.records} & validation
    assert splits.train.stats.held_out == 8
    again = load_training_splits(cfg, with_validation=True)
    assert {r["id"] for r in again.validation.records} == validation  # seeded: the same slice every time


@pytest.mark.parametrize("records, validation", [(10, 2), (4, 0)])
def test_a_slice_of_a_small_train_split_takes_at_most_a_fifth(tmp_path, records, validation):
    write_jsonl(tmp_path / "train.jsonl", "tr", records)
    write_jsonl(tmp_path / "test.jsonl", "te", 4)
    cfg = DataSettings(source=str(tmp_path), num_train=None, num_eval=2, num_validation=24)
    splits = load_training_splits(cfg, with_validation=True)
    assert (len(splits.validation.records) if splits.validation else 0) == validation  # none: no validation loss
    assert len(splits.train.records) == records - validation


def test_validation_from_the_eval_split_is_disjoint_from_the_eval_records(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", "tr", 20)
    write_jsonl(tmp_path / "validation.jsonl", "va", 30)
    cfg = DataSettings(source=str(tmp_path), eval_split="validation", num_train=None, num_eval=10, num_validation=12)
    splits = load_training_splits(cfg, with_validation=True)
    validation, evaluation = ({r["id"] for r in s.records} for s in (splits.validation, splits.eval))
    assert len(validation) == 12 and all(i.startswith("va-") for i in validation) and not validation & evaluation
    assert len(splits.train.records) == 20


@pytest.mark.parametrize("overrides, wanted", [(["train.eval_steps=0"], False), ([], True),
                                                (["train.eval_steps=0", "train.rouge_steps=10"], True)])
def test_validation_is_read_only_when_the_loss_or_rouge_uses_it(overrides, wanted):
    from phi2sum.validation import wants_validation

    cfg = load_config("tiny-cpu", overrides)
    assert wants_validation(cfg) is wanted
    assert (load_training_splits(cfg.data, with_validation=wants_validation(cfg)).validation is not None) is wanted


@pytest.mark.parametrize("override, named", [
    (["train.eval_steps=0", "train.keep_best=true"], "train.keep_best"),
    (["train.eval_steps=0", "train.early_stopping_patience=2"], "train.early_stopping_patience"),
    (["track=tensorboard,wandb"], "unknown: wandb"),
    (["train.rouge_steps=-1"], "train.rouge_steps"),
])
def test_validation_settings_that_cannot_work_are_one_line_errors(override, named):
    with pytest.raises(ConfigError, match=named):
        load_config("tiny-cpu", override)


# --- the best adapter and early stopping, on a real adapter ----------------------------------------------------


def test_best_adapter_is_kept_and_patience_stops_training(tmp_path):
    from transformers import TrainerControl, TrainerState

    from phi2sum.devices import resolve_device
    from phi2sum.model import attach_lora, load_base_model
    from phi2sum.validation import BEST_ADAPTER, ValidationWatch

    cfg = load_config("tiny-cpu", ["train.keep_best=true", "train.early_stopping_patience=2"])
    model = attach_lora(load_base_model(cfg, resolve_device(cfg), training=True), cfg)
    watch = ValidationWatch(cfg, str(tmp_path), rows=[])
    state, control = TrainerState(max_steps=100), TrainerControl()
    stops = []
    for step, loss in ((10, 3.0), (20, 2.0), (30, 2.5), (40, 1.9), (50, 2.2), (60, 2.3), (70, 1.0)):
        state.global_step = step
        first = next(p for n, p in model.named_parameters() if "lora_B" in n)
        first.data.fill_(step / 1000)  # each step's adapter is recognisable
        watch.on_evaluate(None, state, control, metrics={"eval_loss": loss}, model=model)
        stops.append(control.should_training_stop)
        if control.should_training_stop:
            break
    assert stops == [False, False, False, False, False, True]  # two evaluations without a lower loss after 40
    assert (watch.best_step, watch.best_loss, watch.stopped_at) == (40, 1.9, 60) and control.should_save
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / BEST_ADAPTER / "adapter_model.safetensors"))
    values = {round(float(t.flatten()[0]), 4) for n, t in saved.items() if "lora_B" in n}
    assert 0.04 in values  # the step-40 adapter, not a later one


def test_a_resumed_watch_continues_from_the_restored_rows(tmp_path):
    from phi2sum.validation import ValidationWatch

    cfg = load_config("tiny-cpu", ["train.early_stopping_patience=3"])
    rows = [{"kind": "eval", "step": 10, "eval_loss": 2.0}, {"kind": "train", "step": 15, "loss": 1.0},
            {"kind": "eval", "step": 20, "eval_loss": 2.4}]
    watch = ValidationWatch(cfg, str(tmp_path), rows)
    assert (watch.best_step, watch.best_loss, watch.since_best) == (10, 2.0, 1)


# --- one real run: crash, resume, and everything it logged ---------------------------------------------------


@pytest.mark.slow
def test_validation_rouge_and_trackers_survive_a_resumed_run(tmp_path, monkeypatch):
    """A local run evaluating every 2 steps and scoring ROUGE every 3 dies at step 5; the rerun resumes from
    checkpoint 4 and the train log, TensorBoard and MLflow each hold every evaluation exactly once."""
    pytest.importorskip("mlflow")
    pytest.importorskip("tensorboard")
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from phi2sum.local import run_local

    secret = "s3cr3t-canary-value"
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "unset-by-teardown")  # open_run sets it from storage.endpoint_url
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    overrides = [f"storage.output={tmp_path}", "run.name=val", "data.num_train=48", "data.num_validation=8",
                 "train.max_steps=6", "train.eval_steps=2", "train.save_steps=2", "train.logging_steps=1",
                 "train.rouge_steps=3", "train.rouge_documents=4", "train.keep_best=true", "generation.num_beams=1",
                 "generation.max_new_tokens=16", "track=tensorboard,mlflow",
                 f"storage.endpoint_url=http://user:{secret}@127.0.0.1:9"]
    monkeypatch.setenv("PHI2SUM_FAULT", "train_step@5")
    with pytest.raises(InjectedFault):
        run_local(load_config("tiny-cpu", overrides), stages=("train",))
    monkeypatch.delenv("PHI2SUM_FAULT")
    run = run_local(load_config("tiny-cpu", overrides), stages=("train",))

    rows = pq.read_table(run.path("train_log.parquet")).to_pylist()
    by_kind = {k: [r["step"] for r in rows if r["kind"] == k] for k in ("train", "eval", "rouge")}
    assert by_kind == {"train": [1, 2, 3, 4, 5, 6], "eval": [2, 4, 6], "rouge": [3, 6]}
    assert all(r["eval_loss"] > 0 for r in rows if r["kind"] == "eval")
    assert all(0 <= r["rougeL"] <= 1 and r["rouge_documents"] == 4 and r["rouge_seconds"] > 0
               for r in rows if r["kind"] == "rouge")
    train = run.stats["train"]
    best = min((r for r in rows if r["kind"] == "eval"), key=lambda r: r["eval_loss"])
    assert train["best_step"] == best["step"] and train["kept_adapter"]["step"] == best["step"]
    assert train["evaluations"] == 3 and set(train["rouge_at_steps"]) == {3, 6}

    events = EventAccumulator(run.path("tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("eval/loss")] == [2, 4, 6]
    assert [e.step for e in events.Scalars("eval/rougeL")] == [3, 6]
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2, 3, 4, 5, 6]  # the lost step 5 not doubled

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    experiment = client.get_experiment_by_name("phi2sum")
    (tracked,) = client.search_runs([experiment.experiment_id])  # the resumed run continued the same MLflow run
    assert tracked.info.run_name == "val" and tracked.info.status == "FINISHED"
    history = client.get_metric_history(tracked.info.run_id, "eval/loss")
    assert [m.step for m in history] == [2, 4, 6]
    assert [m.value for m in history] == pytest.approx([r["eval_loss"] for r in rows if r["kind"] == "eval"])
    assert [m.step for m in client.get_metric_history(tracked.info.run_id, "eval/rouge1")] == [3, 6]
    params = tracked.data.params
    assert params["train.eval_steps"] == "2" and params["model.base"] == "embedded:tiny-phi"
    assert not any(secret in v for v in params.values()) and params["storage.endpoint_url"].startswith("http://***@")

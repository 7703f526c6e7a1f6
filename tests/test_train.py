"""Training pieces: labels mask the prompt, the 4-bit path is real, non-finite loss stops, batch arithmetic."""

import math
import weakref
from types import SimpleNamespace

import pytest
import torch

from phi2sum.config import load_config
from phi2sum.demo import synthetic_records
from phi2sum.errors import TrainingError
from phi2sum.train import StepLog, build_trainer, grad_accum_steps, restore_adapter_dtype, train


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    cfg = load_config("tiny-cpu", ["train.max_steps=1"])
    return build_trainer(cfg, synthetic_records("train")[:8], str(tmp_path_factory.mktemp("out")))


def test_loss_is_on_summary_and_eos_only(prepared):
    tokenizer = prepared.trainer.processing_class
    row = prepared.trainer.train_dataset[0]
    labels, ids = row["labels"], row["input_ids"]
    first = next(i for i, label in enumerate(labels) if label != -100)
    assert tokenizer.decode(ids[:first]).endswith("### Summary:\n")  # the prompt carries no loss
    assert all(label == -100 for label in labels[:first])
    assert labels[first:] == ids[first:] and ids[-1] == tokenizer.eos_token_id  # summary + EOS carry loss
    assert tokenizer.decode(ids[first:-1]) == synthetic_records("train")[0]["summary"]


def test_adapters_are_fp32_after_build_trainer(prepared):
    """TRL casts a 4-bit model's trainable parameters to bf16; in fp16 (a T4) the GradScaler then has no kernel
    to unscale them and the first optimizer step crashes. build_trainer puts them back."""
    dtypes = {p.dtype for p in prepared.trainer.model.parameters() if p.requires_grad}
    assert dtypes == {torch.float32}


def test_adapters_stay_bf16_when_training_in_bf16():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4).to(torch.bfloat16))
    model[0].weight.requires_grad_(False)
    restore_adapter_dtype(model, torch.bfloat16)
    assert model[0].weight.dtype == torch.float32  # frozen: untouched
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.bfloat16}


def test_the_4bit_qlora_path_runs_on_cpu(prepared):
    import bitsandbytes as bnb

    model = prepared.trainer.model
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert 0 < prepared.trainable_params < prepared.total_params
    prepared.trainer.train()  # one real optimizer step through bitsandbytes NF4 + paged AdamW 8-bit on CPU
    assert prepared.trainer.state.global_step == 1 and prepared.step_log.rows


def test_non_finite_loss_stops_with_a_clear_message():
    log = StepLog()
    log.record(SimpleNamespace(global_step=1, epoch=0.1, num_input_tokens_seen=10), {"loss": 2.0})
    with pytest.raises(TrainingError, match="the loss became nan at step 2.*lower train.learning_rate"):
        log.record(SimpleNamespace(global_step=2, epoch=0.2, num_input_tokens_seen=20), {"loss": math.nan})
    with pytest.raises(TrainingError, match="gradient norm became inf"):
        log.record(SimpleNamespace(global_step=3, epoch=0.3, num_input_tokens_seen=30), {"loss": 1.0, "grad_norm": math.inf})
    # fp16: an infinite gradient norm is the GradScaler skipping a step, not divergence
    log.record(SimpleNamespace(global_step=4, epoch=0.4, num_input_tokens_seen=40), {"loss": 1.0, "grad_norm": math.inf},
               fp16=True)
    assert [r["step"] for r in log.rows] == [1, 4]


def test_a_diverging_run_stops_and_saves_no_adapter(tmp_path):
    """A real divergence on CPU: the Trainer's NaN filter used to log loss 0.0 and the run saved NaN weights."""
    cfg = load_config("tiny-cpu", ["train.max_steps=6", "train.batch_size=2", "train.grad_accum=1",
                                   "train.learning_rate=1e30", "train.logging_steps=1", "train.save_steps=3",
                                   "train.warmup_steps=0", "train.max_grad_norm=0"])
    with pytest.raises(TrainingError, match="training diverged"):
        train(cfg, synthetic_records("train")[:12], str(tmp_path / "out"), adapter_dir=str(tmp_path / "adapter"))
    assert not (tmp_path / "adapter").exists()
    assert not list((tmp_path / "out").glob("checkpoint-*"))  # nothing a rerun would resume from


def test_keep_effective_batch_divides_accumulation():
    cfg = load_config("phi2-xsum-t4", ["train.keep_effective_batch=true"])
    assert [grad_accum_steps(cfg, w) for w in (1, 2, 4, 8)] == [8, 4, 2, 1]
    assert grad_accum_steps(load_config("phi2-xsum-t4"), 4) == 8  # off by default: batch grows with workers
    with pytest.raises(TrainingError, match="not divisible by 3"):
        grad_accum_steps(cfg, 3)


def test_training_frees_its_model_before_returning(tmp_path):
    """TRL's fused forward leaves the trained model in a reference cycle: without a collection at the end of
    train(), local mode would summarize with the training model still on the GPU."""
    from transformers import TrainerCallback

    seen = []

    class Grab(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kwargs):
            base = model.get_base_model()  # what TRL patches, and what holds the weights
            weight = next(p for n, p in base.named_parameters() if n.endswith("q_proj.base_layer.weight"))
            seen.extend([weakref.ref(model), weakref.ref(base), weakref.ref(weight)])  # weight: 4-bit, the bulk

    import gc

    cfg = load_config("tiny-cpu", ["train.max_steps=1", "train.batch_size=2", "train.grad_accum=1"])
    gc.disable()  # the cycle collector would otherwise run at some allocation or other: only train()'s may count
    try:
        result = train(cfg, synthetic_records("train")[:4], str(tmp_path), callbacks=(Grab(),))
        assert result.steps == 1 and seen
        assert [ref() is None for ref in seen] == [True, True, True]
    finally:
        gc.enable()


def test_auto_micro_batch_on_cpu_and_length_grouping_cut_padding(tmp_path):
    """batch_size=auto on CPU: the measured best micro-batch that divides grad_accum, the product unchanged; and
    batches of similar lengths pad less than random ones (counted in the real trainer's collator, micro-batch 4)."""
    from phi2sum.train import CPU_MICRO_BATCH, micro_batch

    cfg = load_config("tiny-cpu", ["train.batch_size=auto", "train.grad_accum=8"])
    assert micro_batch(cfg, torch.device("cpu")) == (CPU_MICRO_BATCH, 8 // CPU_MICRO_BATCH)
    records = synthetic_records("train")[:32]
    fractions = {}
    for grouped in (True, False):
        c = load_config("tiny-cpu", ["train.batch_size=4", "train.grad_accum=2", "train.max_steps=4",
                                     f"train.group_by_length={str(grouped).lower()}"])
        result = train(c, records, str(tmp_path / str(grouped)))
        assert (result.micro_batch, result.grad_accum, result.effective_batch) == (4, 2, 8)
        fractions[grouped] = result.padding_fraction
    assert fractions[True] < fractions[False]

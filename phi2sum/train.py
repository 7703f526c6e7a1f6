"""Training: QLoRA supervised fine-tuning with TRL's `SFTTrainer`.

The examples are tokenized by `phi2sum.prompt` (document truncated, summary + EOS kept, loss mask on the
summary) and handed to TRL already processed, so TRL's own truncation never cuts a summary. The same
`train()` runs in local mode and inside every Ray Train worker; Ray adds its callbacks and a checkpoint to
resume from.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from phi2sum.adapters import dequantize_per_matmul
from phi2sum.config import Config
from phi2sum.errors import DataError, TrainingError
from phi2sum.faults import maybe_fail
from phi2sum.devices import compute_dtype, free_memory, resolve_device
from phi2sum.model import attach_lora, count_parameters, load_base_model, load_tokenizer
from phi2sum.plan import largest_train_batch, split_micro_batch
from phi2sum.prompt import encode_example
from phi2sum.tracking import Trackers, TrackTarget
from phi2sum.validation import RougeAtSteps, ValidationWatch, restore_best_adapter

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    adapter_dir: str  # local folder with the final PEFT adapter (and tokenizer)
    log: list[dict[str, Any]]  # one row per logging step
    steps: int
    seconds: float
    tokens: int  # non-padding tokens seen by this worker
    trainable_params: int
    total_params: int
    examples: dict[str, int] = field(default_factory=dict)  # used / truncated / skipped_too_long
    effective_batch: int = 0
    micro_batch: int = 0
    grad_accum: int = 0
    padding_fraction: float = 0.0  # pad tokens / all tokens in the training batches
    stopped_early_at: int | None = None  # the step early stopping ended training at


def tokenize_records(tokenizer, cfg: Config, records: list[dict[str, str]]):
    """A `datasets.Dataset` of `input_ids` + `completion_mask`, plus counts of truncated and skipped examples."""
    import datasets

    rows, truncated, too_long = [], 0, 0
    for record in records:
        example = encode_example(tokenizer, cfg.prompt.template, record["document"], record["summary"],
                                 cfg.prompt.max_length, cfg.prompt.chat_template)
        if example is None:
            too_long += 1
            continue
        truncated += example["truncated"]
        rows.append({"input_ids": example["input_ids"], "completion_mask": example["completion_mask"]})
    if not rows:
        raise DataError(f"no training example fits prompt.max_length={cfg.prompt.max_length} (every summary is "
                        "too long); raise prompt.max_length")
    if too_long:
        log.warning("skipped %d example(s) whose summary alone exceeds prompt.max_length", too_long)
    counts = {"used": len(rows), "truncated": int(truncated), "skipped_too_long": too_long}
    return datasets.Dataset.from_list(rows), counts


def grad_accum_steps(cfg: Config, world_size: int) -> int:
    """With `train.keep_effective_batch`, scaling out divides accumulation so the effective batch stays put."""
    if not cfg.train.keep_effective_batch or world_size == 1:
        return cfg.train.grad_accum
    if cfg.train.grad_accum % world_size:
        raise TrainingError(f"train.grad_accum={cfg.train.grad_accum} is not divisible by {world_size} workers; "
                            "pick a multiple or set train.keep_effective_batch=false")
    return cfg.train.grad_accum // world_size


DIVERGED = ("lower train.learning_rate (now {lr:g}) or train.max_grad_norm; in fp16 (a T4) set model.dtype=float32 "
            "to rule out overflow")


STEP_LOG_FILE = "phi2sum_step_log_rank{rank}.json"  # each worker's rows, inside every checkpoint


class StepLog:
    """A TrainerCallback keeping one row per logged step, stopping a run that diverged.

    Rows are of three kinds: `train` (loss, learning rate, grad norm, tokens, seconds), `eval` (the validation
    loss, rank 0 only: every worker sees the same gathered value) and `rouge` (added by
    `phi2sum.validation.RougeAtSteps`). Each checkpoint carries the rows so far, so a resumed run keeps its
    history; `listeners` (the experiment trackers) get every row as it is added.

    Divergence is read from the raw logged loss and grad norm (the Trainer's `logging_nan_inf_filter`, which would
    hide a NaN loss behind the average of earlier ones, is off: see `sft_config`), and a checkpoint is never saved
    with non-finite adapter weights. In fp16 a non-finite gradient norm alone is not divergence: the GradScaler
    skips that step and lowers its scale.
    """

    def __init__(self, worker: int = 0):
        from transformers import TrainerCallback

        self.rows: list[dict[str, Any]] = []
        self.worker = worker
        self.listeners: list[Any] = []  # objects with log_row(row)
        self.start = time.time()
        self.offset = 0.0  # seconds already spent before a resume
        outer = self

        class _Callback(TrainerCallback):
            def on_train_begin(self, args, state, control, **kwargs):
                outer.start = time.time()
                outer.offset = outer.rows[-1]["seconds"] if outer.rows else 0.0

            def on_log(self, args, state, control, logs=None, **kwargs):
                outer.record(state, logs or {}, fp16=args.fp16, learning_rate=args.learning_rate)

            def on_step_end(self, args, state, control, model=None, **kwargs):
                maybe_fail("train_step", state.global_step)  # test-only fault injection; a no-op otherwise
                if control.should_save:  # before the Trainer writes the checkpoint a resume would start from
                    check_finite_adapter(model, state.global_step, args.learning_rate)

            def on_save(self, args, state, control, **kwargs):
                folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
                if os.path.isdir(folder):
                    outer.save_to(folder)

        self.callback = _Callback()

    def elapsed(self) -> float:
        """Seconds spent training so far, across resumed attempts (start-up and model loading excluded)."""
        return round(self.offset + time.time() - self.start, 3)

    def add(self, state, kind: str, **values: Any) -> dict[str, Any]:
        """A row of `kind` at the current step, handed to every listener."""
        row = {"worker": self.worker, "kind": kind, "step": int(state.global_step), "epoch": float(state.epoch or 0.0),
               "tokens": int(state.num_input_tokens_seen), "seconds": self.elapsed(), **values}
        self.rows.append(row)
        for listener in self.listeners:
            listener.log_row(row)
        return row

    def record(self, state, logs: dict[str, Any], fp16: bool = False, learning_rate: float = 0.0) -> None:
        if "eval_loss" in logs:
            if self.worker == 0:
                self.add(state, "eval", eval_loss=float(logs["eval_loss"]))
            return
        if "loss" not in logs:
            return
        loss = float(logs["loss"])
        grad_norm = float(logs["grad_norm"]) if logs.get("grad_norm") is not None else float("nan")
        if not math.isfinite(loss) or (not fp16 and "grad_norm" in logs and not math.isfinite(grad_norm)):
            what = f"loss became {loss}" if not math.isfinite(loss) else f"gradient norm became {grad_norm}"
            raise TrainingError(f"training diverged: the {what} at step {state.global_step}; "
                                + DIVERGED.format(lr=learning_rate))
        self.add(state, "train", loss=loss, learning_rate=float(logs.get("learning_rate", 0.0)), grad_norm=grad_norm)

    def save_to(self, checkpoint: str) -> None:
        with open(os.path.join(checkpoint, STEP_LOG_FILE.format(rank=self.worker)), "w", encoding="utf-8") as f:
            json.dump(self.rows, f)

    def restore_from(self, checkpoint: str) -> None:
        """The rows as of `checkpoint` (those of the lost steps after it are dropped; a resume redoes them)."""
        path = os.path.join(checkpoint, STEP_LOG_FILE.format(rank=self.worker))
        step = checkpoint_step(checkpoint)
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                self.rows = [{"kind": "train", **r} for r in json.load(f) if step is None or r["step"] <= step]


def checkpoint_step(checkpoint: str) -> int | None:
    """The optimizer step a Hugging Face checkpoint folder was saved at (trainer_state.json)."""
    path = os.path.join(checkpoint, "trainer_state.json")
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        return int(json.load(f)["global_step"])


def check_finite_adapter(model, step: int, learning_rate: float) -> None:
    """Refuse to save (or export) adapter weights that are NaN or infinite: such an adapter only produces garbage."""
    bad = [name for name, p in model.named_parameters() if p.requires_grad and not torch.isfinite(p).all()]
    if bad:
        raise TrainingError(f"training diverged: {len(bad)} adapter weight tensor(s) are not finite at step {step} "
                            f"(e.g. {bad[0]}), so nothing is saved; " + DIVERGED.format(lr=learning_rate))


# train.batch_size=auto on CPU: 1, the measured best. A CPU's matmuls are already compute-bound at one 384-token
# sequence, so larger micro-batches only add padding (tests/benchmarks/bench_train.py: 1x8 121 tok/s, 2x4 86, 4x2 67).
CPU_MICRO_BATCH = 1


def micro_batch(cfg: Config, device: torch.device, world_size: int = 1) -> tuple[int, int]:
    """(micro-batch, gradient accumulation) per device.

    With `train.batch_size: auto`, `grad_accum` is the examples per optimizer step per worker and is split into the
    largest micro-batch that fits this device (the planner's estimate on a GPU, CPU_MICRO_BATCH on a CPU) and
    divides it, with the accumulation that keeps the product: the optimisation is unchanged, the device busier.
    """
    accum = grad_accum_steps(cfg, world_size)
    if cfg.train.batch_size != "auto":
        return int(cfg.train.batch_size), accum
    if device.type != "cuda":
        return split_micro_batch(accum, CPU_MICRO_BATCH)
    return split_micro_batch(accum, largest_train_batch(cfg, torch.cuda.get_device_properties(device).total_memory))


class PaddingCount:
    """Wraps the trainer's data collator to count pad tokens in the training batches (summary.json reports the
    share, which `train.group_by_length` keeps low)."""

    def __init__(self, collate):
        self.collate, self.padding, self.total = collate, 0, 0

    def __call__(self, examples):
        lengths = [len(e["input_ids"]) for e in examples]
        self.padding += max(lengths) * len(lengths) - sum(lengths)
        self.total += max(lengths) * len(lengths)
        return self.collate(examples)

    @property
    def fraction(self) -> float:
        return round(self.padding / max(self.total, 1), 4)


def sft_config(cfg: Config, output_dir: str, device: torch.device, world_size: int = 1, evaluate: bool = False,
               **extra):
    """TRL's SFTConfig from our config; every default that matters is set explicitly (TRL's differ).

    `evaluate`: the validation loss every `train.eval_steps` steps and at the end (the Trainer's own evaluation,
    on the summary tokens like the training loss, gathered over workers)."""
    from trl import SFTConfig

    dtype = compute_dtype(cfg, device)
    t = cfg.train
    micro, accum = micro_batch(cfg, device, world_size)
    return SFTConfig(
        output_dir=output_dir,
        num_train_epochs=t.epochs,
        max_steps=t.max_steps,
        per_device_train_batch_size=micro,
        gradient_accumulation_steps=accum,
        train_sampling_strategy="group_by_length" if t.group_by_length else "random",
        learning_rate=t.learning_rate,
        lr_scheduler_type=t.lr_scheduler,
        warmup_steps=t.warmup_steps,
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        optim=t.optim,
        logging_steps=t.logging_steps,
        logging_first_step=True,
        save_strategy="steps",
        save_steps=t.save_steps,
        save_total_limit=t.save_total_limit,
        seed=t.seed,
        data_seed=t.seed,
        fp16=device.type == "cuda" and dtype == torch.float16,
        bf16=device.type == "cuda" and dtype == torch.bfloat16,
        use_cpu=device.type == "cpu",
        gradient_checkpointing=cfg.model.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False},
        ddp_find_unused_parameters=False,
        max_length=cfg.prompt.max_length,
        completion_only_loss=True,
        packing=False,
        include_num_input_tokens_seen="non_padding",
        logging_nan_inf_filter=False,  # the raw loss, so StepLog sees a NaN instead of an average hiding it
        report_to="none",
        dataloader_pin_memory=device.type == "cuda",
        disable_tqdm=extra.pop("disable_tqdm", False),
        eval_strategy="steps" if evaluate else "no",
        eval_steps=t.eval_steps if evaluate else None,
        per_device_eval_batch_size=micro,
        prediction_loss_only=True,
        **extra,
    )


@dataclass
class PreparedTrainer:
    trainer: Any  # trl.SFTTrainer
    step_log: StepLog
    examples: dict[str, int]
    trainable_params: int
    total_params: int
    effective_batch: int
    padding: PaddingCount  # wraps the trainer's collator
    watch: ValidationWatch  # best validation loss, early stopping


def build_trainer(cfg: Config, records: list[dict[str, str]], output_dir: str, *, device: torch.device | None = None,
                  callbacks: tuple = (), world_size: int = 1, worker: int = 0, step_log: StepLog | None = None,
                  validation: list[dict[str, str]] | None = None, **sft_overrides) -> PreparedTrainer:
    """Tokenizer, QLoRA model, examples and an SFTTrainer ready to train (tests inspect it without training).

    `validation` records feed the validation loss (`train.eval_steps`) and ROUGE at checkpoints
    (`train.rouge_steps`); without them neither runs."""
    from trl import SFTTrainer

    device = device or resolve_device(cfg)
    tokenizer = load_tokenizer(cfg, padding_side="right")
    dataset, counts = tokenize_records(tokenizer, cfg, records)
    evaluate = bool(validation) and cfg.train.eval_steps > 0
    eval_dataset = tokenize_records(tokenizer, cfg, validation)[0] if evaluate else None
    model = attach_lora(load_base_model(cfg, device, training=True), cfg)
    if cfg.quantization.load_in_4bit:  # the validation forwards must not repack the weights training uses
        dequantize_per_matmul(model)
    trainable, total = count_parameters(model)
    args = sft_config(cfg, output_dir, device, world_size, evaluate=evaluate, **sft_overrides)
    effective = args.per_device_train_batch_size * args.gradient_accumulation_steps * world_size
    log.info("training %d examples on %s: %s trainable of %s parameters (%.2f%%), effective batch %d "
             "(%d per device x %d accumulation x %d worker(s))%s", len(dataset), device, f"{trainable:,}",
             f"{total:,}", 100 * trainable / max(total, 1), effective, args.per_device_train_batch_size,
             args.gradient_accumulation_steps, world_size,
             f"; validation loss on {len(eval_dataset)} examples every {cfg.train.eval_steps} steps" if evaluate else "")
    steps = step_log or StepLog(worker)
    watch = ValidationWatch(cfg, output_dir, steps.rows)
    extra = [watch] if evaluate else []
    if validation and cfg.train.rouge_steps > 0:
        extra.append(RougeAtSteps(cfg, validation, steps.add, rank=worker, world=world_size))
    trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, eval_dataset=eval_dataset,
                         processing_class=tokenizer, callbacks=[steps.callback, *extra, *callbacks])
    restore_adapter_dtype(trainer.model, torch.bfloat16 if args.bf16 else torch.float32)
    trainer.data_collator = padding = PaddingCount(trainer.data_collator)
    return PreparedTrainer(trainer, steps, counts, trainable, total, effective, padding, watch)


def restore_adapter_dtype(model, dtype: torch.dtype) -> None:
    """Put the trainable (LoRA) parameters back in `dtype`: fp32, unless training in bf16.

    TRL's SFTTrainer casts every trainable parameter of a quantized model to bf16, whatever the run's precision.
    With fp16 mixed precision (the T4) accelerate's GradScaler then unscales bf16 gradients, for which CUDA has
    no kernel (`_amp_foreach_non_finite_check_and_unscale_ ... not implemented for 'BFloat16'`), so the first
    optimizer step crashes; on CPU the adapters would silently train in bf16. The optimizer is built later, in
    `train()`, so it sees the restored parameters.
    """
    for param in model.parameters():
        if param.requires_grad and param.dtype != dtype:
            param.data = param.data.to(dtype)


def train(cfg: Config, records: list[dict[str, str]], output_dir: str, *,
          resume_from_checkpoint: str | bool | None = None, adapter_dir: str | None = None,
          track_to: TrackTarget | None = None, **build_kwargs) -> TrainResult:
    """Fine-tune LoRA adapters on `records`; checkpoints go to `output_dir`, the adapter to `adapter_dir`.

    A resumed run starts from the checkpoint's rows and best adapter. With `train.keep_best` the exported
    adapter is the one of the lowest validation loss, else the last step's. `track_to`: the run the trackers
    in `track:` log to (rank 0 only)."""
    resume = _resume_path(output_dir, resume_from_checkpoint)
    trackers = None
    if track_to and cfg.track and build_kwargs.get("worker", 0) == 0:
        trackers = Trackers(cfg, track_to, checkpoint_step(resume) if resume else None)
        build_kwargs["callbacks"] = (*build_kwargs.get("callbacks", ()), trackers)
    prepared = build_trainer(cfg, records, output_dir, **build_kwargs)
    if resume:
        prepared.step_log.restore_from(resume)
        prepared.watch.restore(prepared.step_log.rows)
        restore_best_adapter(resume, output_dir)
    else:
        shutil.rmtree(prepared.watch.folder, ignore_errors=True)  # a failed attempt's, from before any checkpoint
    if trackers:
        prepared.step_log.listeners.append(trackers)
    trainer = prepared.trainer
    started = time.time()
    try:
        trainer.train(resume_from_checkpoint=resume)
    finally:
        if trackers:
            trackers.close("FINISHED" if trainer.state.global_step >= trainer.state.max_steps
                           or prepared.watch.stopped_at else "FAILED")
    seconds = time.time() - started
    adapter_dir = adapter_dir or os.path.join(output_dir, "adapter")
    check_finite_adapter(trainer.model, int(trainer.state.global_step), cfg.train.learning_rate)
    if trainer.is_world_process_zero():
        save_adapter(trainer, prepared.watch, adapter_dir, cfg.train.keep_best)
    result = TrainResult(
        adapter_dir=adapter_dir, log=prepared.step_log.rows, steps=int(trainer.state.global_step), seconds=seconds,
        tokens=int(trainer.state.num_input_tokens_seen), trainable_params=prepared.trainable_params,
        total_params=prepared.total_params, examples=prepared.examples, effective_batch=prepared.effective_batch,
        micro_batch=trainer.args.per_device_train_batch_size, grad_accum=trainer.args.gradient_accumulation_steps,
        padding_fraction=prepared.padding.fraction, stopped_early_at=prepared.watch.stopped_at,
    )
    del trainer, prepared
    free_memory()
    return result


def _resume_path(output_dir: str, resume_from_checkpoint: str | bool | None) -> str | None:
    """`True` (local mode's "resume if you can") -> the last checkpoint folder in `output_dir`."""
    if resume_from_checkpoint is True:
        from transformers.trainer_utils import get_last_checkpoint

        return get_last_checkpoint(output_dir) if os.path.isdir(output_dir) else None
    return resume_from_checkpoint or None


def save_adapter(trainer, watch: ValidationWatch, adapter_dir: str, keep_best: bool) -> None:
    """The adapter to export (PEFT format) with the tokenizer: the best one with `keep_best`, else the last."""
    if keep_best and os.path.isdir(watch.folder):
        shutil.copytree(watch.folder, adapter_dir, dirs_exist_ok=True)
        log.info("exporting the best adapter: validation loss %.4f at step %s", watch.best_loss, watch.best_step)
    else:
        trainer.save_model(adapter_dir)  # adapter weights + adapter_config.json only (PEFT format)
    trainer.processing_class.save_pretrained(adapter_dir)

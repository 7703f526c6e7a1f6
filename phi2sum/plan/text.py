"""The `phi2sum plan` report: every number for one config on one card (`Plan`), and its text.

Why a separate step from the estimates: the report asks the same estimates several times (the config as
given, gradient checkpointing switched the other way, the largest batches that fit) and turns them into a
verdict with the overrides that would make a config fit.
"""

from __future__ import annotations

from dataclasses import dataclass

from phi2sum.config import Config, prompt_token_budget
from phi2sum.plan.gpus import GIB, GPU, MIB, SAFETY_MARGIN, resolve_gpu, usable_bytes
from phi2sum.plan.memory import (Estimate, fitting_generation_batch, generation_memory, largest_batch, lora_parameters,
                                 merged_generation, split_micro_batch, train_memory)
from phi2sum.plan.shapes import ModelShape, model_shape
from phi2sum.plan.speed import train_flops_per_token

SEARCH_LIMIT = 1024  # the largest batch the report looks for


@dataclass
class Plan:
    gpu: GPU
    shape: ModelShape
    source: str
    budget: float
    micro_batch: int  # what the job trains with on this card (train.batch_size, or auto's choice)
    grad_accum: int
    train: Estimate
    train_other_checkpointing: Estimate  # the same training with gradient checkpointing switched the other way
    generation: Estimate
    generation_other_weights: Estimate  # the same generation on the other weights (merged <-> 4-bit)
    merged: bool  # the summarize job generates on merged weights (generation.weights)
    generation_batch: int
    max_train_batch: int
    max_generation_batch: int
    flops_per_token: float

    @property
    def train_fits(self) -> bool:
        return self.train.total <= self.budget

    @property
    def generation_fits(self) -> bool:
        return self.generation.total <= self.budget

    @property
    def fits(self) -> bool:
        return self.train_fits and self.generation_fits

    @property
    def tokens_per_s_ceiling(self) -> float:
        return self.gpu.peak_tflops * 1e12 / self.flops_per_token


def plan(cfg: Config, gpu: str = "T4", model_config: str | None = None) -> Plan:
    card = resolve_gpu(gpu)
    shape, source = model_shape(cfg, model_config)
    budget = usable_bytes(card.memory_bytes)
    merged = merged_generation(shape, cfg, card.memory_bytes)
    gen_batch = cfg.generation.batch_size or fitting_generation_batch(shape, cfg, budget, merged)
    max_train = largest_batch(lambda b: train_memory(shape, cfg, b).total, budget, SEARCH_LIMIT)
    micro, accum = split_micro_batch(cfg.train.grad_accum, max_train) if cfg.train.batch_size == "auto" else \
        (cfg.train.batch_size, cfg.train.grad_accum)
    return Plan(
        gpu=card, shape=shape, source=source, budget=budget, micro_batch=micro, grad_accum=accum,
        train=train_memory(shape, cfg, micro),
        train_other_checkpointing=train_memory(shape, cfg, gradient_checkpointing=not cfg.model.gradient_checkpointing),
        generation=generation_memory(shape, cfg, gen_batch, merged),
        generation_other_weights=generation_memory(shape, cfg, gen_batch, not merged),
        merged=merged,
        generation_batch=gen_batch,
        max_train_batch=max_train,
        max_generation_batch=largest_batch(lambda b: generation_memory(shape, cfg, b, merged).total, budget,
                                           SEARCH_LIMIT),
        flops_per_token=train_flops_per_token(shape, cfg.prompt.max_length, cfg.model.gradient_checkpointing),
    )


def _size(n: float) -> str:
    return f"{n / GIB:.2f} GiB" if n >= 1000 * MIB else f"{n / MIB:.1f} MiB"


def _table(estimate: Estimate) -> list[str]:
    width = max(len(label) for label in estimate.parts)
    lines = [f"  {label:<{width}}  {_size(n):>10}" for label, n in estimate.parts.items() if n]
    return lines + [f"  {'total':<{width}}  {_size(estimate.total):>10}"]


def _largest(n: int) -> str:
    return {0: "none (even 1 does not fit)", SEARCH_LIMIT: f"{SEARCH_LIMIT} or more"}.get(n, str(n))


def _verdict(p: Plan, cfg: Config) -> str:
    where = f"on one {p.gpu.name} ({_size(p.budget)} usable)"
    if p.fits:
        return f"FITS {where}: training {_size(p.train.total)}, generation {_size(p.generation.total)} per worker"
    problems = []
    if not p.train_fits:
        fixes = [f"train.batch_size={p.max_train_batch}"] if p.max_train_batch else []
        fixes += [] if cfg.model.gradient_checkpointing else ["model.gradient_checkpointing=true"]
        fixes += ["a smaller prompt.max_length"]
        problems.append(f"training needs {_size(p.train.total)} (try {', '.join(fixes)})")
    if not p.generation_fits:
        fixes = [f"generation.batch_size={p.max_generation_batch}"] if p.max_generation_batch else []
        fixes += ["fewer generation.num_beams", "a smaller generation.max_prompt_tokens"]
        problems.append(f"generation needs {_size(p.generation.total)} (try {', '.join(fixes)})")
    return f"DOES NOT FIT {where}: " + "; ".join(problems)


def main_text(cfg: Config, gpu: str = "T4", model_config: str | None = None) -> str:
    """The `phi2sum plan` report: per-worker memory for training and summarizing, limits, speed ceiling, verdict."""
    p = plan(cfg, gpu, model_config)
    s, t, g = p.shape, cfg.train, cfg.generation
    seq, workers, ckpt = cfg.prompt.max_length, cfg.ray.num_workers, cfg.model.gradient_checkpointing
    total, lora = s.num_parameters(), lora_parameters(s, cfg)
    quantized = f"{s.quantized_parameters():,} in 4-bit linears" if cfg.quantization.load_in_4bit else "not quantized"
    lines = [
        f"phi2sum plan: {cfg.model.base} on a {p.gpu.name} ({_size(p.gpu.memory_bytes)}, {p.gpu.peak_tflops:g} "
        f"TFLOP/s {'bf16/fp16' if p.gpu.bf16 else 'fp16 (no bf16)'} peak)",
        f"architecture: {p.source}: {s.num_layers} layers, hidden {s.hidden_size}, MLP {s.intermediate_size}, "
        f"{s.num_heads} heads, vocab {s.vocab_size}",
        f"parameters: {total:,} ({quantized}); LoRA r={cfg.lora.r} on {','.join(cfg.lora.target_modules)}: "
        f"{lora:,} trainable ({100 * lora / total:.2f}%)",
        f"memory is per worker: each of the {workers} Ray worker(s) holds a full copy of the model",
        "",
        f"training: micro-batch {p.micro_batch} x {seq} tokens, grad_accum {p.grad_accum}, {t.optim}"
        + (" (train.batch_size=auto)" if t.batch_size == "auto" else ""),
        *_table(p.train),
        f"  ({'without' if ckpt else 'with'} gradient checkpointing: {_size(p.train_other_checkpointing.total)})",
        f"  largest micro-batch that fits: {_largest(p.max_train_batch)}",
        f"  speed ceiling: {p.tokens_per_s_ceiling:,.0f} tokens/s per worker at 100% of peak "
        f"({p.flops_per_token / 1e9:.3g} GFLOP/token: forward + activation-gradient backward"
        f"{' + recomputed forward' if ckpt else ''}); real QLoRA runs reach a fraction of it",
    ]
    if cfg.data.num_train:
        minutes = cfg.data.num_train * seq * t.epochs / (p.tokens_per_s_ceiling * workers) / 60
        lines.append(f"  at that ceiling {t.epochs:g} epoch(s) of {cfg.data.num_train} examples x <= {seq} tokens "
                     f"take >= {minutes:.1f} min")
    chosen = "" if g.batch_size else " (generation.batch_size is null: the summarize job picks this)"
    lines += [
        "",
        f"generation: batch {p.generation_batch}{chosen} x {g.num_beams} beams x "
        f"({prompt_token_budget(cfg)} prompt + {g.max_new_tokens} new) tokens",
        *_table(p.generation),
        *([f"  ({'on 4-bit weights with the adapter unmerged' if p.merged else 'on merged weights'}: "
           f"{_size(p.generation_other_weights.total)}; generation.weights={cfg.generation.weights})"]
          if cfg.quantization.load_in_4bit else []),
        f"  largest generation batch that fits: {_largest(p.max_generation_batch)}",
        "",
        f"budget: {_size(p.gpu.memory_bytes)} less a {SAFETY_MARGIN:.0%} safety margin = {_size(p.budget)}",
        _verdict(p, cfg),
    ]
    return "\n".join(lines)

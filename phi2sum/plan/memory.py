"""GPU memory of one worker: what PyTorch's allocator holds while training and while beam-search summarizing.

What it assumes (each number below is an estimate of what PyTorch's allocator holds, plus a stated constant
for what it does not):

- Weights. bitsandbytes quantizes every `nn.Linear` of the decoder layers to 4-bit (0.5 byte/param) with one
  absmax constant per block of 64 weights, stored in 8 bits with double quant (plus one fp32 constant per 256
  blocks, a 256-entry fp32 code table, a 16-entry NF4 table and an fp32 offset per tensor). transformers keeps
  `lm_head` (the output embedding), the input embedding, LayerNorms and all biases unquantized in the compute
  dtype; for training, `peft.prepare_model_for_kbit_training` upcasts those to fp32.
- LoRA adapters are fp32, with fp32 gradients and the optimizer state (2 bytes/param for the 8-bit AdamW,
  8 for a 32-bit one); DDP (more than one Ray worker) keeps one more copy of the gradients in its buckets.
- Activations, logits, the KV cache: see `layer_activation_bytes`, `train_memory` and `generation_memory`.
- CUDA context and libraries live outside PyTorch's allocator: `CUDA_CONTEXT_BYTES`. A config fits when the
  total stays under the card's memory less `SAFETY_MARGIN` (allocator fragmentation, stray buffers).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from phi2sum.config import Config, prompt_token_budget
from phi2sum.errors import ConfigError
from phi2sum.model import ALL_LINEAR
from phi2sum.model import lora_targets as lora_target_names
from phi2sum.plan.gpus import MIB, resolve_gpu, usable_bytes
from phi2sum.plan.shapes import ModelShape, model_shape

CUDA_CONTEXT_BYTES = 512 * MIB  # CUDA context, cuBLAS/cuDNN workspaces, bitsandbytes kernels: outside the allocator
CPU_GENERATION_BATCH = 8  # no GPU to size for: a batch that keeps beam search responsive on a CPU
MAX_GENERATION_BATCH = 64  # larger batches add little throughput and make a failed batch costly to redo

NF4_BLOCKSIZE = 64  # weights per absmax constant
NESTED_BLOCKSIZE = 256  # absmax constants per second-level fp32 constant (double quant)
LOGITS_COPIES_TRAIN = 3  # fp32 logits for the loss, the log-softmax cross-entropy saves, and their gradient
LOGITS_COPIES_BEAM = 4  # per beam step: fp32 logits, log-probs, scores + log-probs, top-k workspace

CONTEXT = "CUDA context + libraries"  # the Estimate part outside PyTorch's allocator


@dataclass
class Estimate:
    """Bytes per component, in report order; `allocated` is what `torch.cuda.max_memory_allocated` can see."""

    parts: dict[str, int]

    @property
    def total(self) -> int:
        return sum(self.parts.values())

    @property
    def allocated(self) -> int:
        return self.total - self.parts.get(CONTEXT, 0)


def compute_bytes(cfg: Config) -> int:
    """Bytes per element in the compute dtype: fp16 or bf16 on GPUs unless the config forces fp32."""
    return 4 if cfg.model.dtype == "float32" else 2


def quant_constant_bytes(numel: int, double_quant: bool) -> int:
    """bitsandbytes' 4-bit quantization state of one weight tensor (absmax constants and code tables)."""
    blocks = math.ceil(numel / NF4_BLOCKSIZE)
    code = 16 * 4  # the NF4/FP4 code table, fp32
    if not double_quant:
        return blocks * 4 + code
    second_level = math.ceil(blocks / NESTED_BLOCKSIZE) * 4 + 256 * 4 + 4  # fp32 absmax, 8-bit code, offset
    return blocks + second_level + code


def weight_parts(shape: ModelShape, cfg: Config, training: bool) -> dict[str, int]:
    c = compute_bytes(cfg)
    if not cfg.quantization.load_in_4bit:
        return {f"weights ({8 * c}-bit)": shape.num_parameters() * c}
    tensors = shape.quantized_tensors()
    other = 4 if training else c  # prepare_model_for_kbit_training upcasts the unquantized weights to fp32
    return {
        "4-bit weights": sum((n + 1) // 2 for n in tensors),
        "4-bit quantization constants": sum(quant_constant_bytes(n, cfg.quantization.double_quant) for n in tensors),
        f"unquantized weights ({8 * other}-bit: embeddings, lm_head, norms, biases)":
            (shape.num_parameters() - shape.quantized_parameters()) * other,
    }


def lora_targets(shape: ModelShape, cfg: Config) -> dict[str, tuple[int, int]]:
    """The (in, out) shapes of the linears LoRA wraps in each layer."""
    linears = shape.linear_shapes()
    wanted = lora_target_names(cfg.lora.target_modules, shape.model_type)
    if wanted == [ALL_LINEAR]:
        return dict(linears)
    unknown = [name for name in wanted if name not in linears]
    if unknown:
        raise ConfigError(f"lora.target_modules {cfg.lora.target_modules}: {', '.join(unknown)} match none of the "
                          f"{shape.model_type} linear layers ({', '.join(linears)}); use auto, all-linear or those")
    return {name: linears[name] for name in wanted}


def lora_parameters(shape: ModelShape, cfg: Config) -> int:
    return shape.num_layers * sum(cfg.lora.r * (i + o) for i, o in lora_targets(shape, cfg).values())


def optimizer_state_bytes(optim: str) -> int:
    """Bytes of optimizer state per trainable parameter: two moments, 8-bit or fp32."""
    return 2 if "8bit" in optim else 8


def layer_activation_bytes(shape: ModelShape, cfg: Config, seq_len: int) -> int:
    """Bytes one decoder layer saves for backward, per token, in QLoRA training.

    Phi's block is parallel: out = x + dropout(attn(LN(x))) + dropout(mlp(LN(x))), one LayerNorm feeding both.
    `peft.prepare_model_for_kbit_training` makes embeddings and LayerNorms fp32, so the residual stream x is
    fp32 (s = 4 bytes), and bitsandbytes' Linear4bit returns its input's dtype, so the projections and the MLP
    are fp32 too; autocast runs attention in the compute dtype (c = 2). Frozen 4-bit matmuls save nothing.
    With H hidden, I intermediate, A heads, d head_dim, K kv-heads, n tokens, r the LoRA rank, per token:

        LayerNorm input, fp32 mean and rstd   s·H + 8     (its output is saved by no one: the LoRA
                                                          branches keep their own compute-dtype copies)
        each LoRA target (in_features f)      f·(c + 1) + c·r     its input in compute dtype, dropout mask, A·x
        attention, sdpa                       c·(A·d + 2·K·d) + c·A·d + 4·A    q, k, v, output, fp32 logsumexp
        attention, eager                      c·(A·d + 2·K·d) + (4 + c)·A·n    q, k, v, probabilities fp32 + c
        MLP, gelu_new (x·(1 + tanh(...)))     4·s·I    fc1 output and three tensors gelu_new's autograd saves
        MLP, another activation               s·I      its input
        residual dropout masks (p > 0)        2·H

    For Phi-2 with the seed recipe (sdpa, LoRA r=16 on q,k,v,dense) that is 26·H + 16·I + 4·A + 8·r + 8 bytes.
    tests/test_plan.py checks the formula against the tensors autograd actually saves (on CPU, bf16 autocast).
    """
    h, i, a, d = shape.hidden_size, shape.intermediate_size, shape.num_heads, shape.head_dim
    c = compute_bytes(cfg)
    s = 4 if cfg.quantization.load_in_4bit else c
    mask = 1 if cfg.lora.dropout > 0 else 0
    lora = sum(f * (c + mask) + c * cfg.lora.r for f, _ in lora_targets(shape, cfg).values())
    qkv = c * (a * d + 2 * shape.num_kv_heads * d)
    attention = qkv + (c * a * d + 4 * a if cfg.model.attn_implementation == "sdpa" else (4 + c) * a * seq_len)
    if shape.gated_mlp:  # act(gate) * up: gate and up outputs, the activation's, their product feeds down_proj
        mlp = 4 * s * i
    else:
        mlp = (4 if shape.hidden_act == "gelu_new" else 1) * s * i
    resid = 2 * h if shape.resid_pdrop > 0 else 0
    norms = (2 if shape.gated_mlp else 1) * (s * h + 8)  # Llama: one RMSNorm before attention, one before the MLP
    return norms + lora + attention + mlp + resid


def train_memory(shape: ModelShape, cfg: Config, batch_size: int | None = None,
                 gradient_checkpointing: bool | None = None) -> Estimate:
    """One training worker's GPU memory at its peak (the backward pass).

    Activations: without checkpointing all L layers keep their saved tensors, and the layer being
    back-propagated needs about as much again for its gradients: (L + 1)·layer. With (non-reentrant)
    checkpointing each layer keeps only its fp32 input and the recomputed layer holds its tensors and their
    gradients: L·s·H + 2·layer. Plus the final LayerNorm, and the logits in fp32 (`LOGITS_COPIES_TRAIN`).
    """
    batch = batch_size or (1 if cfg.train.batch_size == "auto" else cfg.train.batch_size)
    ckpt = cfg.model.gradient_checkpointing if gradient_checkpointing is None else gradient_checkpointing
    seq = cfg.prompt.max_length
    tokens = batch * seq
    c = compute_bytes(cfg)
    s = 4 if cfg.quantization.load_in_4bit else c
    h, layers = shape.hidden_size, shape.num_layers
    layer = layer_activation_bytes(shape, cfg, seq)
    per_token = (layers * s * h + 2 * layer) if ckpt else (layers + 1) * layer
    lora = lora_parameters(shape, cfg)
    ddp = 4 * lora if cfg.ray.num_workers > 1 else 0
    return Estimate({
        **weight_parts(shape, cfg, training=True),
        f"LoRA fp32 params + grads + {cfg.train.optim} state": lora * (8 + optimizer_state_bytes(cfg.train.optim)),
        "DDP gradient buckets": ddp,
        f"activations ({'checkpointed' if ckpt else 'no checkpointing'})": tokens * (per_token + (s + c) * h),
        "logits for the loss (fp32)": tokens * shape.vocab_size * 4 * LOGITS_COPIES_TRAIN,
        CONTEXT: CUDA_CONTEXT_BYTES,
    })


def generation_memory(shape: ModelShape, cfg: Config, batch_size: int | None = None,
                      merged: bool | None = None) -> Estimate:
    """One summarize worker's GPU memory during batched beam search.

    All batch × num_beams sequences are decoded at once. The KV cache holds 2·K·d values per layer per token in
    the compute dtype for prompt + new tokens, plus one layer's copy while a step concatenates or reorders the
    beams (or the Summarizer repeats a prefilled layer for the beams). The Summarizer prefills each prompt once,
    not once per beam, so the prefill covers batch (not batch × beams) prompts, one layer at a time with no grad:
    about c·(4·H + 3·I) bytes per prompt token live (residual, norm, q/k/v, MLP and gelu temporaries; eager
    attention adds its n×n scores). Only the last position's logits are computed; beam search keeps a few fp32
    copies of them per sequence.
    """
    batch = batch_size or cfg.generation.batch_size or CPU_GENERATION_BATCH
    seqs = batch * cfg.generation.num_beams
    prompt = prompt_token_budget(cfg)
    tokens = prompt + cfg.generation.max_new_tokens
    c = compute_bytes(cfg)
    h, i, layers = shape.hidden_size, shape.intermediate_size, shape.num_layers
    kv_per_token_layer = 2 * shape.num_kv_heads * shape.head_dim * c
    prefill = c * (4 * h + 3 * i) + (0 if cfg.model.attn_implementation == "sdpa"
                                      else (4 + c) * shape.num_heads * prompt)
    merged = merged_generation(shape, cfg) if merged is None else merged
    weights = {f"merged weights ({8 * c}-bit: 4-bit base dequantized, adapter merged)": shape.num_parameters() * c} \
        if merged and cfg.quantization.load_in_4bit else \
        {**weight_parts(shape, cfg, training=False), "LoRA adapter (fp32)": lora_parameters(shape, cfg) * 4}
    return Estimate({
        **weights,
        "KV cache": seqs * tokens * kv_per_token_layer * (layers + 1),
        "prefill activations": batch * prompt * prefill,
        "beam-search logits (fp32)": seqs * shape.vocab_size * 4 * LOGITS_COPIES_BEAM,
        CONTEXT: CUDA_CONTEXT_BYTES,
    })


def merged_generation(shape: ModelShape, cfg: Config, total_memory_bytes: float | None = None) -> bool:
    """Whether the summarize job generates on merged weights (`generation.weights`): `auto` merges when the merged
    model, at a batch of one, fits the card (`total_memory_bytes`, else a T4's memory as the reference card)."""
    if not cfg.quantization.load_in_4bit or cfg.generation.weights == "4bit":
        return False
    if cfg.generation.weights == "merged":
        return True
    total = total_memory_bytes if total_memory_bytes is not None else resolve_gpu("T4").memory_bytes
    return generation_memory(shape, cfg, 1, merged=True).total <= usable_bytes(total)


def largest_batch(estimate: Callable[[int], int], budget: float, limit: int) -> int:
    """The largest batch in [1, limit] whose estimate fits the budget (estimates grow with the batch); 0 if none."""
    lo, hi = 0, limit
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if estimate(mid) <= budget:
            lo = mid
        else:
            hi = mid - 1
    return lo


TRAIN_SEARCH_LIMIT = 1024


def split_micro_batch(examples_per_step: int, limit: int) -> tuple[int, int]:
    """(micro-batch, accumulation) for `train.batch_size: auto`: the largest micro-batch within `limit` that divides
    the examples per optimizer step, so micro-batch x accumulation stays exactly what was asked."""
    micro = max(d for d in range(1, examples_per_step + 1) if examples_per_step % d == 0 and d <= max(limit, 1))
    return micro, examples_per_step // micro


def largest_train_batch(cfg: Config, total_memory_bytes: float) -> int:
    """The largest training micro-batch that fits a card of `total_memory_bytes` (0 if not even one does)."""
    shape, _ = model_shape(cfg)
    return largest_batch(lambda b: train_memory(shape, cfg, b).total, usable_bytes(total_memory_bytes),
                         TRAIN_SEARCH_LIMIT)


def generation_batch_size(cfg: Config, gpu: str | None = None, total_memory_bytes: int | None = None,
                          device=None) -> int:
    """A generation batch (documents per `generate()` call) that fits one GPU, for `generation.batch_size: null`.

    The card is `total_memory_bytes`, else the named `gpu`, else `device` (each Ray actor plans for the GPU it
    was given, not the driver's machine); on a CPU device the answer is `CPU_GENERATION_BATCH`. Never below 1,
    never above MAX_GENERATION_BATCH.
    """
    if total_memory_bytes is None:
        if gpu is not None:
            total_memory_bytes = resolve_gpu(gpu).memory_bytes
        elif device is None or torch.device(device).type != "cuda":
            return CPU_GENERATION_BATCH
        else:
            total_memory_bytes = torch.cuda.get_device_properties(torch.device(device)).total_memory
    shape, _ = model_shape(cfg)
    merged = merged_generation(shape, cfg, total_memory_bytes)
    return fitting_generation_batch(shape, cfg, usable_bytes(total_memory_bytes), merged)


def fitting_generation_batch(shape: ModelShape, cfg: Config, budget: float, merged: bool) -> int:
    """The largest generation batch within `budget` bytes, in [1, MAX_GENERATION_BATCH]: one rule for the summarize
    job (`generation_batch_size`) and the report (`phi2sum.plan.text.plan`), so the report shows what the job runs."""
    return max(1, largest_batch(lambda b: generation_memory(shape, cfg, b, merged).total, budget,
                                MAX_GENERATION_BATCH))

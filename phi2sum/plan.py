"""Memory planner: will a job config fit on a GPU, and how fast could it train at best?

Why: a QLoRA run that does not fit fails minutes into start-up, on a cluster that costs money. The planner
computes, from the model's shapes alone (no weights, no GPU), what one worker holds in GPU memory while
training and while beam-search summarizing, and prints a FITS / DOES NOT FIT verdict for a card, the largest
micro-batch and generation batch that fit, and a training-speed ceiling from the card's peak FLOP/s.

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

import json
import math
import os
import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Callable

from phi2sum.config import Config, prompt_token_budget
from phi2sum.errors import ConfigError, ModelError

GIB = 1024**3
MIB = 1024**2

CUDA_CONTEXT_BYTES = 512 * MIB  # CUDA context, cuBLAS/cuDNN workspaces, bitsandbytes kernels: outside the allocator
SAFETY_MARGIN = 0.10  # share of the card kept free for fragmentation and what the estimate leaves out
CPU_GENERATION_BATCH = 8  # no GPU to size for: a batch that keeps beam search responsive on a CPU
MAX_GENERATION_BATCH = 64  # larger batches add little throughput and make a failed batch costly to redo
SEARCH_LIMIT = 1024  # the largest batch the report looks for

NF4_BLOCKSIZE = 64  # weights per absmax constant
NESTED_BLOCKSIZE = 256  # absmax constants per second-level fp32 constant (double quant)
LOGITS_COPIES_TRAIN = 3  # fp32 logits for the loss, the log-softmax cross-entropy saves, and their gradient
LOGITS_COPIES_BEAM = 4  # per beam step: fp32 logits, log-probs, scores + log-probs, top-k workspace

# microsoft/phi-2's config.json (architecture numbers only), for planning offline without the Hugging Face Hub.
PHI2_ARCHITECTURE: dict[str, Any] = {
    "model_type": "phi",
    "architectures": ["PhiForCausalLM"],
    "vocab_size": 51200,
    "hidden_size": 2560,
    "intermediate_size": 10240,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "max_position_embeddings": 2048,
    "partial_rotary_factor": 0.4,
    "rope_theta": 10000.0,
    "hidden_act": "gelu_new",
    "layer_norm_eps": 1e-05,
    "qk_layernorm": False,
    "resid_pdrop": 0.1,
    "embd_pdrop": 0.0,
    "attention_dropout": 0.0,
    "tie_word_embeddings": False,
    "bos_token_id": 50256,
    "eos_token_id": 50256,
    "torch_dtype": "float16",
}
PHI2_HUB_ID = "microsoft/phi-2"


# --- GPUs ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GPU:
    name: str
    memory_bytes: int  # total memory as nvidia-smi reports it
    peak_tflops: float  # dense (no sparsity) fp16/bf16 tensor-core peak
    bf16: bool


# Peak dense fp16/bf16 tensor TFLOP/s from NVIDIA's datasheets (their headline numbers with sparsity are 2x):
# T4 65 (fp16 mixed precision; Turing has no bf16), L4 121, A10 125 (AWS's A10G is an A10 variant and AWS
# publishes no tensor peak of its own; some measure it lower), A100 312, H100 SXM 989, H100 PCIe 756, H200 989.
GPUS: dict[str, GPU] = {
    "T4": GPU("T4", 15360 * MIB, 65.0, bf16=False),
    "L4": GPU("L4", 23034 * MIB, 121.0, bf16=True),
    "A10G": GPU("A10G", 23028 * MIB, 125.0, bf16=True),
    "A100-40GB": GPU("A100-40GB", 40960 * MIB, 312.0, bf16=True),
    "A100-80GB": GPU("A100-80GB", 81920 * MIB, 312.0, bf16=True),
    "H100": GPU("H100", 81559 * MIB, 989.0, bf16=True),
    "H100-PCIE": GPU("H100-PCIE", 81559 * MIB, 756.0, bf16=True),
    "H200": GPU("H200", 143771 * MIB, 989.0, bf16=True),
}
# Tried in order on a table key or a `torch.cuda.get_device_name()`, e.g. "Tesla T4", "NVIDIA A100-SXM4-80GB".
_GPU_PATTERNS = [
    ("H200", r"H200"),
    ("H100-PCIE", r"H100.*PCIE"),
    ("H100", r"H100"),
    ("A100-80GB", r"A100.*80\s*GB"),
    ("A100-40GB", r"A100"),
    ("A10G", r"A10(G|\b)"),
    ("L4", r"\bL4\b"),
    ("T4", r"\bT4\b"),
]


def find_gpu(name: str) -> GPU | None:
    """The table entry for a table key or a CUDA device name; None for a card the table does not know."""
    normalized = name.upper().replace("_", "-")
    for key, pattern in _GPU_PATTERNS:
        if re.search(pattern, normalized):
            return GPUS[key]
    return None


def resolve_gpu(name: str) -> GPU:
    gpu = find_gpu(name)
    if gpu is None:
        raise ConfigError(f"unknown GPU '{name}'; choose one of {', '.join(GPUS)}")
    return gpu


def usable_bytes(memory_bytes: float) -> float:
    """What a plan may use of a card: all of it less the safety margin (the CUDA context is in the estimate)."""
    return memory_bytes * (1 - SAFETY_MARGIN)


# --- model shapes --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelShape:
    """The numbers of a Phi architecture that decide parameter counts, memory and FLOPs."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_act: str = "gelu_new"
    resid_pdrop: float = 0.0
    tie_word_embeddings: bool = False
    qk_layernorm: bool = False

    @classmethod
    def from_config(cls, config) -> "ModelShape":
        """From a transformers config (PhiConfig); other architectures are refused, the formulas are Phi's."""
        if getattr(config, "model_type", None) != "phi":
            raise ConfigError(f"the planner knows Phi's architecture only; this model is "
                              f"'{getattr(config, 'model_type', '?')}'")
        heads = config.num_attention_heads
        return cls(
            vocab_size=config.vocab_size,
            hidden_size=config.hidden_size,
            intermediate_size=config.intermediate_size,
            num_layers=config.num_hidden_layers,
            num_heads=heads,
            num_kv_heads=getattr(config, "num_key_value_heads", None) or heads,
            head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
            hidden_act=config.hidden_act,
            resid_pdrop=config.resid_pdrop,
            tie_word_embeddings=bool(config.tie_word_embeddings),
            qk_layernorm=bool(config.qk_layernorm),
        )

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(in_features, out_features) of each `nn.Linear` in one decoder layer, by module name."""
        h, q, kv = self.hidden_size, self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "dense": (q, h),
                "fc1": (h, self.intermediate_size), "fc2": (self.intermediate_size, h)}

    def layer_parameters(self) -> int:
        linears = sum(i * o + o for i, o in self.linear_shapes().values())  # every Phi linear has a bias
        norms = 2 * self.hidden_size + (4 * self.head_dim if self.qk_layernorm else 0)
        return linears + norms

    def num_parameters(self) -> int:
        """As `sum(p.numel() for p in PhiForCausalLM(config).parameters())` counts them (tied weights once)."""
        embed = self.vocab_size * self.hidden_size
        lm_head = (0 if self.tie_word_embeddings else embed) + self.vocab_size  # lm_head has a bias
        return embed + self.num_layers * self.layer_parameters() + 2 * self.hidden_size + lm_head

    def quantized_tensors(self) -> list[int]:
        """Element counts of the weights bitsandbytes stores in 4 bits (the decoder layers' linear weights)."""
        return [i * o for i, o in self.linear_shapes().values()] * self.num_layers

    def quantized_parameters(self) -> int:
        return sum(self.quantized_tensors())

    def matmul_parameters(self) -> int:
        """Weights that take part in a matmul for every token: the layers' linears and lm_head (not the
        embedding lookup)."""
        return self.quantized_parameters() + self.hidden_size * self.vocab_size


def _shape_from_json(path: str) -> ModelShape:
    from transformers import AutoConfig

    file = os.path.join(path, "config.json") if os.path.isdir(path) else path
    try:
        with open(file, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"model config '{path}' cannot be read ({exc}); pass a model's config.json") from None
    if "model_type" not in data:
        raise ConfigError(f"model config '{path}' has no model_type; pass a model's config.json")
    return ModelShape.from_config(AutoConfig.for_model(**data))


@lru_cache(maxsize=16)
def _hub_shape(base: str, revision: str | None) -> tuple[ModelShape, str]:
    """A hub model's config from the local Hugging Face cache, else the bundled Phi-2 numbers (no network)."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(base, revision=revision, local_files_only=True)
        return ModelShape.from_config(config), f"{base} config from the Hugging Face cache"
    except OSError:
        if base != PHI2_HUB_ID:
            raise ConfigError(f"the architecture of '{base}' is not in the local Hugging Face cache; pass "
                              "--model-config path/to/config.json") from None
    return ModelShape.from_config(AutoConfig.for_model(**PHI2_ARCHITECTURE)), "bundled Phi-2 architecture numbers"


def model_shape(cfg: Config, model_config: str | None = None) -> tuple[ModelShape, str]:
    """The shapes of the config's base model, and where they came from.

    `model_config` (a config.json or a folder holding one) wins; then a local model folder (or the embedded
    tiny model, built on first use); then a hub id from the local cache, with Phi-2's numbers bundled here.
    """
    if model_config:
        return _shape_from_json(model_config), model_config
    from phi2sum.model import resolve_model_path

    base = cfg.model.base
    try:
        path = resolve_model_path(base)  # builds the embedded model; a missing local folder is an error
    except ModelError as exc:
        raise ConfigError(str(exc)) from None
    if os.path.isdir(path):
        return _shape_from_json(path), f"{base} ({path})" if path != base else base
    return _hub_shape(base, cfg.model.revision)


# --- memory --------------------------------------------------------------------------------------------------


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
    targets = {name: linears[name] for name in cfg.lora.target_modules if name in linears}
    if not targets:
        raise ConfigError(f"lora.target_modules {cfg.lora.target_modules} match none of Phi's linear layers "
                          f"({', '.join(linears)})")
    return targets


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
    mlp = (4 if shape.hidden_act == "gelu_new" else 1) * s * i
    resid = 2 * h if shape.resid_pdrop > 0 else 0
    return s * h + 8 + lora + attention + mlp + resid


def train_memory(shape: ModelShape, cfg: Config, batch_size: int | None = None,
                 gradient_checkpointing: bool | None = None) -> Estimate:
    """One training worker's GPU memory at its peak (the backward pass).

    Activations: without checkpointing all L layers keep their saved tensors, and the layer being
    back-propagated needs about as much again for its gradients: (L + 1)·layer. With (non-reentrant)
    checkpointing each layer keeps only its fp32 input and the recomputed layer holds its tensors and their
    gradients: L·s·H + 2·layer. Plus the final LayerNorm, and the logits in fp32 (`LOGITS_COPIES_TRAIN`).
    """
    batch = batch_size or cfg.train.batch_size
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


def generation_memory(shape: ModelShape, cfg: Config, batch_size: int | None = None) -> Estimate:
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
    return Estimate({
        **weight_parts(shape, cfg, training=False),
        "LoRA adapter (fp32)": lora_parameters(shape, cfg) * 4,
        "KV cache": seqs * tokens * kv_per_token_layer * (layers + 1),
        "prefill activations": batch * prompt * prefill,
        "beam-search logits (fp32)": seqs * shape.vocab_size * 4 * LOGITS_COPIES_BEAM,
        CONTEXT: CUDA_CONTEXT_BYTES,
    })


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
        else:
            import torch

            if device is None or torch.device(device).type != "cuda":
                return CPU_GENERATION_BATCH
            total_memory_bytes = torch.cuda.get_device_properties(torch.device(device)).total_memory
    shape, _ = model_shape(cfg)
    best = largest_batch(lambda b: generation_memory(shape, cfg, b).total, usable_bytes(total_memory_bytes),
                         MAX_GENERATION_BATCH)
    return max(1, best)


# --- speed ---------------------------------------------------------------------------------------------------


def train_flops_per_token(shape: ModelShape, seq_len: int, gradient_checkpointing: bool) -> float:
    """FLOPs the GPU executes per trained token.

    Forward: 2 FLOPs per matmul weight (the layers' linears and lm_head; LoRA's are negligible) plus attention's
    two n×d products, 4·L·n·A·d (the masked half counted: kernels do not reliably skip it). Backward computes
    the gradients with respect to the activations (about one forward again, needed through every frozen layer
    to reach the adapters below it) but no weight gradients for the frozen 4-bit base: 2x forward in total,
    not the 3x of full fine-tuning. Gradient checkpointing recomputes the forward once more: 3x, which is the
    familiar 6·N per token.
    """
    forward = 2 * shape.matmul_parameters() + 4 * shape.num_layers * seq_len * shape.num_heads * shape.head_dim
    return forward * (3 if gradient_checkpointing else 2)


def mfu(tokens_per_s: float, flops_per_token: float, peak_tflops: float) -> float:
    """Share of the card's peak that `tokens_per_s` amounts to (counting the FLOPs the GPU executes)."""
    return tokens_per_s * flops_per_token / (peak_tflops * 1e12)


# --- the report ----------------------------------------------------------------------------------------------


@dataclass
class Plan:
    gpu: GPU
    shape: ModelShape
    source: str
    budget: float
    train: Estimate
    train_other_checkpointing: Estimate  # the same training with gradient checkpointing switched the other way
    generation: Estimate
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
    gen_batch = cfg.generation.batch_size or max(1, largest_batch(
        lambda b: generation_memory(shape, cfg, b).total, budget, MAX_GENERATION_BATCH))
    return Plan(
        gpu=card, shape=shape, source=source, budget=budget,
        train=train_memory(shape, cfg),
        train_other_checkpointing=train_memory(shape, cfg, gradient_checkpointing=not cfg.model.gradient_checkpointing),
        generation=generation_memory(shape, cfg, gen_batch),
        generation_batch=gen_batch,
        max_train_batch=largest_batch(lambda b: train_memory(shape, cfg, b).total, budget, SEARCH_LIMIT),
        max_generation_batch=largest_batch(lambda b: generation_memory(shape, cfg, b).total, budget, SEARCH_LIMIT),
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
        f"training: micro-batch {t.batch_size} x {seq} tokens, grad_accum {t.grad_accum}, {t.optim}",
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
        f"  largest generation batch that fits: {_largest(p.max_generation_batch)}",
        "",
        f"budget: {_size(p.gpu.memory_bytes)} less a {SAFETY_MARGIN:.0%} safety margin = {_size(p.budget)}",
        _verdict(p, cfg),
    ]
    return "\n".join(lines)

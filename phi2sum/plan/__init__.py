"""Memory planner: will a job config fit on a GPU, and how fast could it train at best?

Why: a QLoRA run that does not fit fails minutes into start-up, on a cluster that costs money. The planner
computes, from the model's shapes alone (no weights, no GPU), what one worker holds in GPU memory while
training and while beam-search summarizing, and prints a FITS / DOES NOT FIT verdict for a card, the largest
micro-batch and generation batch that fit, and a training-speed ceiling from the card's peak FLOP/s.

One job a module, each depending only on those above it:

- `gpus`: the card table (memory, peak FLOP/s) and the share of a card a plan may use.
- `shapes`: a model's architecture numbers and its parameter counts, read without loading weights.
- `memory`: per-worker bytes for training and for generation (what it assumes is written there), and the
  largest batch that fits.
- `speed`: FLOPs per trained token and MFU.
- `text`: the `Plan` for one config on one card and the `phi2sum plan` report.

Callers import from `phi2sum.plan`; the names below are the ones it has always offered.
"""

from phi2sum.plan.gpus import GIB, GPU, GPUS, MIB, SAFETY_MARGIN, find_gpu, resolve_gpu, usable_bytes
from phi2sum.plan.memory import (CONTEXT, CPU_GENERATION_BATCH, CUDA_CONTEXT_BYTES, LOGITS_COPIES_BEAM,
                                 LOGITS_COPIES_TRAIN, MAX_GENERATION_BATCH, NESTED_BLOCKSIZE, NF4_BLOCKSIZE, Estimate,
                                 compute_bytes, fitting_generation_batch, generation_batch_size, generation_memory,
                                 largest_batch, largest_train_batch, layer_activation_bytes, lora_parameters, lora_targets, merged_generation,
                                 optimizer_state_bytes, quant_constant_bytes, split_micro_batch, train_memory,
                                 weight_parts)
from phi2sum.plan.shapes import PHI2_ARCHITECTURE, PHI2_HUB_ID, Layout, ModelShape, model_shape
from phi2sum.plan.speed import mfu, train_flops_per_token
from phi2sum.plan.text import SEARCH_LIMIT, Plan, main_text, plan

__all__ = [
    "GIB", "GPU", "GPUS", "MIB", "SAFETY_MARGIN", "find_gpu", "resolve_gpu", "usable_bytes",
    "CONTEXT", "CPU_GENERATION_BATCH", "CUDA_CONTEXT_BYTES", "LOGITS_COPIES_BEAM", "LOGITS_COPIES_TRAIN",
    "MAX_GENERATION_BATCH", "NESTED_BLOCKSIZE", "NF4_BLOCKSIZE", "Estimate", "compute_bytes",
    "fitting_generation_batch", "generation_batch_size", "generation_memory", "largest_batch", "largest_train_batch",
    "layer_activation_bytes", "lora_parameters", "lora_targets", "merged_generation", "optimizer_state_bytes", "quant_constant_bytes", "split_micro_batch",
    "train_memory", "weight_parts",
    "PHI2_ARCHITECTURE", "PHI2_HUB_ID", "Layout", "ModelShape", "model_shape",
    "mfu", "train_flops_per_token",
    "SEARCH_LIMIT", "Plan", "main_text", "plan",
]

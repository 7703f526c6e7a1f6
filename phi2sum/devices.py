"""Where a job runs: device and dtype, one pinned GPU in local mode, GPU memory hygiene, and what to record.

One place decides device and dtype so training, generation and every Ray worker agree: fp16 on GPUs without
bf16 (the T4), bf16 where supported, fp32 on CPU.
"""

from __future__ import annotations

import gc
import logging
import os
import platform
import resource

import torch

from phi2sum.config import Config
from phi2sum.errors import ModelError

log = logging.getLogger(__name__)

_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def resolve_device(cfg: Config) -> torch.device:
    if cfg.model.device != "auto":
        if cfg.model.device.startswith("cuda") and not torch.cuda.is_available():
            raise ModelError(f"model.device={cfg.model.device} but no CUDA GPU is visible; use model.device=auto")
        return torch.device(cfg.model.device)
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def compute_dtype(cfg: Config, device: torch.device) -> torch.dtype:
    """fp16 on GPUs without native bf16 (the T4), bf16 where the GPU has it, fp32 on CPU; or `model.dtype`.

    Two combinations are refused because they run but go wrong: bf16 on a card without it (sm < 80: emulated,
    several times slower) and eager attention in fp16 (transformers 5 computes Phi's q·k in the compute dtype,
    which overflows to NaN in fp16; sdpa does not).
    """
    if cfg.model.dtype != "auto":
        dtype = _DTYPES[cfg.model.dtype]
    elif device.type == "cuda":
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16
    else:
        dtype = torch.float32
    if dtype == torch.bfloat16 and device.type == "cuda" and not torch.cuda.is_bf16_supported(including_emulation=False):
        raise ModelError(f"model.dtype=bfloat16 but {torch.cuda.get_device_name(device)} has no native bf16 (it would "
                         "be emulated, several times slower); use model.dtype=auto, which picks float16 there")
    if dtype == torch.float16 and cfg.model.attn_implementation == "eager":
        raise ModelError("model.attn_implementation=eager in float16 overflows Phi's attention to NaN; use "
                         "model.attn_implementation=sdpa (the default)")
    return dtype


def pin_one_gpu(cfg: Config) -> None:
    """Local mode trains on one GPU: expose only that one to this process, before CUDA starts.

    Without a distributed launch, transformers' Trainer counts every visible GPU (`n_gpu`), multiplies the
    micro-batch by it and puts accelerate on cuda:0, while a 4-bit model cannot move: with several GPUs TRL
    refuses to train, and a model on cuda:N (N > 0) fails with accelerate's "loaded in 8-bit or 4-bit precision
    on a different device". Exposing the chosen GPU alone, as cuda:0 (`CUDA_VISIBLE_DEVICES`, as torchrun
    users do), makes both right. Several GPUs on one node are what the Ray job is for.
    """
    device = cfg.model.device
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if device == "cpu" or (visible is not None and not visible.strip()):
        return  # no GPU wanted, or none visible (a CPU run, the test session)
    index = int(device.partition(":")[2] or 0)
    if torch.cuda.is_initialized():  # too late to hide GPUs from this process
        if index or torch.cuda.device_count() > 1:
            raise ModelError(f"CUDA started before phi2sum could pin one GPU for model.device={device}; set "
                             "CUDA_VISIBLE_DEVICES to the one GPU to use and model.device=cuda")
        return
    entries = [v.strip() for v in visible.split(",")] if visible is not None else None
    if entries is not None and index >= len(entries):
        raise ModelError(f"model.device={device} but CUDA_VISIBLE_DEVICES={visible} exposes {len(entries)} GPU(s); "
                         f"use model.device=cuda:0..cuda:{len(entries) - 1}")
    os.environ["CUDA_VISIBLE_DEVICES"] = entries[index] if entries is not None else str(index)
    if device.startswith("cuda:"):
        cfg.model.device = "cuda"  # the chosen GPU is now this process's cuda:0
    log.info("local mode uses one GPU: CUDA_VISIBLE_DEVICES=%s", os.environ["CUDA_VISIBLE_DEVICES"])


def free_memory() -> None:
    """Collect garbage and return PyTorch's cached GPU blocks, between stages and before an out-of-memory retry.

    TRL's fused LM-head forward leaves a trained model in a reference cycle, so dropping the trainer frees nothing
    until the cycle collector runs; and freed GPU blocks stay in PyTorch's cache until emptied.
    """
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def is_out_of_memory(exc: BaseException) -> bool:
    """CUDA out of memory, including the cuBLAS form of it (a RuntimeError, not an OutOfMemoryError)."""
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and ("CUBLAS_STATUS_ALLOC_FAILED" in text or "CUDA out of memory" in text)


def device_name() -> str:
    import torch

    return torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu"


def peak_memory_mb() -> dict[str, float | None]:
    """This process's peak resident memory and peak GPU memory allocated by PyTorch, in MiB."""
    import torch

    return {"cpu_rss": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "gpu": round(torch.cuda.max_memory_allocated() / 2**20, 1) if torch.cuda.is_available() else None}

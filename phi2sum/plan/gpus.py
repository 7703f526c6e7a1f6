"""The GPUs the planner can size a job for: memory, peak tensor FLOP/s, bf16 support, and how much a plan may use.

Why a table: the planner runs before any card is reserved (often on a laptop), so it cannot ask the GPU; and a
Ray actor that does have one reports a device name that has to be matched back to the same numbers.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from phi2sum.errors import ConfigError

GIB = 1024**3
MIB = 1024**2

SAFETY_MARGIN = 0.10  # share of the card kept free for fragmentation and what the estimate leaves out


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
    """Like `find_gpu`, for a name the user typed: an unknown card is a config error, not a silent default."""
    gpu = find_gpu(name)
    if gpu is None:
        raise ConfigError(f"unknown GPU '{name}'; choose one of {', '.join(GPUS)}")
    return gpu


def usable_bytes(memory_bytes: float) -> float:
    """What a plan may use of a card: all of it less the safety margin (the CUDA context is in the estimate)."""
    return memory_bytes * (1 - SAFETY_MARGIN)

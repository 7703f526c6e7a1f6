"""Training speed: the FLOPs a trained token costs, and the share of a card's peak a measured rate reaches (MFU).

Why: a fits/does-not-fit verdict says nothing about how long a run takes; the FLOP count gives a ceiling in
tokens/s before any run, and MFU afterwards says how far below that ceiling a real run stayed.
"""

from __future__ import annotations

from phi2sum.plan.shapes import ModelShape


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

"""Device and dtype choices the GPU path depends on, checked on CPU: one GPU pinned in local mode, and the
precision combinations that run but go wrong refused."""

from __future__ import annotations

import pytest
import torch

from phi2sum.config import load_config
from phi2sum.errors import ConfigError, ModelError
from phi2sum.devices import compute_dtype, pin_one_gpu


@pytest.mark.parametrize("device, visible, pinned, device_after", [
    ("cuda:1", None, "1", "cuda"),        # cuda:N becomes this process's cuda:0 (accelerate trains there)
    ("cuda:1", "3,5", "5", "cuda"),       # counted within what is already visible
    ("auto", None, "0", "auto"),          # several GPUs: local mode uses the first alone (TRL refuses n_gpu > 1)
    ("cuda", "2,3", "2", "cuda"),
    ("auto", "", "", "auto"),             # nothing visible (a CPU run, the test session): nothing to pin
    ("cpu", None, None, "cpu"),
])
def test_local_mode_pins_one_gpu(monkeypatch, device, visible, pinned, device_after):
    if visible is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    cfg = load_config("phi2-xsum-t4", [f"model.device={device}"])
    pin_one_gpu(cfg)
    import os

    assert os.environ.get("CUDA_VISIBLE_DEVICES") == pinned
    assert cfg.model.device == device_after


def test_a_gpu_index_beyond_the_visible_ones_is_refused(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    with pytest.raises(ModelError, match="exposes 2 GPU"):
        pin_one_gpu(load_config("phi2-xsum-t4", ["model.device=cuda:2"]))


def test_pinning_does_not_change_the_run_fingerprint(monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    cfg = load_config("phi2-xsum-t4", ["model.device=cuda:1"])
    before = cfg.fingerprint()
    pin_one_gpu(cfg)
    assert cfg.fingerprint() == before  # a rerun on the same GPU resumes the same run


@pytest.fixture
def t4(monkeypatch):
    """A T4 as compute_dtype sees one: CUDA without native bf16."""
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla T4")
    return torch.device("cuda", 0)


def test_auto_is_fp16_on_a_t4_and_bf16_there_is_refused(t4):
    assert compute_dtype(load_config("phi2-xsum-t4"), t4) == torch.float16
    with pytest.raises(ModelError, match="Tesla T4 has no native bf16"):
        compute_dtype(load_config("phi2-xsum-t4", ["model.dtype=bfloat16"]), t4)
    assert compute_dtype(load_config("phi2-xsum-t4", ["model.dtype=bfloat16"]), torch.device("cpu")) == torch.bfloat16


def test_eager_attention_in_fp16_is_refused(t4):
    with pytest.raises(ConfigError, match="eager attention overflows"):
        load_config("phi2-xsum-t4", ["model.dtype=float16", "model.attn_implementation=eager"])
    auto_eager = load_config("phi2-xsum-t4", ["model.attn_implementation=eager"])  # fine until auto means fp16
    assert compute_dtype(auto_eager, torch.device("cpu")) == torch.float32
    with pytest.raises(ModelError, match="use model.attn_implementation=sdpa"):
        compute_dtype(auto_eager, t4)

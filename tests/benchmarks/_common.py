"""Shared pieces of the benchmark scripts: environment, machine facts, the benchmark model and documents, tables.

Import this module before ray or transformers: it sets the environment they read at import time.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable

# Loopback-only clusters without token auth, nothing fetched from the Hugging Face Hub, quiet Ray.
os.environ["RAY_AUTH_MODE"] = "disabled"
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parents[1]
TESTS = REPO / "tests"
for _path in (str(REPO), str(TESTS)):
    if _path not in sys.path:
        sys.path.insert(0, _path)

SHARED = REPO.parent / "shared"
PHI2_DIR = SHARED / "models" / "phi-2"
XSUM_DIR = SHARED / "data" / "xsum"
RESULTS_DIR = BENCH_DIR / "results"
CACHE_DIR = Path(os.environ.get("PHI2SUM_BENCH_CACHE", RESULTS_DIR / ".cache"))  # git-ignored


# --- machine facts -------------------------------------------------------------------------------------------


def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def uptime_line() -> str:
    try:
        import subprocess

        return subprocess.run(["uptime"], capture_output=True, text=True, timeout=5).stdout.strip()
    except Exception:  # pragma: no cover - uptime missing
        return f"load average: {', '.join(map(str, loadavg()))}"


def machine_facts() -> dict[str, Any]:
    import torch

    from phi2sum.run import package_versions

    cpu_model = next((line.split(":", 1)[1].strip() for line in _read_lines("/proc/cpuinfo")
                      if line.startswith("model name")), platform.processor())
    flags = next((line.split(":", 1)[1].split() for line in _read_lines("/proc/cpuinfo")
                  if line.startswith("flags")), [])
    return {
        "nproc": os.cpu_count(),
        "affinity_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "cpu_model": cpu_model,
        "avx512_bf16": "avx512_bf16" in flags,
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "torch_default_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "omp_num_threads_env": os.environ.get("OMP_NUM_THREADS"),
        "platform": platform.platform(),
        "versions": package_versions(),
        "uptime_at_start": uptime_line(),
    }


def _read_lines(path: str) -> list[str]:
    try:
        return Path(path).read_text().splitlines()
    except OSError:
        return []


def _cpu_jiffies() -> tuple[int, int]:
    """(busy, total) jiffies of the whole machine from /proc/stat."""
    fields = [int(x) for x in _read_lines("/proc/stat")[0].split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    total = sum(fields[:8])  # guest time is already inside user
    return total - idle, total


class CpuMeter:
    """Wall seconds, this process's CPU seconds and the machine's busy CPUs over a block of code.

    `machine_busy_cpus` near nproc while `own_cpus` is well below it means something else (another process, or
    this benchmark's Ray workers) was competing for the cores.
    """

    def __init__(self) -> None:
        self.result: dict[str, Any] = {}

    @contextmanager
    def measure(self):
        ncpu = os.cpu_count() or 1
        busy0, total0 = _cpu_jiffies()
        t0, own0 = time.perf_counter(), os.times()
        load0 = loadavg()
        try:
            yield self
        finally:
            wall = time.perf_counter() - t0
            own1 = os.times()
            busy1, total1 = _cpu_jiffies()
            own = (own1.user - own0.user) + (own1.system - own0.system)
            self.result = {
                "wall_s": wall,
                "own_cpu_s": own,
                "own_cpus": round(own / max(wall, 1e-9), 2),
                "machine_busy_cpus": round(ncpu * (busy1 - busy0) / max(total1 - total0, 1), 2),
                "loadavg_before": load0,
                "loadavg_after": loadavg(),
            }


def busy_cpus(window_s: float = 2.0) -> float:
    """CPUs the whole machine kept busy over the next `window_s` seconds (this process idle meanwhile)."""
    busy0, total0 = _cpu_jiffies()
    time.sleep(window_s)
    busy1, total1 = _cpu_jiffies()
    return (os.cpu_count() or 1) * (busy1 - busy0) / max(total1 - total0, 1)


def wait_for_quiet(max_wait_s: float, threshold_cpus: float = 0.3) -> dict[str, Any]:
    """Wait (up to `max_wait_s`) until other processes use less than `threshold_cpus`; says how it went.

    The machine is shared: a row measured while someone else's job holds a core says little. Call this while
    the benchmark itself is idle (between rows).
    """
    started = time.monotonic()
    busy = busy_cpus()
    while busy >= threshold_cpus and time.monotonic() - started < max_wait_s:
        busy = busy_cpus(5.0)
    return {"waited_s": round(time.monotonic() - started, 1), "others_busy_cpus_at_start": round(busy, 2),
            "quiet_at_start": busy < threshold_cpus}


# --- documents -----------------------------------------------------------------------------------------------


def _read_sample(name: str, n: int) -> list[dict[str, str]] | None:
    """The first `n` records of ../shared/data/xsum/<name>, or None when it is absent."""
    sample = XSUM_DIR / name
    if not sample.is_file():
        return None
    records = []
    with sample.open(encoding="utf-8") as f:
        for line in f:
            if len(records) >= n:
                break
            if line.strip():
                row = json.loads(line)
                records.append({"id": str(row["id"]), "document": row["document"], "summary": row["summary"]})
    return records


def load_documents(n: int) -> tuple[list[dict[str, str]], str]:
    """The first `n` records of the real XSum validation sample, else of the embedded synthetic test split."""
    return _records("validation-sample.jsonl", "test", n)


def load_train_records(n: int) -> tuple[list[dict[str, str]], str]:
    """Training records: the real XSum train sample when present, else the embedded synthetic train split."""
    return _records("train-sample.jsonl", "train", n)


def _records(sample: str, split: str, n: int) -> tuple[list[dict[str, str]], str]:
    records = _read_sample(sample, n)
    if records is not None:
        return records, str(XSUM_DIR / sample)
    from phi2sum.demo import EMBEDDED_DATA, synthetic_records

    return synthetic_records(split)[:n], f"{EMBEDDED_DATA} ({split} split)"


# --- the benchmark model -------------------------------------------------------------------------------------


def phi_shape(hidden: int, layers: int, heads: int, intermediate: int) -> dict[str, Any]:
    """Phi-2's config.json with a smaller body: same vocabulary (51,200 rows), rotary and activation."""
    base = json.loads((PHI2_DIR / "config.json").read_text(encoding="utf-8"))
    for key in ("_name_or_path", "auto_map", "transformers_version", "torch_dtype", "architectures"):
        base.pop(key, None)
    base.update(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                intermediate_size=intermediate)
    return base


def bench_model_path(hidden: int = 256, layers: int = 4, heads: int = 8, intermediate: int = 1024,
                     seed: int = 0) -> tuple[str, dict[str, Any]]:
    """A folder with a randomly initialised Phi-shaped model (fp32) and the real Phi-2 tokenizer.

    Built once per shape into the benchmark cache. Without ../shared/models/phi-2 the embedded tiny model is
    used instead (its own small tokenizer and vocabulary), and the returned description says so.
    """
    if not (PHI2_DIR / "tokenizer.json").is_file():
        from phi2sum.demo import EMBEDDED_MODEL, tiny_model_path

        return tiny_model_path(), {"model": EMBEDDED_MODEL, "note": "../shared/models/phi-2 absent: embedded model"}
    shape = phi_shape(hidden, layers, heads, intermediate)
    key = hashlib.sha256(json.dumps({"shape": shape, "seed": seed}, sort_keys=True).encode()).hexdigest()[:12]
    final = CACHE_DIR / f"phi-random-h{hidden}-l{layers}-{key}"
    info = {"model": "random Phi-shaped (real Phi-2 tokenizer)", "hidden_size": hidden, "num_hidden_layers": layers,
            "num_attention_heads": heads, "intermediate_size": intermediate, "vocab_size": shape["vocab_size"],
            "seed": seed, "path": str(final)}
    if (final / "model.safetensors").is_file():
        info["parameters"] = json.loads((final / "bench_info.json").read_text())["parameters"]
        return str(final), info
    import torch
    from transformers import AutoTokenizer, PhiConfig, PhiForCausalLM

    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=CACHE_DIR))
    try:
        torch.manual_seed(seed)
        model = PhiForCausalLM(PhiConfig(**shape))
        model.generation_config.pad_token_id = shape["eos_token_id"]
        model.save_pretrained(tmp)
        AutoTokenizer.from_pretrained(str(PHI2_DIR)).save_pretrained(tmp)
        info["parameters"] = sum(p.numel() for p in model.parameters())
        (tmp / "bench_info.json").write_text(json.dumps(info, indent=2))
        if final.exists():  # another run built it meanwhile
            shutil.rmtree(tmp)
        else:
            os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return str(final), info


# --- output --------------------------------------------------------------------------------------------------


def format_table(rows: Iterable[dict[str, Any]], columns: list[tuple[str, str, str]]) -> str:
    """`columns`: (key, header, format spec); a missing value prints as '-'."""
    rows = list(rows)
    cells = [[h for _, h, _ in columns]]
    for row in rows:
        line = []
        for key, _, spec in columns:
            value = row.get(key)
            line.append("-" if value is None else format(value, spec) if spec else str(value))
        cells.append(line)
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
    out = []
    for n, r in enumerate(cells):
        out.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))))
        if n == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


def write_json(path: str | Path, data: dict[str, Any]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, default=str) + "\n", encoding="utf-8")
    return path


def default_out(name: str) -> Path:
    return RESULTS_DIR / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}.json"

"""A run folder, `<storage.output>/<run.name>/`: claimed by one run, and its summary.json.

The folder belongs to one run: `_phi2sum_run.json` holds its name and config fingerprint, so the same name and
config resumes (or skips finished stages) and another config under the same name is refused, not overwritten.
Local mode (`phi2sum.local`) and Ray Train (`phi2sum.distributed.train`) both write their runs through here, so
summary.json has one shape whichever wrote it.
"""

from __future__ import annotations

import logging
import os
import platform
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import pyarrow as pa

from phi2sum import storage
from phi2sum.config import Config
from phi2sum.devices import device_name, peak_memory_mb
from phi2sum.validation import validation_summary

log = logging.getLogger(__name__)

PACKAGES = ("phi2sum", "torch", "transformers", "peft", "trl", "bitsandbytes", "accelerate", "datasets",
            "rouge-score", "ray", "pyarrow", "boto3")
ADAPTER = "adapter"
TRAIN_LOG = "train_log.parquet"
# One row per logged step. `kind`: train (loss, learning_rate, grad_norm), eval (eval_loss: the validation loss)
# or rouge (rouge1/2/L/Lsum fractions of rouge_documents validation summaries, generated in rouge_seconds); eval
# and rouge rows come from worker 0 only, and leave the columns of other kinds null.
TRAIN_LOG_SCHEMA = pa.schema([
    ("worker", pa.int32()), ("kind", pa.string()), ("step", pa.int64()), ("epoch", pa.float64()),
    ("loss", pa.float64()), ("learning_rate", pa.float64()), ("grad_norm", pa.float64()), ("tokens", pa.int64()),
    ("seconds", pa.float64()), ("eval_loss", pa.float64()), ("rouge1", pa.float64()), ("rouge2", pa.float64()),
    ("rougeL", pa.float64()), ("rougeLsum", pa.float64()), ("rouge_seconds", pa.float64()),
    ("rouge_documents", pa.int64())])


@dataclass
class Run:
    """Where a run's artifacts go, and `stats`: what its stages recorded, written as summary.json."""

    cfg: Config
    uri: str
    stats: dict[str, Any] = field(default_factory=dict)
    claim: storage.Claim | None = None

    def close(self) -> None:
        """Release the run folder's claim (after success or failure), so a rerun need not wait for it."""
        if self.claim is not None:
            self.claim.release()
            self.claim = None

    def __enter__(self) -> "Run":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def path(self, *parts: str) -> str:
        return storage.join(self.uri, *parts)

    @property
    def run_id(self) -> str:
        """`<run.name>:<config fingerprint>`: what the folder's claim and the experiment trackers know it by."""
        return f"{self.cfg.run.name}:{self.cfg.fingerprint()}"

    @property
    def adapter_uri(self) -> str:
        return self.path(ADAPTER)

    def has(self, *parts: str) -> bool:
        return storage.exists(self.path(*parts))

    def trained(self) -> bool:
        """Training is done when the adapter's completion marker is there (written after every other file)."""
        return storage.is_complete(self.adapter_uri)

    def save_adapter(self, local_dir: str) -> None:
        """The trained adapter into the run, its completion marker last: the marker is what `trained()` reads."""
        storage.upload_dir(local_dir, self.adapter_uri, marker={
            "run_name": self.cfg.run.name, "config_fingerprint": self.cfg.fingerprint(),
            "base": self.cfg.model.base, "written_at": datetime.now(timezone.utc).isoformat(timespec="seconds")})


def default_run_name() -> str:
    return datetime.now(timezone.utc).strftime("run-%Y%m%d-%H%M%S")


def open_run(cfg: Config) -> Run:
    """Name the run, claim its folder (see `storage.claims`: exclusive, held while the run lives) and save the
    resolved config. Use as `with open_run(cfg) as run:` so the claim is released however the run ends."""
    if cfg.storage.endpoint_url:
        os.environ["AWS_ENDPOINT_URL"] = cfg.storage.endpoint_url
    if not cfg.run.name:
        cfg.run.name = default_run_name()
    run = Run(cfg, storage.join(cfg.storage.output, cfg.run.name))
    run.claim = storage.claim_run_dir(run.uri, run.run_id)
    storage.write_text(run.path("config.yaml"), cfg.to_yaml())
    if run.has("summary.json"):
        run.stats = storage.read_json(run.path("summary.json"))
    run.stats.update({"run_name": cfg.run.name, "config_fingerprint": cfg.fingerprint()})
    log.info("run %s -> %s", cfg.run.name, run.uri)
    return run


def write_train_log(run: Run, rows: list[dict[str, Any]]) -> None:
    storage.write_parquet(pa.Table.from_pylist(rows, schema=TRAIN_LOG_SCHEMA), run.path(TRAIN_LOG))


def train_section(*, seconds: float, steps: int, tokens: int, trainable_params: int, effective_batch: int,
                  workers: int, log_rows: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    """summary.json's `train` section, the same keys in local mode and on Ray (which adds its own in `extra`).

    `seconds` is time inside training, start-up and model loading excluded, so tokens/s compare across modes.
    """
    train_rows = [r for r in log_rows if r.get("kind", "train") == "train"]
    first_worker = [r for r in train_rows if r["worker"] == min((r["worker"] for r in train_rows), default=0)]
    return {
        "seconds": round(seconds, 2), "steps": steps, "tokens": tokens,
        "tokens_per_second": round(tokens / max(seconds, 1e-9), 1), "trainable_params": trainable_params,
        "effective_batch": effective_batch, "workers": workers,
        "first_loss": first_worker[0]["loss"] if first_worker else None,
        "final_loss": first_worker[-1]["loss"] if first_worker else None,
        **validation_summary(log_rows),
        **extra,
    }


def finish_summary(run: Run, wall_seconds: float, workers: list[dict[str, Any]] | None = None) -> None:
    """Timings, versions and where it ran; `workers` (Ray) replaces this process's device and peak memory with
    the workers' own, since the driver is often a CPU-only head that trained nothing."""
    run.stats["wall_seconds"] = round(wall_seconds, 2)
    run.stats["finished_at"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    if workers:
        run.stats["workers"] = workers
        run.stats["device"] = ", ".join(sorted({w["device"] for w in workers}))
        run.stats["peak_memory_mb"] = {
            "cpu_rss": max(w["peak_memory_mb"]["cpu_rss"] for w in workers),
            "gpu": max((w["peak_memory_mb"]["gpu"] or 0 for w in workers), default=None) or None,
        }
    else:
        run.stats["device"] = device_name()
        run.stats["peak_memory_mb"] = peak_memory_mb()
    run.stats["versions"] = package_versions()
    storage.write_json(run.path("summary.json"), run.stats)


def package_versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out

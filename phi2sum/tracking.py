"""Experiment tracking, offline first: the step log's rows fed to TensorBoard and MLflow (`track:`).

Both are written from one place, the rows `phi2sum.train.StepLog` keeps (training loss, learning rate, gradient
norm, validation loss, ROUGE at checkpoints), so a tracker shows exactly what train_log.parquet holds; under Ray
only rank 0 tracks. TensorBoard event files go to `<run>/tensorboard/` (written locally and copied there at each
checkpoint and at the end when the run is on S3). MLflow goes to `MLFLOW_TRACKING_URI` when set, else to a
sqlite file beside the runs (MLflow 3.13+ refuses plain file stores). One MLflow run per phi2sum run: a resumed
run finds its MLflow run by tag and continues it. Params are the resolved config, with secrets redacted.
"""

from __future__ import annotations

import logging
import os
import re
import time
from dataclasses import dataclass
from typing import Any

from transformers import TrainerCallback

from phi2sum import storage
from phi2sum.config import Config
from phi2sum.errors import ConfigError

log = logging.getLogger(__name__)

TENSORBOARD_DIR = "tensorboard"
EXPERIMENT = "phi2sum"
RUN_TAG = "phi2sum.run_id"  # `<run.name>:<config fingerprint>`, the run folder's own identity
METRICS = {  # row kind -> (row key, tracked metric name)
    "train": (("loss", "train/loss"), ("learning_rate", "train/learning_rate"), ("grad_norm", "train/grad_norm"),
              ("tokens", "train/tokens")),
    "eval": (("eval_loss", "eval/loss"),),
    "rouge": (("rouge1", "eval/rouge1"), ("rouge2", "eval/rouge2"), ("rougeL", "eval/rougeL"),
              ("rougeLsum", "eval/rougeLsum"), ("rouge_seconds", "eval/rouge_seconds")),
}
INSTALL = "pip install 'phi2sum[track]'"


def check_trackers(cfg: Config) -> None:
    """Before a run starts: each tracker in `track:` can be imported (a one-line error naming the install)."""
    modules = {"tensorboard": "torch.utils.tensorboard", "mlflow": "mlflow"}
    for name in cfg.track:
        try:
            __import__(modules[name])
        except ImportError as exc:
            raise ConfigError(f"track: {name} needs a package that is not installed ({exc}); {INSTALL}, or "
                              f"remove {name} from track") from None


def mlflow_uri(cfg: Config) -> str:
    """MLFLOW_TRACKING_URI, else `sqlite:///<storage.output>/mlflow.db` (a local cache folder for S3 outputs)."""
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    folder = cfg.storage.output
    if storage.is_s3(folder):
        folder = os.path.join(os.environ.get("PHI2SUM_CACHE", os.path.expanduser("~/.cache/phi2sum")), "mlflow")
    folder = os.path.abspath(os.path.expanduser(folder))
    os.makedirs(folder, exist_ok=True)
    return f"sqlite:///{os.path.join(folder, 'mlflow.db')}"


USERINFO = re.compile(r"(://)[^/@\s]+@")  # user:password@ in a URL


def scrub(text: str) -> str:
    """Text with the AWS secret values and any URL's user:password@ replaced by ***."""
    return USERINFO.sub(r"\1***@", storage.redact(text))


def flat_params(cfg: Config) -> dict[str, str]:
    """The resolved config as `section.key` -> text, secrets redacted (credentials in URLs, key-like values)."""
    out: dict[str, str] = {}

    def walk(prefix: str, node: Any) -> None:
        if isinstance(node, dict) and node:
            for key, value in node.items():
                walk(f"{prefix}{key}.", value)
        else:
            out[prefix.rstrip(".")] = scrub(str(node))[:500]  # MLflow caps a param value

    walk("", cfg.to_dict())
    return out


@dataclass
class TrackTarget:
    """The run trackers log for: its folder (local or s3://), `<name>:<fingerprint>`, and a local folder for
    files on their way to an S3 run folder."""

    run_uri: str
    run_id: str
    work_dir: str
    mlflow_uri: str | None = None  # resolved by the Ray driver (a worker's environment and folder differ)


class Trackers(TrainerCallback):
    """A TrainerCallback owning the trackers of one worker: rows in through `log_row`, files out at each save.

    `resume_step`, on a resumed run, makes TensorBoard drop the events the lost steps after that checkpoint
    had written (MLflow keeps every value it was sent, with its step).
    """

    def __init__(self, cfg: Config, target: TrackTarget, resume_step: int | None = None):
        self.cfg, self.run_uri, self.run_id, self.target = cfg, target.run_uri, target.run_id, target
        local_run = not storage.is_s3(self.run_uri)
        self.tb_dir = os.path.join(self.run_uri if local_run else target.work_dir, TENSORBOARD_DIR)
        self.copy_tensorboard = not local_run
        self.writer = self.mlflow = self.mlflow_run = None
        if "tensorboard" in cfg.track:
            self.writer = self._tensorboard(resume_step)
        if "mlflow" in cfg.track:
            self._start_mlflow()

    def _tensorboard(self, resume_step: int | None):
        from torch.utils.tensorboard import SummaryWriter

        os.makedirs(self.tb_dir, exist_ok=True)
        purge = resume_step + 1 if resume_step is not None else None
        writer = SummaryWriter(log_dir=self.tb_dir, purge_step=purge)
        writer.add_text("config", "```yaml\n" + scrub(self.cfg.to_yaml()) + "\n```", 0)
        return writer

    def _start_mlflow(self) -> None:
        from mlflow.tracking import MlflowClient

        uri = self.target.mlflow_uri or mlflow_uri(self.cfg)
        client = MlflowClient(tracking_uri=uri)
        experiment = client.get_experiment_by_name(EXPERIMENT)
        experiment_id = experiment.experiment_id if experiment else client.create_experiment(EXPERIMENT)
        found = client.search_runs([experiment_id], f"tags.`{RUN_TAG}` = '{self.run_id}'", max_results=1)
        if found:
            run = found[0]
            client.update_run(run.info.run_id, status="RUNNING")
            log.info("mlflow: continuing run %s (%s) at %s", run.info.run_id, self.cfg.run.name, storage.redact(uri))
        else:
            run = client.create_run(experiment_id, run_name=self.cfg.run.name, tags={RUN_TAG: self.run_id})
            params = flat_params(self.cfg)
            from mlflow.entities import Param

            items = [Param(k, v) for k, v in params.items()]
            for start in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
                client.log_batch(run.info.run_id, params=items[start:start + 100])
            log.info("mlflow: run %s (%s) at %s", run.info.run_id, self.cfg.run.name, storage.redact(uri))
        self.mlflow, self.mlflow_run = client, run.info.run_id

    def log_row(self, row: dict[str, Any]) -> None:
        """One step-log row to every tracker, as the metrics of its kind (train, eval or rouge)."""
        values = [(name, row.get(key)) for key, name in METRICS.get(row.get("kind", "train"), ())]
        values = [(name, float(v)) for name, v in values if v is not None]
        if self.writer is not None:
            for name, value in values:
                self.writer.add_scalar(name, value, row["step"])
        if self.mlflow is not None and values:
            from mlflow.entities import Metric

            stamp = int(1000 * time.time())
            self.mlflow.log_batch(self.mlflow_run, metrics=[Metric(n, v, stamp, row["step"]) for n, v in values])

    def flush(self) -> None:
        """Event files to disk and, for a run on S3, into `<run>/tensorboard/`."""
        if self.writer is None:
            return
        self.writer.flush()
        if self.copy_tensorboard:
            for name in os.listdir(self.tb_dir):
                with open(os.path.join(self.tb_dir, name), "rb") as f:
                    storage.write_bytes(storage.join(self.run_uri, TENSORBOARD_DIR, name), f.read())

    def close(self, status: str = "FINISHED") -> None:
        self.flush()
        if self.writer is not None:
            self.writer.close()
            self.writer = None
        if self.mlflow is not None:
            self.mlflow.set_terminated(self.mlflow_run, status=status)
            self.mlflow = None

    def on_save(self, args, state, control, **kwargs):
        self.flush()

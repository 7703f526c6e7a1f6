"""The Ray cluster a job runs on: connecting to it, what the workers inherit, and whether it has GPUs.

On an already-running cluster the driver's environment does not reach the workers, so the variables they need
(S3 endpoint and credentials, Hugging Face offline flags) travel in the job's runtime env, in memory only.
"""

from __future__ import annotations

import json
import logging
import os
import socket
from typing import Any

from phi2sum.config import Config
from phi2sum.errors import ClusterError

log = logging.getLogger(__name__)

# What workers need from the driver's environment (on an already-running cluster they do not inherit it).
FORWARDED_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL",
                 "AWS_ENDPOINT_URL_S3", "AWS_DEFAULT_REGION", "AWS_REGION", "AWS_EC2_METADATA_DISABLED",
                 "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HOME", "HF_TOKEN",
                 "PHI2SUM_CACHE", "PHI2SUM_FAULT", "PHI2SUM_FAULT_ONCE")


def runtime_env() -> dict[str, Any]:
    """Env vars for the workers, passed in memory (never written to disk or logged).

    Inside a submitted job, variables the job's own runtime env already sets reach the workers anyway, and
    Ray refuses to merge a second value for them, so only the others are added.
    """
    job_env = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}")).get("runtime_env", {}) or {}
    taken = set((job_env.get("env_vars") or {}))
    env = {name: os.environ[name] for name in FORWARDED_ENV if os.environ.get(name)}
    env["RAY_TRAIN_ENABLE_PRINT_PATCH"] = "0"  # the patched print floods logs with datasets' dill output
    env["TOKENIZERS_PARALLELISM"] = "false"
    return {"env_vars": {k: v for k, v in env.items() if k not in taken}}


PROBE_TIMEOUT_S = 5.0


def init_ray(cfg: Config) -> None:
    """Connect to the cluster the job names, or start a local one; a cluster that does not answer is one line.

    Ray alone would retry a dead GCS for minutes, with no error: both for an explicit address nothing listens
    on and for `ray.init()` without one, which joins the last cluster recorded on this machine
    (`<ray temp dir>/ray_current_cluster`) even when that head is long dead.
    """
    import ray

    if ray.is_initialized():
        return
    ray.init(address=resolve_address(cfg.ray.address), runtime_env=runtime_env(), log_to_driver=True)


def resolve_address(configured: str | None) -> str | None:
    """The address to give `ray.init`: RAY_ADDRESS (set by `ray job submit`) or `ray.address` if it answers;
    with neither, the recorded cluster if it answers, else "local" (a fresh local instance)."""
    from ray._private.services import find_bootstrap_address

    address = os.environ.get("RAY_ADDRESS") or configured
    if address == "local":
        return address  # a fresh local instance, whatever is recorded
    if address and address != "auto":
        if not answers(address):
            where = "RAY_ADDRESS" if os.environ.get("RAY_ADDRESS") else "ray.address"
            raise ClusterError(f"no Ray cluster answers at {address} (from {where}): "
                               "start one with `ray start --head`, fix the address, or leave ray.address unset to "
                               "run on a local Ray instance")
        return address
    recorded = find_bootstrap_address(None)
    if recorded and answers(recorded):
        return recorded
    if address == "auto":
        raise ClusterError(f"ray.address=auto but no Ray cluster is running here (the last one recorded, "
                           f"{recorded or 'none'}, does not answer): start one with `ray start --head`")
    if recorded:
        log.warning("the Ray cluster last started on this machine (%s) does not answer; starting a local Ray "
                    "instance instead", recorded)
    return "local"


def answers(address: str) -> bool:
    """Whether something accepts a TCP connection at the cluster's address (host:port, or ray://host:port)."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    try:
        with socket.create_connection((host or "127.0.0.1", int(port)), timeout=PROBE_TIMEOUT_S):
            return True
    except (OSError, ValueError):
        return False


def use_gpu(cfg: Config) -> bool:
    """`ray.use_gpu`, or (null) whether the cluster has GPUs now.

    `ray.cluster_resources()` counts only nodes that are up, so on an autoscaling cluster whose GPU group starts
    at 0 nodes the answer is "no" and the job would run on CPUs: GPU presets set `ray.use_gpu: true`.
    """
    import ray

    if cfg.ray.use_gpu is not None:
        gpu = cfg.ray.use_gpu
    else:
        gpu = ray.cluster_resources().get("GPU", 0) > 0
        log.info("ray.use_gpu is null: the cluster has %s GPUs now", "some" if gpu else "no")
    log.info("running on %s (%s)", "GPUs, one per worker" if gpu else "CPUs", "nccl" if gpu else "gloo")
    return gpu

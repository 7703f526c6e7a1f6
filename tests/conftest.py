# Shared pytest fixtures for the phi2sum tests. The S3 fixtures come first; other fixtures will be added below.

from __future__ import annotations

import os
import sys
import uuid
from pathlib import Path

import pytest

_TESTS = Path(__file__).resolve().parent
for _path in (str(_TESTS), str(_TESTS.parent)):  # `import support` and `import phi2sum` under bare `pytest`
    if _path not in sys.path:
        sys.path.insert(0, _path)

# Test clusters live on loopback only: no Ray token auth (Ray 2.60 turns it on once ~/.ray/auth_token exists),
# and nothing is fetched from the Hugging Face Hub.
os.environ["RAY_AUTH_MODE"] = "disabled"
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# The suite is tuned for the CPU path (thresholds, fp32): on a GPU host it hides the GPUs, from this process and
# from every subprocess and Ray head it starts, unless asked to use them.
if os.environ.get("PHI2SUM_TESTS_USE_GPU") != "1":
    os.environ["CUDA_VISIBLE_DEVICES"] = ""

from support.s3 import TEST_ACCESS_KEY_ID, TEST_SECRET_ACCESS_KEY, MotoServer  # noqa: E402


def _clear_storage_cache() -> None:
    storage = sys.modules.get("phi2sum.storage")
    if storage is not None:
        storage.clear_cache()


@pytest.fixture(scope="session")
def s3_server():
    """A real moto S3 server process for the whole session; yields it (`.endpoint` is its http URL)."""
    server = MotoServer().start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def s3_env(s3_server, monkeypatch):
    """Point the AWS environment at the moto server, create a fresh bucket and yield ``s3://<bucket>``."""
    import boto3

    for var in ("AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server.endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", TEST_ACCESS_KEY_ID)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", TEST_SECRET_ACCESS_KEY)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    _clear_storage_cache()  # no client/filesystem built for another endpoint survives into this test
    bucket = f"test-{uuid.uuid4().hex[:16]}"
    boto3.session.Session().client("s3", endpoint_url=s3_server.endpoint, region_name="us-east-1").create_bucket(
        Bucket=bucket
    )
    yield f"s3://{bucket}"
    _clear_storage_cache()


# --- a real tiny run, shared by the tests that read a run's outputs ------------------------------------------

# Short enough for CI, long enough that fine-tuning clearly beats the base model (see test_learning.py).
TINY_RUN_OVERRIDES = ["run.name=tiny", "run.baseline=true", "data.num_eval=40"]


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """One real QLoRA run of the embedded tiny model (train, baseline + fine-tuned summaries, ROUGE), local.

    Yields the `phi2sum.local.Run`; `run.uri` is the run folder. Session-scoped: built once, read by many.
    """
    from phi2sum.config import load_config
    from phi2sum.local import run_local

    out = tmp_path_factory.mktemp("runs")
    return run_local(load_config("tiny-cpu", [f"storage.output={out}", *TINY_RUN_OVERRIDES]))


# --- a real Ray head -----------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def ray_head():
    """`ray start --head` on 127.0.0.1 (2 CPUs, dashboard on) for the session; `ray stop` afterwards."""
    from support.ray_head import RayHead

    head = RayHead().start()
    try:
        yield head
    finally:
        import ray

        if ray.is_initialized():  # a driver whose cluster is stopped under it exits the whole process
            ray.shutdown()
        head.stop()


# --- the fast lane (`make test-fast`: -m "not slow") -----------------------------------------------------------

# Tests that start a process (a Ray head, a moto server, the CLI) or train a model are slow: marked here, by what
# they use, so a new test that uses one of these is in the right lane without anyone remembering to mark it.
SLOW_FIXTURES = {"ray_head", "tiny_run", "s3_server", "s3_env", "built"}
SLOW_MODULES = {"test_cli", "test_reliability", "test_ray_train", "test_ray_summarize", "test_learning"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        module = item.module.__name__.rsplit(".", 1)[-1]
        params = getattr(getattr(item, "callspec", None), "params", {})
        fixtures = set(getattr(item, "fixturenames", ()))
        if module in SLOW_MODULES or SLOW_FIXTURES & fixtures or \
                "s3" in params.values():  # a test parametrized over local and s3:// starts moto for s3
            item.add_marker(pytest.mark.slow)
        if "ray_head" in fixtures:
            item.add_marker(pytest.mark.ray)
        item.add_marker(pytest.mark.xdist_group(_lane(item, module, fixtures)))


def _lane(item, module: str, fixtures: set[str]) -> str:
    """Which pytest-xdist worker group runs a test (`make test` runs two workers, `--dist loadgroup`).

    Every test that starts Ray runs in one group, one after another: a second cluster on the machine would
    compete for its 2 CPUs, and `ray.init()` may attach to whichever cluster started last. The users of the
    session's tiny run share a group so it is trained once; the other tests go by module, so a module-scoped
    fixture is built once."""
    if item.get_closest_marker("ray"):
        return "ray"
    return "tiny_run" if "tiny_run" in fixtures else module


@pytest.fixture(autouse=True)
def _fast_lane_starts_no_process(request, monkeypatch):
    """In the fast lane a test that starts a process fails, naming the fix: the lane's promise is enforced."""
    if request.config.getoption("markexpr", "") != "not slow" or request.node.get_closest_marker("slow"):
        return
    import subprocess

    class Refused(subprocess.Popen):  # a class, so modules that subclass Popen at import still import
        def __init__(self, args, *rest, **kwargs):
            raise AssertionError(f"{request.node.nodeid} starts a process ({args}); mark it @pytest.mark.slow")

    monkeypatch.setattr(subprocess, "Popen", Refused)

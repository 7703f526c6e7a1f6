"""Reliability at the edges, with real parts: completion markers under a cut upload, exclusive run claims between
real processes, directory swaps a reader can trust, a flaky S3 store in front of moto, unreachable Ray clusters,
and skip-means-skip in the Ray job."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pyarrow as pa
import pytest

from phi2sum import storage
from phi2sum.demo import synthetic_records
from phi2sum.faults import InjectedFault
from support.faults import INTERNAL, FaultyS3Proxy
from support.processes import REPO, clean_env, one_line_error, phi2sum
from support.s3 import aws_env, closed_port

PHI2SUM = str(Path(sys.executable).with_name("phi2sum"))
SMALL = ["--config", "tiny-cpu", "data.num_train=8", "data.num_eval=4", "train.max_steps=2", "train.batch_size=2",
         "train.grad_accum=1", "train.logging_steps=1", "generation.num_beams=1", "generation.max_new_tokens=4"]

pytestmark = pytest.mark.slow


# --- completion markers ------------------------------------------------------------------------------------


@pytest.fixture(params=["local", "s3"])
def where(request, tmp_path):
    return str(tmp_path / "dest") if request.param == "local" else request.getfixturevalue("s3_env") + "/dest"


def test_an_upload_cut_between_two_files_is_never_complete(where, tmp_path, monkeypatch):
    old, new = tmp_path / "old", tmp_path / "new"
    for folder, tag in ((old, "old"), (new, "new")):
        folder.mkdir()
        for name in ("a.bin", "b.bin", "c.bin"):
            (folder / name).write_text(f"{tag} {name}")
    storage.upload_dir(str(old), where, marker={"v": "old"})
    assert storage.is_complete(where)
    monkeypatch.setenv("PHI2SUM_FAULT", "upload_file@2")  # dies after the first file of the new tree
    with pytest.raises(InjectedFault):
        storage.upload_dir(str(new), where, marker={"v": "new"})
    files = {f.rsplit("/", 1)[-1]: storage.read_text(f) for f in storage.list_files(where)}
    if storage.is_complete(where):  # local: the swap never happened, the old tree is whole
        assert files == {"a.bin": "old a.bin", "b.bin": "old b.bin", "c.bin": "old c.bin",
                         storage.COMPLETE: json.dumps({"v": "old"})}
    else:  # S3: objects went one by one, but the marker went first, so the half-new tree is not "complete"
        assert files["a.bin"] == "new a.bin" and storage.COMPLETE not in files
    monkeypatch.delenv("PHI2SUM_FAULT")
    storage.upload_dir(str(new), where, marker={"v": "new"})
    assert storage.is_complete(where) and storage.read_json(storage.join(where, storage.COMPLETE)) == {"v": "new"}
    assert {f.rsplit("/", 1)[-1] for f in storage.list_files(where)} == {"a.bin", "b.bin", "c.bin", storage.COMPLETE}


def test_a_run_whose_adapter_upload_was_cut_trains_again(s3_env, s3_server):
    out = f"{s3_env}/runs"
    cut = phi2sum("train", *SMALL, f"storage.output={out}", "run.name=cut",
              env=clean_env(**aws_env(s3_server.endpoint), PHI2SUM_FAULT="upload_file@2"))
    assert cut.returncode != 0 and "injected fault at upload_file 2" in cut.stderr
    assert storage.list_files(f"{out}/cut/adapter") and not storage.is_complete(f"{out}/cut/adapter")
    again = phi2sum("train", *SMALL, f"storage.output={out}", "run.name=cut", env=clean_env(**aws_env(s3_server.endpoint)))
    assert again.returncode == 0, again.stderr[-3000:]
    assert "training already done" not in again.stderr  # the half-written adapter was not taken for done
    assert storage.is_complete(f"{out}/cut/adapter")


# --- exclusive claims between real processes --------------------------------------------------------------


def _race(first: list[str], second: list[str], env: dict[str, str]) -> list[subprocess.CompletedProcess]:
    procs = [subprocess.Popen([PHI2SUM, *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              cwd=str(REPO), env=clean_env(**env))
             for argv in (first, second)]
    return [subprocess.CompletedProcess(p.args, p.wait(timeout=600), *p.communicate()) for p in procs]


@pytest.mark.parametrize("store, configs", [("local", "different"), ("s3", "same")])
def test_two_runs_under_one_name_never_train_side_by_side(store, configs, tmp_path, request):
    env, out = {}, str(tmp_path / "runs")
    if store == "s3":
        env, out = aws_env(request.getfixturevalue("s3_server").endpoint), request.getfixturevalue("s3_env")
    common = ["train", *SMALL, f"storage.output={out}", "run.name=shared", "train.max_steps=4"]
    second = [*common, "lora.r=4"] if configs == "different" else common
    results = _race(common, second, env)
    codes = sorted(p.returncode for p in results)
    assert codes == [0, 2], [p.stderr[-2000:] for p in results]
    loser = next(p for p in results if p.returncode == 2)
    line = one_line_error(loser)
    assert ("in use by" in line and "still running" in line) or "claimed by another run at the same moment" in line \
        or "another run's outputs" in line, line
    winner = next(p for p in results if p.returncode == 0)
    assert storage.is_complete(storage.join(out, "shared", "adapter")), winner.stderr[-2000:]
    log = [r for r in storage.read_parquet(storage.join(out, "shared", "train_log.parquet")).to_pylist()
           if r["kind"] == "train"]
    assert [r["step"] for r in log] == sorted({r["step"] for r in log})  # one training, not two interleaved


# --- a directory swap a reader can trust -------------------------------------------------------------------


def test_a_replaced_directory_is_never_missing(tmp_path):
    dest = str(tmp_path / "adapter")
    sources = []
    for i in range(2):
        src = tmp_path / f"v{i}"
        src.mkdir()
        (src / "adapter_config.json").write_text(json.dumps({"version": i}))
        sources.append(str(src))
    storage.upload_dir(sources[0], dest, marker={})
    misses, stop = [], threading.Event()

    def reader():
        while not stop.is_set():
            if not os.path.isfile(os.path.join(dest, "adapter_config.json")):
                misses.append(time.monotonic())

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        for i in range(300):
            storage.upload_dir(sources[i % 2], dest, marker={})
    finally:
        stop.set()
        thread.join()
    assert misses == []


# --- a flaky S3 store --------------------------------------------------------------------------------------


@pytest.fixture
def flaky_store(s3_server, s3_env):
    """Throttling (503 SlowDown) for the first requests, then one request in nine fails with a 500."""
    proxy = FaultyS3Proxy(s3_server.endpoint, fail_first=4, fail_every=9)
    yield proxy, s3_env
    proxy.close()


def test_a_flaky_store_costs_retries_not_the_run(flaky_store):
    proxy, bucket = flaky_store
    out = f"{bucket}/runs"
    proc = phi2sum("run", *SMALL, f"storage.output={out}", "run.name=flaky", env=clean_env(**aws_env(proxy.endpoint)))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proxy.failed >= 6  # the faults really happened
    storage.clear_cache()
    ids = storage.read_parquet(f"{out}/flaky/predictions.parquet").column("id").to_pylist()
    assert len(ids) == len(set(ids)) == 4
    assert storage.is_complete(f"{out}/flaky/adapter") and storage.exists(f"{out}/flaky/metrics.json")


@pytest.mark.ray
def test_a_ray_summarize_job_through_a_flaky_store_ends_with_every_id_once(ray_head, s3_server, s3_env):
    records = synthetic_records("test")[:12]
    storage.write_parquet(pa.Table.from_pylist(records), f"{s3_env}/data/test.parquet")
    proxy = FaultyS3Proxy(s3_server.endpoint, fail_first=3, fail_every=7, error=INTERNAL)
    try:
        result = ray_head.submit("jobs.summarize", "--config", "tiny-cpu", f"data.source={s3_env}/data/test.parquet",
                                 f"output={s3_env}/preds", "generation.num_beams=1", "generation.max_new_tokens=4",
                                 "generation.batch_size=4", "ray.actors=2", env_vars=aws_env(proxy.endpoint))
    finally:
        proxy.close()
    assert result.status == "SUCCEEDED", result.logs[-3000:]
    assert proxy.failed >= 4
    ids = [i for uri in storage.list_files(f"{s3_env}/preds/shard-0-of-1") if "/part-" in uri
           for i in storage.read_parquet(uri).column("id").to_pylist()]
    assert sorted(ids) == sorted(r["id"] for r in records)


# --- unreachable Ray, and skip-means-skip in the Ray job --------------------------------------------------


@pytest.mark.ray
def test_an_explicit_ray_address_that_does_not_answer_is_one_line_and_fast(tmp_path):
    address = f"127.0.0.1:{closed_port()}"
    started = time.monotonic()
    proc = phi2sum("summarize", "--ray", "--config", "tiny-cpu", f"output={tmp_path}/preds", f"ray.address={address}",
               env=clean_env(RAY_ADDRESS=""))
    assert time.monotonic() - started < 30
    line = one_line_error(proc)
    assert f"no Ray cluster answers at {address} (from ray.address)" in line and "ray start --head" in line
    assert not (tmp_path / "preds").exists()


@pytest.mark.ray
def test_a_stale_cluster_record_gives_way_to_a_local_ray_and_bad_lines_are_skipped(tmp_path):
    """Ray alone would retry the dead head it recorded for minutes; the job runs on a local instance instead, and
    an undecodable line in the source is a counted bad record there as in local mode."""
    temp = tempfile.mkdtemp(prefix="r", dir="/tmp")  # short: Ray's socket paths have a length limit
    os.makedirs(f"{temp}/ray")
    Path(f"{temp}/ray/ray_current_cluster").write_text(f"127.0.0.1:{closed_port()}")
    source = tmp_path / "messy.jsonl"
    lines = [json.dumps(r).encode() for r in synthetic_records("test")[:5]]
    source.write_bytes(b"\n".join([*lines[:2], b'{"id": "latin", "document": "caf\xe9"}', *lines[2:]]) + b"\n")
    proc = phi2sum("summarize", "--ray", "--config", "tiny-cpu", f"data.source={source}", f"output={tmp_path}/preds",
               "generation.num_beams=1", "generation.max_new_tokens=4", "ray.actors=1",
               env=clean_env(TMPDIR=temp, RAY_ADDRESS=""))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "does not answer; starting a local Ray instance instead" in proc.stderr
    done = json.loads((tmp_path / "preds" / "shard-0-of-1" / "_SUCCESS.json").read_text())
    assert done["rows"] == 5 and done["skipped_in_source"] == {"not_utf8_line": 1}

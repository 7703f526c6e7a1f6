"""Issue #7, reliability: bad input, secrets, faults, with nothing lost, through the real entry points.

* Bad input: the `phi2sum` CLI and the Ray job entry points (`python -m jobs.*`) run as subprocesses; each
  problem ends in one `...: error: ...` line on stderr (no traceback) and exit code 2, before any training, or
  in a counted skip where the config says skip (and a 1 MB document is cut, not a crash).
* Secrets: a local run on S3 and a Ray summarize job (credentials in the job's env_vars) with distinctive
  credentials; no file they write, no log and no output may contain them.
* Faults: S3 going away mid-run or mid-PUT (the job fails with one line and a rerun completes, or the client
  retries and completes; never a partial file that looks complete), a training worker SIGKILLed (it resumes from
  its last checkpoint), a Ray driver stopped mid-run (a resubmission completes, every id once).
The load side (2,000 records through Ray Data, bounded memory) is tests/benchmarks/load_summarize.py.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import signal
import subprocess
import threading
import time
import uuid
from pathlib import Path

import boto3
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from phi2sum import storage
from phi2sum.demo import synthetic_records
from phi2sum.errors import StorageError
from support.faults import CuttingProxy
from support.processes import PHI2SUM, REPO, clean_env, job, one_line_error, phi2sum, run
from support.s3 import MotoServer, admin_client, closed_port, new_bucket
from support.s3 import objects as s3_objects

FAST_GEN = ["generation.num_beams=1", "generation.max_new_tokens=8", "generation.batch_size=8"]
RUN_MARKER = storage.RUN_MARKER


# --- helpers -------------------------------------------------------------------------------------------------


def tree_snapshot(root: Path) -> dict[str, tuple[str, int]]:
    """relative path -> (sha256, mtime_ns) of every file under root."""
    return {str(p.relative_to(root)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.is_file()}


def canary_credentials() -> dict[str, str]:
    """Distinctive, random credentials: a hit on them can only be a leak (moto accepts any unless told not to)."""
    tag = uuid.uuid4().hex
    return {"AWS_ACCESS_KEY_ID": f"AKIACANARY{tag[:10].upper()}",
            "AWS_SECRET_ACCESS_KEY": f"canary-secret-{tag}",
            "AWS_SESSION_TOKEN": f"canary-token-{tag[::-1]}"}


def secrets_in(name: str, data: bytes, secrets: list[str]) -> list[str]:
    """Which secrets occur in a file: its raw bytes, and the decoded rows when it is (compressed) Parquet."""
    texts = [data]
    if name.endswith(".parquet"):
        try:
            texts.append(json.dumps(pq.read_table(io.BytesIO(data)).to_pylist(), default=str).encode())
        except Exception:  # noqa: BLE001 - not readable as Parquet: the raw bytes were searched
            pass
    return [s for s in secrets if any(s.encode() in t for t in texts)]


def ids_of_parts(objects: dict[str, bytes]) -> list[str]:
    return [i for key, data in objects.items() if key.rsplit("/", 1)[-1].startswith("part-")
            for i in pq.read_table(io.BytesIO(data)).column("id").to_pylist()]


# --- bad storage: unreachable endpoint, wrong credentials, missing bucket ------------------------------------


def s3_run_argv(output: str) -> list[str]:
    return ["run", "--config", "tiny-cpu", f"storage.output={output}", "run.name=r", "data.num_eval=2"]


def test_unreachable_s3_endpoint_is_one_line_and_fast():
    port = closed_port()
    creds = canary_credentials()
    started = time.monotonic()
    proc = phi2sum(*s3_run_argv("s3://bucket/x"), env=clean_env(AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}", **creds))
    line = one_line_error(proc)
    assert time.monotonic() - started < 60
    assert f"cannot reach S3 endpoint http://127.0.0.1:{port}" in line and "s3://bucket/x/r" in line
    for secret in creds.values():
        assert secret not in proc.stderr + proc.stdout


def test_wrong_credentials_are_one_line_and_not_echoed(s3_server):
    admin = admin_client(s3_server.endpoint)
    bucket = new_bucket(admin, "rel")
    iam = boto3.session.Session(aws_access_key_id="admin", aws_secret_access_key="admin-secret").client(
        "iam", endpoint_url=s3_server.endpoint, region_name="us-east-1")  # moto's IAM, to make a real user
    user = f"rel-{bucket[-8:]}"
    iam.create_user(UserName=user)
    key_id = iam.create_access_key(UserName=user)["AccessKey"]["AccessKeyId"]
    cases = [{"AWS_ACCESS_KEY_ID": "AKIAUNKNOWNRELIABLE1", "AWS_SECRET_ACCESS_KEY": "unknown-key-secret-value"},
             {"AWS_ACCESS_KEY_ID": key_id, "AWS_SECRET_ACCESS_KEY": "wrong-secret-for-a-real-key"}]
    s3_server.set_auth(True)
    try:
        for creds in cases:
            proc = phi2sum(*s3_run_argv(f"s3://{bucket}/runs"), env=clean_env(AWS_ENDPOINT_URL=s3_server.endpoint,
                                                                             AWS_DEFAULT_REGION="us-east-1", **creds))
            line = one_line_error(proc)
            # The first request is a HEAD, whose 403 carries no error code: "access denied", naming the variables.
            assert re.search(r"access denied by S3 endpoint|does not know the access key id|rejected the request "
                             r"signature", line), line
            assert "AWS_ACCESS_KEY_ID" in line and f"s3://{bucket}/runs/r" in line
            for value in creds.values():
                assert value not in proc.stderr + proc.stdout
    finally:
        s3_server.set_auth(False)
    assert s3_objects(admin, bucket) == {}  # nothing was written with the rejected credentials


def test_missing_bucket_is_one_line(s3_server):
    bucket = f"no-such-bucket-{uuid.uuid4().hex[:8]}"
    proc = phi2sum(*s3_run_argv(f"s3://{bucket}/runs"),
                   env=clean_env(AWS_ENDPOINT_URL=s3_server.endpoint, AWS_DEFAULT_REGION="us-east-1",
                                 **canary_credentials()))
    line = one_line_error(proc)
    assert f"S3 bucket '{bucket}' does not exist at {s3_server.endpoint}" in line and "create the bucket" in line


# --- secrets: a local run on S3 writes them nowhere ----------------------------------------------------------


@pytest.fixture(scope="module")
def canary_local_run(s3_server, tmp_path_factory):
    """`phi2sum -v run` (train, checkpoints, summarize, ROUGE) on S3, then `phi2sum report`, with canary credentials."""
    from phi2sum.demo import tiny_model_path

    admin = admin_client(s3_server.endpoint)
    bucket = new_bucket(admin, "rel")
    creds = canary_credentials()
    cache = tmp_path_factory.mktemp("phi2sum-cache")  # the local work folder (trainer checkpoints) lands here
    model = Path(tiny_model_path())
    (cache / model.name).symlink_to(model)  # reuse the built tiny model
    env = clean_env(AWS_ENDPOINT_URL=s3_server.endpoint, AWS_DEFAULT_REGION="us-east-1", PHI2SUM_CACHE=str(cache),
                    **creds)
    out = f"s3://{bucket}/runs"
    argv = ["--config", "tiny-cpu", "data.num_train=8", "data.num_eval=4", "train.max_steps=2", "train.save_steps=1",
            "train.batch_size=2", "train.grad_accum=1", "train.logging_steps=1", *FAST_GEN, f"storage.output={out}"]
    proc = phi2sum("-v", "run", *argv, "run.name=canary", env=env)
    report = phi2sum("-v", "report", f"{out}/canary", env=env)
    return {"proc": proc, "report": report, "admin": admin, "bucket": bucket, "creds": creds, "cache": cache,
            "env": env, "argv": argv, "out": out}


def test_scanner_finds_a_secret_in_compressed_parquet():
    buf = io.BytesIO()
    pq.write_table(pa.table({"x": ["canary-secret-abc" * 3] * 50}), buf, compression="zstd")
    assert secrets_in("p.parquet", buf.getvalue(), ["canary-secret-abc"]) == ["canary-secret-abc"]


def test_local_run_on_s3_writes_no_secret_anywhere(canary_local_run):
    r = canary_local_run
    assert r["proc"].returncode == 0, r["proc"].stderr[-3000:]
    assert r["report"].returncode == 0, r["report"].stderr[-3000:]
    secrets = list(r["creds"].values())
    objects = s3_objects(r["admin"], r["bucket"])
    names = {k.split("/", 2)[-1] for k in objects}
    for expected in ("config.yaml", "summary.json", "metrics.json", "predictions.parquet", "train_log.parquet",
                     "adapter/adapter_model.safetensors", "adapter/adapter_config.json", "report/report.md",
                     RUN_MARKER):
        assert expected in names, sorted(names)
    local = [p for p in r["cache"].rglob("*") if p.is_file() and not p.is_symlink() and "tiny-phi-" not in str(p)]
    assert any("checkpoint-" in str(p) for p in local), local  # the trainer's checkpoints were written and read
    hits = {k: secrets_in(k, data, secrets) for k, data in objects.items()}
    hits.update({str(p): secrets_in(p.name, p.read_bytes(), secrets) for p in local})
    for name, text in (("run output", r["proc"].stdout + r["proc"].stderr),
                       ("report output", r["report"].stdout + r["report"].stderr)):
        hits[name] = [s for s in secrets if s in text]
    assert not {k: v for k, v in hits.items() if v}, "credentials leaked"
    assert len(hits) > 20  # the scan covered the run, its checkpoints and the logs


def test_run_on_s3_refuses_another_config_and_keeps_its_files(canary_local_run):
    r = canary_local_run
    assert r["proc"].returncode == 0
    before = {k: hashlib.sha256(v).hexdigest() for k, v in s3_objects(r["admin"], r["bucket"]).items()}
    proc = phi2sum("run", *r["argv"], "run.name=canary", "train.learning_rate=1e-3", env=r["env"])
    assert "already holds another run's outputs" in one_line_error(proc)
    after = {k: hashlib.sha256(v).hexdigest() for k, v in s3_objects(r["admin"], r["bucket"]).items()}
    assert after == before


# --- faults: S3 going away ------------------------------------------------------------------------------------


def test_s3_server_killed_mid_run_fails_clearly_and_the_rerun_completes(tmp_path):
    """moto is SIGKILLed once the run is writing; the job stops with one line. Restarted (empty: moto keeps its
    state in memory, so the bucket is recreated), the same command completes with every output complete."""
    server = MotoServer().start()
    try:
        admin = admin_client(server.endpoint)
        bucket = new_bucket(admin, "rel")
        env = clean_env(AWS_ENDPOINT_URL=server.endpoint, AWS_DEFAULT_REGION="us-east-1", **canary_credentials())
        argv = [PHI2SUM, "summarize", "--config", "tiny-cpu", "data.num_eval=6", *FAST_GEN,
                f"storage.output=s3://{bucket}/runs", "run.name=cut"]
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=str(REPO),
                                env=env)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            if s3_objects(admin, bucket).keys() >= {f"runs/cut/{RUN_MARKER}", "runs/cut/config.yaml"}:
                break
            time.sleep(0.05)
        server.proc.send_signal(signal.SIGKILL)  # the server dies; nothing of it survives
        server.proc.wait(timeout=10)
        stdout, stderr = proc.communicate(timeout=180)
        line = one_line_error(subprocess.CompletedProcess(argv, proc.returncode, stdout, stderr))
        assert f"cannot reach S3 endpoint {server.endpoint}" in line and f"s3://{bucket}/runs/cut" in line

        server = server.restart()
        admin = admin_client(server.endpoint)
        assert admin.list_buckets()["Buckets"] == []  # moto came back empty
        admin.create_bucket(Bucket=bucket)
        again = run(argv, env=env)
        assert again.returncode == 0, again.stderr[-3000:]
        objects = s3_objects(admin, bucket, "runs/cut/")
        predictions = pq.read_table(io.BytesIO(objects["runs/cut/predictions.parquet"]))
        expected = sorted(r["id"] for r in synthetic_records("test"))
        ids = predictions.column("id").to_pylist()
        assert len(ids) == len(set(ids)) == 6 and set(ids) <= set(expected)
        assert json.loads(objects["runs/cut/metrics.json"])["count"] == 6
        assert "rougeL" in predictions.column_names  # the evaluate stage rewrote it, complete
        assert json.loads(objects["runs/cut/summary.json"])["summarize"]["documents"] == 6
    finally:
        server.stop()


@pytest.fixture
def proxied_s3(s3_env, s3_server, monkeypatch):
    proxy = CuttingProxy(int(s3_server.endpoint.rsplit(":", 1)[1]))
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
    storage.clear_cache()
    yield proxy, s3_env, admin_client(s3_server.endpoint)
    proxy.close()
    storage.clear_cache()


def test_connection_cut_mid_put_keeps_the_old_file_and_a_retry_completes(proxied_s3):
    import numpy as np

    proxy, root, direct = proxied_s3
    bucket, uri = root[len("s3://"):], f"{root}/run/predictions.parquet"
    old = pa.table({"id": [f"o{i}" for i in range(100)], "x": np.arange(100.0)})
    new = pa.table({"id": [f"n{i}" for i in range(200_000)], "x": np.random.default_rng(0).random(200_000)})
    storage.write_parquet(old, uri)
    storage.clear_cache()  # a fresh client: no pooled connection from before the outage

    proxy.cut_after, proxy.cuts_left = 256 * 1024, -1  # every attempt dies 256 KiB into the ~4 MB body
    with pytest.raises(StorageError) as err:
        storage.write_parquet(new, uri)
    assert proxy.cuts == storage.fs.MAX_ATTEMPTS  # every attempt was cut mid-body
    message = str(err.value)
    assert "\n" not in message and f"cannot reach S3 endpoint {proxy.endpoint} to write {uri}" in message
    kept = pq.read_table(io.BytesIO(direct.get_object(Bucket=bucket, Key="run/predictions.parquet")["Body"].read()))
    assert kept.equals(old)  # the server kept the old, complete file: no truncated object replaced it
    assert direct.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []

    proxy.cuts, proxy.cuts_left = 0, 1  # a short outage: only the first attempt is cut
    storage.clear_cache()
    storage.write_parquet(new, uri)  # the client's retry completes it
    assert proxy.cuts == 1
    assert storage.read_parquet(uri).equals(new)
    assert list(s3_objects(direct, bucket)) == ["run/predictions.parquet"]


# --- faults on Ray: a summarize job stopped, then cut off from S3, then completed (a SIGKILLed training worker:
# tests/test_ray_train.py) ---


SUMMARIZE_N = 24


@pytest.fixture(scope="module")
def summarize_job_history(ray_head, s3_server, tmp_path_factory):
    """One `jobs.summarize` output on S3 (data on S3 too, with 3 bad records among 24 good ones; canary credentials
    in the job's env_vars; S3 reached through a CuttingProxy), submitted three times:
      1. `stopped`: stuck on its 3rd batch (PHI2SUM_FAULT=summarize_batch@3:hang), then `ray job stop` kills it;
      2. `outage`: S3 goes away when the job starts its 2nd write (after one new part);
      3. `final`: S3 is back; the same command again.
    Yields each step's JobResult and a snapshot of the output after it."""
    from ray.job_submission import JobSubmissionClient

    admin = admin_client(s3_server.endpoint)
    bucket = new_bucket(admin, "rel")
    records = synthetic_records("test")[:SUMMARIZE_N]
    bad = [{"id": "bad-blank", "document": " \n ", "summary": "s"},
           {"id": "bad-none", "document": None, "summary": "s"},
           {"id": None, "document": "A document without an id.", "summary": "s"}]
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(records[:10] + bad + records[10:]), buf)
    admin.put_object(Bucket=bucket, Key="data/test.parquet", Body=buf.getvalue())
    proxy = CuttingProxy(int(s3_server.endpoint.rsplit(":", 1)[1]))
    creds = canary_credentials()
    env = {"AWS_ENDPOINT_URL": proxy.endpoint, "AWS_DEFAULT_REGION": "us-east-1", **creds}
    args = ["--config", "tiny-cpu", f"data.source=s3://{bucket}/data/test.parquet", f"output=s3://{bucket}/preds",
            "ray.actors=1", "generation.batch_size=4", "ray.part_rows=4", "generation.num_beams=1",
            "generation.max_new_tokens=8"]
    once = tmp_path_factory.mktemp("once") / "fault-once"
    history = {"ids": sorted(r["id"] for r in records), "admin": admin, "bucket": bucket, "creds": creds,
               "proxy": proxy}

    def output() -> dict[str, bytes]:
        return s3_objects(admin, bucket, "preds/")

    # 1. the driver is stopped while the job is stuck mid-run
    first_id = f"rel-stop-{uuid.uuid4().hex[:8]}"
    box = {}
    thread = threading.Thread(target=lambda: box.setdefault("result", ray_head.submit(
        "jobs.summarize", *args, submission_id=first_id,
        env_vars={**env, "PHI2SUM_FAULT": "summarize_batch@3:hang", "PHI2SUM_FAULT_ONCE": str(once)})))
    thread.start()
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and not (once.exists() and any("/part-" in k for k in output())):
        time.sleep(0.2)
    hung = once.exists()
    JobSubmissionClient(ray_head.dashboard_url).stop_job(first_id)  # SIGTERM to the driver, then SIGKILL
    thread.join(timeout=180)
    history["stopped"] = {"result": box.get("result"), "hung": hung, "output": output()}

    # 2. S3 goes away once the job has written one more part
    proxy.puts, proxy.down_at_put = 0, 2
    history["outage"] = {"result": ray_head.submit("jobs.summarize", *args, env_vars=env), "output": output(),
                         "puts": proxy.puts}

    # 3. S3 is back
    proxy.down, proxy.down_at_put = False, None
    history["final"] = {"result": ray_head.submit("jobs.summarize", *args, env_vars=env), "output": output()}
    yield history
    proxy.close()


def parts(objects: dict[str, bytes]) -> dict[str, bytes]:
    return {k: v for k, v in objects.items() if "/part-" in k}


@pytest.mark.ray
@pytest.mark.slow
def test_stopped_summarize_driver_leaves_complete_parts_and_no_success_marker(summarize_job_history):
    step = summarize_job_history["stopped"]
    assert step["hung"], "the first job never reached its 3rd batch"
    assert step["result"].status == "STOPPED", step["result"].logs[-3000:]
    assert parts(step["output"]) and not any(k.endswith("_SUCCESS.json") for k in step["output"])
    done = ids_of_parts(parts(step["output"]))  # each part left behind is a whole, readable Parquet file
    assert 0 < len(done) < SUMMARIZE_N and len(done) == len(set(done))


@pytest.mark.ray
@pytest.mark.slow
def test_s3_outage_during_a_ray_summarize_job_is_one_line_and_leaves_only_complete_parts(summarize_job_history):
    before, step = summarize_job_history["stopped"]["output"], summarize_job_history["outage"]
    result, proxy = step["result"], summarize_job_history["proxy"]
    assert result.status == "FAILED", result.logs[-3000:]
    errors = [line for line in result.logs.splitlines() if "jobs.summarize: error:" in line]
    assert len(errors) == 1 and errors[0].startswith("jobs.summarize: error: "), result.logs[-3000:]
    assert f"cannot reach S3 endpoint {proxy.endpoint} to write s3://" in errors[0] and "/part-" in errors[0]
    assert result.logs.rstrip().splitlines()[-1] == errors[0]  # the job's last word, not a remote stack trace
    new = set(parts(step["output"])) - set(parts(before))
    assert len(new) == 1  # the one write that got through before the outage
    assert all(step["output"][k] == v for k, v in parts(before).items())  # earlier parts untouched
    done = ids_of_parts(parts(step["output"]))  # every part is complete and readable
    assert len(done) == len(set(done)) < SUMMARIZE_N
    assert not any(k.endswith("_SUCCESS.json") for k in step["output"])


@pytest.mark.ray
@pytest.mark.slow
def test_resubmitted_summarize_job_completes_every_id_once_without_redoing_work(summarize_job_history):
    history = summarize_job_history
    step, before = history["final"], parts(history["outage"]["output"])
    assert step["result"].status == "SUCCEEDED", step["result"].logs[-3000:]
    out = step["output"]
    assert sorted(ids_of_parts(parts(out))) == history["ids"]  # every id exactly once
    success = json.loads(out["preds/shard-0-of-1/_SUCCESS.json"])
    assert success["rows"] == SUMMARIZE_N
    assert success["skipped_in_source"] == {"empty_document": 1, "missing_document": 1, "missing_id": 1}  # counted
    assert "skipped 3 bad record(s)" in step["result"].logs
    assert success["rows_this_attempt"] == SUMMARIZE_N - len(ids_of_parts(before))  # only what was missing
    assert all(out[k] == v for k, v in before.items())  # nothing done before was redone or lost


# Files in a Ray session folder that carry what our code prints or logs: the job driver's log and the stdout /
# stderr of the workers and actors. Everything else there is written by Ray itself.
OURS = re.compile(r"(^|/)(job-driver-.*\.log|worker-.*\.(out|err))$")


@pytest.mark.ray
@pytest.mark.slow
def test_ray_summarize_jobs_write_no_secret_in_outputs_or_logs(summarize_job_history, ray_head):
    history = summarize_job_history
    assert history["final"]["result"].status == "SUCCEEDED"
    secrets = list(history["creds"].values())
    objects = s3_objects(history["admin"], history["bucket"])
    assert any(k.endswith("_SUCCESS.json") for k in objects) and len(objects) > 3
    leaks = {k: secrets_in(k, v, secrets) for k, v in objects.items()}
    for name in ("stopped", "outage", "final"):
        leaks[f"`ray job logs` of the {name} job"] = [s for s in secrets if s in history[name]["result"].logs]
    ours, ray_own = {}, {}
    session = Path(ray_head.temp_dir)
    for path in session.rglob("*"):
        if path.is_file() and not path.is_symlink():
            found = secrets_in(path.name, path.read_bytes(), secrets)
            (ours if OURS.search(str(path)) else ray_own)[str(path.relative_to(session))] = found
    leaks.update(ours)
    assert any("job-driver-" in k for k in ours) and any(k.endswith((".out", ".err")) for k in ours)  # scanned
    assert not {k: v for k, v in leaks.items() if v}, "credentials leaked by our code"
    # Ray itself records a job's runtime_env, env_vars included, in its own log runtime_env_agent.log (a known
    # property of passing credentials as env_vars, documented in the README); nowhere else may they appear.
    ray_leaks = sorted(k for k, v in ray_own.items() if v)
    assert all(k.endswith("runtime_env_agent.log") for k in ray_leaks), ray_leaks


@pytest.mark.ray
@pytest.mark.slow
def test_summarize_output_made_with_other_settings_is_refused_not_mixed(summarize_job_history, s3_server):
    """Resuming (or re-running) a summarize output with another model or generation settings would mix two
    models' summaries under one _SUCCESS.json: refused with one line, before Ray starts, nothing touched."""
    history = summarize_job_history
    admin, bucket = history["admin"], history["bucket"]
    partial = parts(history["stopped"]["output"])
    for key, data in partial.items():  # a copy of the stopped job's partial output
        admin.put_object(Bucket=bucket, Key=key.replace("preds/", "partial/", 1), Body=data)
    env = clean_env(AWS_ENDPOINT_URL=s3_server.endpoint, AWS_DEFAULT_REGION="us-east-1", **history["creds"])
    common = ["--config", "tiny-cpu", f"data.source=s3://{bucket}/data/test.parquet", "ray.actors=1",
              "generation.batch_size=4", "generation.max_new_tokens=8"]
    before = s3_objects(admin, bucket)
    for output in ("preds", "partial"):  # complete (_SUCCESS.json), then partial (parts only)
        proc = job("jobs.summarize", *common, "generation.num_beams=2", f"output=s3://{bucket}/{output}", env=env)
        line = one_line_error(proc, "jobs.summarize")
        assert f"s3://{bucket}/{output}/shard-0-of-1 already holds summaries made with other settings (generation" \
               in line, line
        assert "Connecting to" not in proc.stderr and "Started a local Ray" not in proc.stderr  # refused up front
    assert s3_objects(admin, bucket) == before
    same = job("jobs.summarize", *common, "generation.num_beams=1", "generation.batch_size=2",  # only the batch size
               f"output=s3://{bucket}/preds", env=env)
    assert same.returncode == 0 and "nothing to do" in same.stderr, same.stderr[-2000:]

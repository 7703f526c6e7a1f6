"""phi2sum.storage against a local directory and a real moto S3 server (HTTP, pyarrow + boto3 clients)."""

from __future__ import annotations

import os
import pickle
import socket
import threading
import time

import boto3
import botocore.exceptions
import pyarrow as pa
import pyarrow.fs as pafs
import pytest

from phi2sum import storage
from phi2sum.errors import StorageError
from support.s3 import TEST_SECRET_ACCESS_KEY, closed_port


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path):
    """The same test runs on a local directory and on a fresh moto bucket."""
    if request.param == "local":
        return str(tmp_path / "store")
    return request.getfixturevalue("s3_env")


def _leftovers(root: str) -> list[str]:
    """Temp files left by writes: local dot-files, or S3 multipart uploads that never completed."""
    if storage.is_s3(root):
        bucket = root[len("s3://"):].split("/")[0]
        return [u["Key"] for u in storage.s3_client().list_multipart_uploads(Bucket=bucket).get("Uploads", [])]
    return [os.path.join(d, n) for d, _, names in os.walk(root) for n in names if n.startswith(".")]


# ------------------------------------------------------------------------------------------- locations


def test_is_s3_and_join():
    assert storage.is_s3("s3://b/x") and not storage.is_s3("/tmp/s3://x") and not storage.is_s3("runs/x")
    assert storage.join("s3://bucket", "a/", "/b", "c.json") == "s3://bucket/a/b/c.json"
    assert storage.join("s3://bucket/pre/", "x//y") == "s3://bucket/pre/x/y"
    assert storage.join("/tmp/out/", "run", "") == "/tmp/out/run"
    assert storage.join("/", "a") == "/a"
    assert storage.join("runs", "x") == "runs/x"


def test_filesystem_paths_and_cache(s3_env, s3_server, monkeypatch, tmp_path):
    fs, path = storage.filesystem(storage.join(s3_env, "pre/fix/"))
    bucket = s3_env[len("s3://"):]
    assert isinstance(fs, pafs.S3FileSystem) and path == f"{bucket}/pre/fix"  # no s3:// (Ray Train needs this)
    assert storage.filesystem(s3_env)[1] == bucket
    settings = fs.__reduce__()[1][0]
    assert settings["endpoint_override"] == s3_server.endpoint[len("http://"):] and settings["scheme"] == "http"
    assert settings["region"] == "us-east-1"
    # the filesystem travels to Ray workers pickled: it must not carry the secret
    assert TEST_SECRET_ACCESS_KEY.encode() not in pickle.dumps(fs)
    assert storage.filesystem("s3://other/x")[0] is fs  # cached per endpoint
    # it really talks to the server
    storage.write_text(storage.join(s3_env, "pre/fix/a.txt"), "hi")
    assert fs.get_file_info(f"{bucket}/pre/fix/a.txt").size == 2

    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "https://s3.example.invalid:9000")
    other, _ = storage.filesystem(s3_env)
    assert other is not fs  # another endpoint never reuses the cached filesystem
    assert other.__reduce__()[1][0]["endpoint_override"] == "s3.example.invalid:9000"
    assert other.__reduce__()[1][0]["scheme"] == "https"

    local_fs, local_path = storage.filesystem(str(tmp_path / "x" / ".." / "y"))
    assert isinstance(local_fs, pafs.LocalFileSystem) and local_path == str(tmp_path / "y")


def test_s3_client_follows_endpoint(s3_env, s3_server):
    assert storage.s3_client().meta.endpoint_url == s3_server.endpoint
    assert storage.s3_client() is storage.s3_client()


# ------------------------------------------------------------------------------------------- round trips


def test_bytes_text_json_round_trip(root):
    storage.write_bytes(storage.join(root, "a/b.bin"), b"\x00\x01binary")
    storage.write_text(storage.join(root, "a/t.txt"), "héllo\n")
    storage.write_json(storage.join(root, "m.json"), {"b": [1, 2], "a": {"x": None}})
    assert storage.read_bytes(storage.join(root, "a/b.bin")) == b"\x00\x01binary"
    assert storage.read_text(storage.join(root, "a/t.txt")) == "héllo\n"
    assert storage.read_json(storage.join(root, "m.json")) == {"a": {"x": None}, "b": [1, 2]}
    assert storage.read_text(storage.join(root, "m.json")).startswith('{\n  "a"')  # indented, sorted
    storage.write_bytes(storage.join(root, "a/b.bin"), [b"new ", b"chunks"])  # overwrite, from chunks
    assert storage.read_bytes(storage.join(root, "a/b.bin")) == b"new chunks"


def test_parquet_file_and_directory(root):
    part1 = pa.table({"id": [1, 2], "text": ["a", "b"]})
    part2 = pa.table({"id": [3], "text": ["c"]})
    storage.write_parquet(part1, storage.join(root, "one.parquet"))
    assert storage.read_parquet(storage.join(root, "one.parquet")).equals(part1)

    data = storage.join(root, "data")
    storage.write_parquet(part2, storage.join(data, "part-b.parquet"))
    storage.write_parquet(part1, storage.join(data, "part-a.parquet"))
    storage.write_bytes(storage.join(data, "_SUCCESS"), b"not parquet")
    storage.write_bytes(storage.join(data, ".part-c.parquet.tmp"), b"half-written garbage")
    table = storage.read_parquet(data)
    assert table.column("id").to_pylist() == [1, 2, 3]  # files read in name order, markers skipped
    assert table.column("text").to_pylist() == ["a", "b", "c"]

    storage.write_bytes(storage.join(root, "junk.parquet"), b"not parquet at all")
    with pytest.raises(pa.ArrowInvalid):  # a content problem, left for the caller to report as bad data
        storage.read_parquet(storage.join(root, "junk.parquet"))

    storage.write_bytes(storage.join(root, "empty/_SUCCESS"), b"")
    with pytest.raises(StorageError, match="no Parquet files"):
        storage.read_parquet(storage.join(root, "empty"))


def test_list_exists_delete(root):
    for name in ("d/x.txt", "d/sub/y.txt", "d/sub/deeper/z.txt", "other.txt"):
        storage.write_text(storage.join(root, name), name)
    d = storage.join(root, "d")
    expected = [storage.join(d, p) for p in ("sub/deeper/z.txt", "sub/y.txt", "x.txt")]
    if not storage.is_s3(root):
        expected = [os.path.abspath(p) for p in expected]
    assert storage.list_files(d) == sorted(expected)
    assert storage.list_files(storage.join(root, "nothing-here")) == []
    assert storage.exists(storage.join(d, "x.txt")) and storage.exists(storage.join(d, "sub"))
    assert not storage.exists(storage.join(d, "nope.txt"))

    storage.delete(storage.join(d, "x.txt"))
    assert not storage.exists(storage.join(d, "x.txt"))
    storage.delete(storage.join(d, "sub"))
    assert storage.list_files(d) == []
    storage.delete(storage.join(d, "sub"))  # missing is fine
    storage.delete(storage.join(root, "never/existed.txt"))
    assert storage.read_text(storage.join(root, "other.txt")) == "other.txt"  # siblings untouched


def test_list_relative_is_relative_to_the_uri_in_any_form(root, tmp_path, monkeypatch):
    for name in ("run/a.json", "run/sub/b.parquet", "runner/c.txt"):
        storage.write_text(storage.join(root, name), name)
    forms = [storage.join(root, "run"), storage.join(root, "run") + "/"]
    if not storage.is_s3(root):  # a relative path, as `storage.output=runs` gives
        monkeypatch.chdir(tmp_path)
        forms.append(os.path.relpath(storage.join(root, "run"), tmp_path))
    for uri in forms:
        assert storage.list_relative(uri) == ["a.json", "sub/b.parquet"], uri
    assert storage.list_relative(storage.join(root, "missing")) == []


def test_delete_bucket_root_keeps_bucket(s3_env):
    storage.write_text(storage.join(s3_env, "a/b.txt"), "x")
    storage.delete(s3_env)
    assert storage.list_files(s3_env) == []  # raises if the bucket itself had gone
    storage.write_text(storage.join(s3_env, "again.txt"), "ok")


def _make_tree(base) -> dict[str, bytes]:
    files = {"adapter_config.json": b'{"r": 16}', "weights/model.safetensors": os.urandom(300_000),
             "weights/deep/er.txt": b"deep", "empty.txt": b""}
    for rel, data in files.items():
        path = base / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return files


def _read_tree(base) -> dict[str, bytes]:
    return {str(p.relative_to(base)): p.read_bytes() for p in base.rglob("*") if p.is_file()}


def test_upload_download_round_trip(root, tmp_path):
    src = tmp_path / "src"
    files = _make_tree(src)
    target = storage.join(root, "run1/adapter")
    storage.upload_dir(src, target)
    assert sorted(f[len(target) + 1:] if storage.is_s3(target) else os.path.relpath(f, target)
                  for f in storage.list_files(target)) == sorted(files)

    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.txt").write_text("from before")
    storage.download_dir(target, out)
    assert _read_tree(out) == files  # replaced, not merged

    # re-upload after a file disappeared: the destination mirrors the source
    (src / "weights/deep/er.txt").unlink()
    (src / "adapter_config.json").write_bytes(b'{"r": 8}')
    storage.upload_dir(src, target)
    assert not storage.exists(storage.join(target, "weights/deep/er.txt"))
    assert storage.read_bytes(storage.join(target, "adapter_config.json")) == b'{"r": 8}'
    assert _leftovers(str(tmp_path / "store") if not storage.is_s3(root) else root) == []
    assert sorted(os.listdir(tmp_path)) == ["out", "src"] + (["store"] if not storage.is_s3(root) else [])


def test_directory_errors(root, tmp_path):
    with pytest.raises(StorageError, match="not found"):
        storage.download_dir(storage.join(root, "missing"), tmp_path / "dl")
    with pytest.raises(StorageError, match="not a directory"):
        storage.upload_dir(tmp_path / "no-such-dir", storage.join(root, "x"))
    assert not (tmp_path / "dl").exists()


# ------------------------------------------------------------------------------------------- atomicity


def test_atomic_writes_leave_no_temp_files(root):
    target = storage.join(root, "metrics.json")
    for step in range(3):
        storage.write_json(target, {"step": step})
        storage.write_parquet(pa.table({"x": [step]}), storage.join(root, "p.parquet"))
    assert storage.read_json(target) == {"step": 2}
    assert [os.path.basename(f) for f in storage.list_files(root)] == ["metrics.json", "p.parquet"]
    assert _leftovers(root if storage.is_s3(root) else storage.uris.local_path(root)) == []


def test_failed_write_keeps_old_content(root):
    target = storage.join(root, "state.json")
    storage.write_json(target, {"ok": True})

    def chunks():
        yield b'{"ok": fal'
        raise RuntimeError("producer died mid-write")

    with pytest.raises(RuntimeError, match="mid-write"):
        storage.write_bytes(target, chunks())
    assert storage.read_json(target) == {"ok": True}
    with pytest.raises(TypeError):
        storage.write_json(target, {"bad": object()})
    assert storage.read_json(target) == {"ok": True}
    with pytest.raises(RuntimeError):
        storage.write_bytes(storage.join(root, "new.bin"), chunks())
    assert not storage.exists(storage.join(root, "new.bin"))
    assert storage.list_files(root) == [target if storage.is_s3(root) else os.path.abspath(target)]
    assert _leftovers(root if storage.is_s3(root) else storage.uris.local_path(root)) == []


# ------------------------------------------------------------------------------------------- run ownership


def _claim(out):
    return storage.read_json(storage.join(out, storage.RUN_MARKER))


def test_a_claim_is_held_while_its_run_lives_and_freed_when_it_ends(root):
    out = storage.join(root, "outputs/run-a")
    first = storage.claim_run_dir(out, "run-a")
    assert first.created and _claim(out)["run_id"] == "run-a" and not _claim(out)["released"]
    with pytest.raises(StorageError, match="is in use by this run, still running"):
        storage.claim_run_dir(out, "run-a")  # the same run twice at once: never two trainings side by side
    first.release()
    assert _claim(out)["released"]
    again = storage.claim_run_dir(out, "run-a")  # a rerun or resume of a finished (or failed) run
    assert not again.created
    storage.write_text(storage.join(out, "adapter/weights.bin"), "w")
    again.release()
    with pytest.raises(StorageError, match="already holds another run's outputs \\(run 'run-a', e.g. adapter/"):
        storage.claim_run_dir(out, "run-b")
    assert _claim(out)["run_id"] == "run-a"  # not taken over


def test_a_failed_attempt_that_left_no_outputs_does_not_block_another_config(root):
    out = storage.join(root, "outputs/failed")
    storage.claim_run_dir(out, "r:config1").release()  # it failed after claiming, before writing any output
    storage.write_text(storage.join(out, "config.yaml"), "the failed attempt's config")
    fixed = storage.claim_run_dir(out, "r:config2")
    assert _claim(out)["run_id"] == "r:config2" and not fixed.created


def test_a_folder_with_files_but_no_claim_is_refused(root):
    foreign = storage.join(root, "outputs/by-hand")
    storage.write_text(storage.join(foreign, "notes.txt"), "someone else's")
    with pytest.raises(StorageError, match="holds files but no _phi2sum_run.json"):
        storage.claim_run_dir(foreign, "run-c")
    assert not storage.exists(storage.join(foreign, storage.RUN_MARKER))


def test_a_claim_from_another_machine_counts_until_its_heartbeat_is_stale(root):
    import time

    out = storage.join(root, "outputs/remote")
    record = {"run_id": "other:x", "token": "t", "host": "some-other-host", "pid": 1, "released": False}
    storage.write_json(storage.join(out, storage.RUN_MARKER), {**record, "heartbeat": time.time()})
    with pytest.raises(StorageError, match="is in use by run 'other:x', still running .* on some-other-host"):
        storage.claim_run_dir(out, "mine:y")
    storage.write_json(storage.join(out, storage.RUN_MARKER),
                       {**record, "heartbeat": time.time() - storage.claims.STALE_S - 1})
    storage.claim_run_dir(out, "mine:y").release()  # its holder is gone and it left nothing: taken over
    assert _claim(out)["run_id"] == "mine:y"


@pytest.mark.slow
def test_a_dead_local_process_does_not_hold_its_claim(tmp_path):
    import socket
    import subprocess
    import sys
    import time

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    out = str(tmp_path / "killed")
    storage.write_json(storage.join(out, storage.RUN_MARKER), {
        "run_id": "r:x", "token": "t", "host": socket.gethostname(), "pid": int(dead.stdout), "released": False,
        "heartbeat": time.time()})  # fresh, but its process is gone (SIGKILLed, say)
    assert not storage.claims.holder_alive(_claim(out))
    storage.claim_run_dir(out, "r:x").release()


def test_claim_run_dir_relative_local_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    storage.claim_run_dir("runs/r1/", "r1").release()
    storage.claim_run_dir("runs/r1", "r1").release()  # only the claim there: fine
    assert (tmp_path / "runs/r1" / storage.RUN_MARKER).is_file()


# ------------------------------------------------------------------------------------------- errors


def test_missing_file_names_uri(root):
    missing = storage.join(root, "nope/file.json")
    with pytest.raises(StorageError, match="not found") as err:
        storage.read_json(missing)
    assert missing in str(err.value)
    with pytest.raises(StorageError, match="not found"):
        storage.read_parquet(missing)


def test_missing_bucket(s3_env):
    uri = "s3://no-such-bucket-phi2sum/data/train.parquet"
    for call in (lambda: storage.read_bytes(uri), lambda: storage.write_text(uri, "x"),
                 lambda: storage.list_files("s3://no-such-bucket-phi2sum/data"), lambda: storage.read_parquet(uri)):
        with pytest.raises(StorageError, match="bucket 'no-such-bucket-phi2sum' does not exist") as err:
            call()
        assert "\n" not in str(err.value)
    assert storage.exists(uri) is False


def test_unreachable_endpoint_fails_fast(s3_env, monkeypatch):
    endpoint = f"http://127.0.0.1:{closed_port()}"
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    uri = storage.join(s3_env, "x.json")
    for call in (lambda: storage.read_json(uri), lambda: storage.write_json(uri, {}),
                 lambda: storage.list_files(s3_env), lambda: storage.exists(uri)):
        start = time.monotonic()
        with pytest.raises(StorageError) as err:
            call()
        assert time.monotonic() - start < 30
        msg = str(err.value)
        assert f"cannot reach S3 endpoint {endpoint}" in msg and "AWS_ENDPOINT_URL" in msg and uri[:10] in msg
        assert TEST_SECRET_ACCESS_KEY not in msg and "testing" not in msg


@pytest.fixture
def silent_server():
    """Accepts TCP connections and never answers: a hung endpoint, which only the timeouts can end."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    held = []

    def accept():
        while True:
            try:
                held.append(sock.accept()[0])
            except OSError:
                return

    threading.Thread(target=accept, daemon=True).start()
    yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    sock.close()
    for conn in held:
        conn.close()


def test_hung_endpoint_times_out(s3_env, silent_server, monkeypatch):
    monkeypatch.setattr(storage.fs, "REQUEST_TIMEOUT_S", 1.0)  # the wiring is what is tested, not the defaults
    monkeypatch.setattr(storage.fs, "MAX_ATTEMPTS", 2)
    monkeypatch.setenv("AWS_ENDPOINT_URL", silent_server)
    # 2 attempts x 1 s (+ boto3's 1 s wait for "100 Continue"); the SDK defaults would take far longer
    for call, limit in ((lambda: storage.read_bytes(storage.join(s3_env, "x")), 6),  # pyarrow path
                        (lambda: storage.write_bytes(storage.join(s3_env, "x"), b"x"), 10)):  # boto3 path
        start = time.monotonic()
        with pytest.raises(StorageError, match=f"cannot reach S3 endpoint {silent_server}"):
            call()
        assert time.monotonic() - start < limit


def test_rejected_credentials_by_moto(s3_env, s3_server, monkeypatch):
    """moto accepts any credentials by default; /moto-api/reset-auth makes it check them against its IAM."""
    iam = boto3.session.Session().client("iam", endpoint_url=s3_server.endpoint, region_name="us-east-1")
    user = f"u-{s3_env[-8:]}"
    iam.create_user(UserName=user)
    key = iam.create_access_key(UserName=user)["AccessKey"]
    uri = storage.join(s3_env, "data.json")
    cases = [
        ("AKIAUNKNOWNKEY000000", "some-secret-value-1", "does not know the access key id"),
        (key["AccessKeyId"], "wrong-secret-value-22", "rejected the request signature"),
        (key["AccessKeyId"], key["SecretAccessKey"], "access denied"),  # valid user, no policy
    ]
    s3_server.set_auth(True)
    try:
        for key_id, secret, expected in cases:
            monkeypatch.setenv("AWS_ACCESS_KEY_ID", key_id)
            monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
            with pytest.raises(StorageError, match=expected) as err:
                storage.write_json(uri, {"x": 1})
            with pytest.raises(StorageError, match="AWS_ACCESS_KEY_ID") as err_read:
                storage.read_json(uri)
            for msg in (str(err.value), str(err_read.value)):
                assert secret not in msg and key_id not in msg and uri in msg
    finally:
        s3_server.set_auth(False)


def _client_error(code: str, status: int, message: str) -> botocore.exceptions.ClientError:
    return botocore.exceptions.ClientError(
        {"Error": {"Code": code, "Message": message}, "ResponseMetadata": {"HTTPStatusCode": status}}, "PutObject"
    )


def test_error_mapping_is_distinct_and_redacted(monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:1")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAEXAMPLEKEYID1234")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s3cr3t/VALUE+abc")
    monkeypatch.setenv("AWS_SESSION_TOKEN", "tok-EXAMPLE-token")
    uri = "s3://bkt/run/x.json"
    leak = "key AKIAEXAMPLEKEYID1234 secret s3cr3t/VALUE+abc token tok-EXAMPLE-token"
    errors = {
        "unreach": botocore.exceptions.EndpointConnectionError(endpoint_url="http://127.0.0.1:1/bkt"),
        "keyid": _client_error("InvalidAccessKeyId", 403, leak),
        "sig": _client_error("SignatureDoesNotMatch", 403, leak),
        "token": _client_error("ExpiredToken", 400, leak),
        "denied": _client_error("AccessDenied", 403, leak),
        "bucket": _client_error("NoSuchBucket", 404, leak),
        "pyarrow": OSError(f"AWS Error SIGNATURE_DOES_NOT_MATCH during PutObject operation: {leak}"),
        "other": OSError(f"something odd: {leak}"),
    }
    messages = {name: str(storage.as_storage_error(exc, uri, "write")) for name, exc in errors.items()}
    assert "cannot reach S3 endpoint http://127.0.0.1:1" in messages["unreach"]
    assert "access key id" in messages["keyid"] and "AWS_ACCESS_KEY_ID" in messages["keyid"]
    assert "signature" in messages["sig"] and messages["pyarrow"] == messages["sig"]
    assert "AWS_SESSION_TOKEN" in messages["token"]
    assert "access denied" in messages["denied"]
    assert "bucket 'bkt' does not exist" in messages["bucket"]
    assert "something odd" in messages["other"] and "***" in messages["other"]
    distinct = [messages[k] for k in ("unreach", "keyid", "sig", "token", "denied", "bucket", "other")]
    assert len(set(distinct)) == len(distinct)
    for msg in messages.values():
        assert uri in msg and "\n" not in msg
        for secret in ("AKIAEXAMPLEKEYID1234", "s3cr3t/VALUE+abc", "tok-EXAMPLE-token"):
            assert secret not in msg
    assert isinstance(storage.as_storage_error(errors["other"], uri), StorageError)


def test_local_error_mapping(tmp_path):
    # Tests run as root here, so chmod cannot make a real EACCES: map a constructed PermissionError instead.
    msg = str(storage.as_storage_error(PermissionError(13, "Permission denied"), "/data/out.json", "write"))
    assert msg.startswith("permission denied to write /data/out.json") and "permissions" in msg
    (tmp_path / "file").write_text("x")
    with pytest.raises(StorageError, match="cannot write"):  # a file where a directory must go
        storage.write_text(str(tmp_path / "file" / "child.txt"), "x")


def test_redact(monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "very-secret")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIA123")
    monkeypatch.delenv("AWS_SESSION_TOKEN", raising=False)
    assert storage.redact("a very-secret b AKIA123 c") == "a *** b *** c"
    assert storage.redact("nothing here") == "nothing here"
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s")  # too short to hide: not worth garbling every "s"
    assert storage.redact("bucket s3://x") == "bucket s3://x"


def test_invalid_json_is_storage_error(root):
    storage.write_text(storage.join(root, "bad.json"), "{not json")
    with pytest.raises(StorageError, match="not valid JSON"):
        storage.read_json(storage.join(root, "bad.json"))


def test_a_path_through_a_regular_file_says_so(tmp_path):
    blocker = tmp_path / "results.txt"
    blocker.write_text("not a folder")
    with pytest.raises(StorageError, match=r"results.txt is a file, not a folder; choose another location"):
        storage.write_text(str(blocker / "run" / "config.yaml"), "x")
    with pytest.raises(StorageError, match=r"results.txt is a file, not a folder"):
        storage.read_text(str(blocker / "run" / "config.yaml"))
    assert blocker.read_text() == "not a folder"

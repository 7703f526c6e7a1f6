"""A real moto S3 server in a child process, so tests exercise the same HTTP paths as MinIO or AWS
(pyarrow's C++ client and boto3), not an in-process mock that only patches boto3."""

from __future__ import annotations

import http.client
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# Credentials the fixtures put in the environment (moto accepts any unless auth is enforced).
TEST_ACCESS_KEY_ID = "testing"
TEST_SECRET_ACCESS_KEY = "testing-secret-value"


def free_port() -> int:
    """A TCP port that was free a moment ago (good enough for a test server)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class MotoServer:
    """Start/stop ``moto_server`` on 127.0.0.1 and expose its ``endpoint`` (``http://127.0.0.1:PORT``)."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        self.host = host
        self.port: int | None = None
        self.proc: subprocess.Popen | None = None
        self._log = None

    @property
    def endpoint(self) -> str:
        return f"http://{self.host}:{self.port}"

    def _command(self) -> list[str]:
        exe = Path(sys.executable).with_name("moto_server")
        args = ["-H", self.host, "-p", str(self.port)]
        return [str(exe), *args] if exe.exists() else [sys.executable, "-m", "moto.server", *args]

    def _answers(self) -> bool:
        # http.client, not urllib: no proxy settings from the environment get in the way.
        conn = http.client.HTTPConnection(self.host, self.port, timeout=2)
        try:
            conn.request("GET", "/moto-api/data.json")
            return conn.getresponse().status < 500
        except OSError:
            return False
        finally:
            conn.close()

    def start(self, timeout: float = 30.0, port: int | None = None) -> MotoServer:
        """Start on a free port, or on `port` (a restart that keeps the endpoint a job was configured with)."""
        self._log = tempfile.TemporaryFile()
        for _ in range(1 if port else 3):  # a free port may be taken between probing and binding: try another
            self.port = port or free_port()
            env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
            self.proc = subprocess.Popen(self._command(), stdout=self._log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, env=env)
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline and self.proc.poll() is None:
                if self._answers():
                    return self
                time.sleep(0.1)
            self.stop()
        self._log.seek(0)
        tail = self._log.read()[-2000:].decode(errors="replace")
        raise RuntimeError(f"moto_server did not start: {tail}")

    def restart(self) -> MotoServer:
        """Stop and start again on the same port: moto keeps its state in memory, so it comes back empty."""
        port = self.port
        self.stop()
        return self.start(port=port)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        self.proc = None

    def set_auth(self, enforce: bool) -> None:
        """Make moto check credentials (it accepts any by default) or stop checking them.

        Uses moto's ``/moto-api/reset-auth``: with a count of 0 every later request is authenticated against
        moto's IAM, so unknown keys, wrong secrets and users without a policy are rejected with 403.
        """
        conn = http.client.HTTPConnection(self.host, self.port, timeout=5)
        try:
            conn.request("POST", "/moto-api/reset-auth", body=b"0" if enforce else b"inf",
                         headers={"Content-Type": "text/plain"})
            response = conn.getresponse()
            response.read()
            if response.status != 200:
                raise RuntimeError(f"moto reset-auth answered {response.status}")
        finally:
            conn.close()

    def __enter__(self) -> MotoServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def closed_port() -> int:
    """A port nobody listens on (an unreachable endpoint)."""
    return free_port()


def admin_client(endpoint: str):
    """A boto3 client that sees the bucket as it is, bypassing phi2sum (moto's admin, when auth is enforced)."""
    import boto3

    return boto3.session.Session(aws_access_key_id="admin", aws_secret_access_key="admin-secret").client(
        "s3", endpoint_url=endpoint, region_name="us-east-1")


def new_bucket(client, prefix: str = "t") -> str:
    import uuid

    name = f"{prefix}-{uuid.uuid4().hex[:12]}"
    client.create_bucket(Bucket=name)
    return name


def objects(client, bucket: str, prefix: str = "") -> dict[str, bytes]:
    """Every object under `prefix`, key -> bytes."""
    keys = [o["Key"] for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
            for o in page.get("Contents", [])]
    return {k: client.get_object(Bucket=bucket, Key=k)["Body"].read() for k in keys}


def aws_env(endpoint: str, **credentials: str) -> dict[str, str]:
    """The AWS variables a job needs to reach `endpoint` (the test credentials unless others are given)."""
    return {"AWS_ENDPOINT_URL": endpoint, "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true",
            "AWS_ACCESS_KEY_ID": TEST_ACCESS_KEY_ID, "AWS_SECRET_ACCESS_KEY": TEST_SECRET_ACCESS_KEY, **credentials}

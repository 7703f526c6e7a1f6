"""A real Ray head (`ray start --head`) for the tests, and `ray job submit` against it.

The head runs from this venv (so jobs' `python` is the venv's), on 127.0.0.1 with the dashboard on (the job
server lives there), offline Hugging Face flags set, and is stopped afterwards.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from support.s3 import free_port

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


@dataclass
class JobResult:
    submission_id: str
    status: str
    logs: str
    returncode: int


class RayHead:
    def __init__(self, num_cpus: int = 2) -> None:
        self.num_cpus = num_cpus
        self.port = free_port()
        self.dashboard_port = free_port()
        self.temp_dir = tempfile.mkdtemp(prefix="ray-")  # short path: Ray's socket names have a length limit
        self.env = {
            **os.environ,
            "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
            "HF_HUB_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false",
            "RAY_USAGE_STATS_ENABLED": "0",
            "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
            # A loopback-only test cluster: no token auth (Ray 2.60 turns it on when ~/.ray/auth_token exists).
            "RAY_AUTH_MODE": "disabled",
        }
        for var in [k for k in self.env if k.startswith("AWS_")]:  # jobs get credentials only as users pass them
            del self.env[var]

    @property
    def address(self) -> str:
        """The GCS address, for `ray.init(address=...)` / `ray.address=` from this process."""
        return f"127.0.0.1:{self.port}"

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def _ray(self, *args: str, timeout: float = 120, **kwargs) -> subprocess.CompletedProcess:
        return subprocess.run([str(BIN / "ray"), *args], env=self.env, capture_output=True, text=True,
                              timeout=timeout, **kwargs)

    def start(self) -> RayHead:
        proc = self._ray("start", "--head", "--node-ip-address=127.0.0.1", f"--port={self.port}",
                         f"--num-cpus={self.num_cpus}", "--num-gpus=0", "--include-dashboard=true",
                         "--dashboard-host=127.0.0.1", f"--dashboard-port={self.dashboard_port}",
                         f"--temp-dir={self.temp_dir}", "--disable-usage-stats")
        if proc.returncode != 0:
            raise RuntimeError(f"ray start failed:\n{proc.stdout}\n{proc.stderr}")
        deadline = time.time() + 60
        while time.time() < deadline:  # the job server comes up a little after the GCS
            if self._ray("job", "list", f"--address={self.dashboard_url}", timeout=30).returncode == 0:
                return self
            time.sleep(1)
        raise RuntimeError("the Ray dashboard's job server did not come up")

    def stop(self) -> None:
        """Stop this head's processes only: `ray stop` would kill every Ray cluster on the machine.

        Every process of the head names its temp dir on its command line, and workers are their children.
        """
        import shutil

        import psutil

        roots = []
        for proc in psutil.process_iter(["cmdline"]):
            try:
                if any(self.temp_dir in part for part in proc.info["cmdline"] or []):
                    roots.append(proc)
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        victims = {}
        for root in roots:
            try:
                for proc in [root, *root.children(recursive=True)]:
                    victims[proc.pid] = proc
            except psutil.NoSuchProcess:
                continue
        for proc in victims.values():
            try:
                proc.terminate()
            except psutil.NoSuchProcess:
                pass
        _, alive = psutil.wait_procs(list(victims.values()), timeout=15)
        for proc in alive:
            try:
                proc.kill()
            except psutil.NoSuchProcess:
                pass
        shutil.rmtree(self.temp_dir, ignore_errors=True)

    def submit(self, module: str, *args: str, env_vars: dict[str, str] | None = None,
               submission_id: str | None = None, timeout: float = 600) -> JobResult:
        """`ray job submit --working-dir <repo> -- python -m <module> <args>`; waits, returns status and logs."""
        import json
        import uuid

        submission_id = submission_id or f"test-{uuid.uuid4().hex[:8]}"
        runtime_env = {"env_vars": env_vars or {}}
        for attempt in range(24):  # the head's job agent can be briefly unavailable on a loaded 2-core machine
            proc = self._ray("job", "submit", f"--address={self.dashboard_url}", f"--submission-id={submission_id}",
                             f"--working-dir={self.working_dir()}", f"--runtime-env-json={json.dumps(runtime_env)}",
                             "--", "python", "-m", module, *args, timeout=timeout, cwd=str(REPO))
            if proc.returncode == 0 or self.exists(submission_id) or "No available agent" not in proc.stderr:
                break
            time.sleep(5)
        if proc.returncode != 0 and not self.exists(submission_id):
            raise RuntimeError(f"ray job submit failed before the job existed:\n{proc.stdout[-2000:]}\n"
                               f"{proc.stderr[-3000:]}")
        status = self.status(submission_id)
        logs = self._ray("job", "logs", f"--address={self.dashboard_url}", submission_id).stdout
        return JobResult(submission_id, status, logs, proc.returncode)

    def working_dir(self) -> str:
        """What the jobs ship: a copy of `jobs/` and `phi2sum/` taken once per head, as `ray job submit` users ship
        their project. Not the checkout itself: other tests (a parallel pytest-xdist lane) write into it while
        Ray zips it, and a file that vanishes mid-upload fails the submission."""
        import shutil

        target = Path(self.temp_dir) / "working_dir"
        if not target.exists():
            staging = Path(tempfile.mkdtemp(dir=self.temp_dir))
            for package in ("jobs", "phi2sum"):
                shutil.copytree(REPO / package, staging / package,
                                ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
            staging.rename(target)
        return str(target)

    def exists(self, submission_id: str) -> bool:
        from ray.job_submission import JobSubmissionClient

        os.environ["RAY_AUTH_MODE"] = "disabled"
        try:
            JobSubmissionClient(self.dashboard_url).get_job_info(submission_id)
        except RuntimeError:
            return False
        return True

    def status(self, submission_id: str) -> str:
        from ray.job_submission import JobSubmissionClient

        os.environ["RAY_AUTH_MODE"] = "disabled"
        return str(JobSubmissionClient(self.dashboard_url).get_job_status(submission_id).value)

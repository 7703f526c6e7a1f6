"""Running phi2sum as a user does (the `phi2sum` CLI, `python -m jobs.*`) and checking its one-line errors."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
PHI2SUM = str(BIN / "phi2sum")


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without any AWS_* variable (each test passes exactly the ones it means), plus `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", AWS_EC2_METADATA_DISABLED="true")
    env.update(extra)
    return env


def run(argv: list[str], env: dict[str, str] | None = None, timeout: float = 600,
        cwd: str | Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, cwd=str(cwd),
                          env=env if env is not None else clean_env())


def phi2sum(*args: str, env: dict[str, str] | None = None, timeout: float = 600,
            cwd: str | Path = REPO) -> subprocess.CompletedProcess:
    """The `phi2sum` command, in `cwd` (the checkout by default)."""
    return run([PHI2SUM, *args], env=env, timeout=timeout, cwd=cwd)


def job(module: str, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """A Ray job's entry point run directly (what `ray job submit -- python -m jobs.x` runs on the head)."""
    return run([sys.executable, "-m", module, *args], env=env)


def one_line_error(proc: subprocess.CompletedProcess, prog: str = "phi2sum") -> str:
    """Exit 2, no traceback, exactly one `<prog>: error:` line and it is the last thing on stderr; returns it."""
    where = f"\n--- stdout\n{proc.stdout[-2000:]}\n--- stderr\n{proc.stderr[-4000:]}"
    assert proc.returncode == 2, f"exit {proc.returncode}{where}"
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout, where
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and errors[0].startswith(f"{prog}: error: "), where
    assert proc.stderr.rstrip().splitlines()[-1] == errors[0], where
    return errors[0]

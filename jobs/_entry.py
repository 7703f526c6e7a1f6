"""Shared plumbing of the job entry points: argument parsing, logging and one-line errors."""

from __future__ import annotations

import argparse
import sys
from typing import Callable


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--config", "-c", default=None, help="YAML config or preset name in jobs/configs")
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides")
    return p


def run_job(name: str, body: Callable[[], None]) -> int:
    """Run a job body; a user-fixable problem prints one line and exits 2, with secrets redacted."""
    from phi2sum.cli import setup_logging
    from phi2sum.errors import Phi2SumError
    from phi2sum.storage import redact

    setup_logging()
    try:
        body()
    except Phi2SumError as exc:
        print(f"{name}: error: {redact(str(exc))}", file=sys.stderr)
        return 2
    return 0


def job_args(items: list[str], required: tuple[str, ...] = (), optional: tuple[str, ...] = ()):
    """Split `key=value` items into job arguments (plain keys like output=, shard=) and config overrides."""
    names = set(required) | set(optional)
    job, overrides = {}, []
    for item in items:
        key, sep, value = item.partition("=")
        if sep and key in names:
            job[key] = value
        else:
            overrides.append(item)
    missing = [k for k in required if k not in job]
    if missing:
        print(f"error: missing {', '.join(f'{k}=...' for k in missing)} (see --help)", file=sys.stderr)
        sys.exit(2)
    return job, overrides

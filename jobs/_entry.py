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
    from phi2sum.storage import redact

    setup_logging()
    try:
        body()
    except Exception as exc:
        user = user_error(exc)
        if user is None:
            raise  # a bug: keep the stack trace
        line = (str(user).strip().splitlines() or [type(user).__name__])[0]
        print(f"{name}: error: {redact(line)}", file=sys.stderr)
        return 2
    return 0


def user_error(exc: BaseException):
    """The user-fixable `Phi2SumError` behind `exc`, or None.

    A Phi2SumError raised in a Ray task or actor (e.g. S3 going away while an actor writes its part) reaches the
    driver wrapped in a `RayTaskError` whose text is a remote stack trace; the original is its `.cause`.
    """
    from phi2sum.errors import Phi2SumError

    seen: set[int] = set()
    todo: list[BaseException | None] = [exc]
    while todo:
        err = todo.pop(0)
        if err is None or id(err) in seen:
            continue
        seen.add(id(err))
        cause = getattr(err, "cause", None)
        cause = cause if isinstance(cause, BaseException) else None
        if isinstance(err, Phi2SumError) and cause is None:
            return err
        todo += [cause, err.__cause__]  # not __context__: a bug raised while handling an error stays a bug
    return None


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

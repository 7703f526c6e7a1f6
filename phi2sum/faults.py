"""Test-only fault injection, so tests can kill a training worker or a summarize actor at a chosen point.

Set `PHI2SUM_FAULT=<point>@<n>[:kill|:hang]` (points: `train_step`, `summarize_batch`) and
`PHI2SUM_FAULT_ONCE=<file>`. The first process to reach the point creates the file and dies (an exception, or
SIGKILL with `:kill`) or, with `:hang`, blocks until it is killed (a stuck job, for tests that stop it from
outside); the file makes later attempts pass, so a retried worker gets past the point. Unset in normal use: a
no-op.
"""

from __future__ import annotations

import os
import signal
import time

ENV = "PHI2SUM_FAULT"
ONCE_ENV = "PHI2SUM_FAULT_ONCE"


class InjectedFault(RuntimeError):
    """Raised at an injected fault point (only ever in tests)."""


def maybe_fail(point: str, count: int) -> None:
    spec = os.environ.get(ENV)
    if not spec:
        return
    where, _, mode = spec.partition(":")
    name, _, at = where.partition("@")
    if name != point or not at.isdigit() or count != int(at):
        return
    once = os.environ.get(ONCE_ENV)
    if once:
        try:
            fd = os.open(once, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return  # already failed once: let the retry through
        os.close(fd)
    if mode == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    if mode == "hang":
        while True:
            time.sleep(3600)
    raise InjectedFault(f"injected fault at {point} {count} (PHI2SUM_FAULT={spec})")

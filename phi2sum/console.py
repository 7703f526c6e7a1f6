"""What a person sees: logging set-up, the one user-error handler of every entry point, and metric tables.

`run_command` is used by the `phi2sum` CLI, every `python -m jobs.*` entry point and `jobs.gpu_check`: a problem
the user can fix (a `Phi2SumError`, also when it comes back from a Ray worker) prints one redacted line and exits
2; Ctrl-C says how to resume; anything else is a bug and keeps its stack trace.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any, Callable

from phi2sum.errors import user_error
from phi2sum.eval.metrics import ROUGE_TYPES
from phi2sum.storage import redact

QUIET_LOGGERS = ("urllib3", "botocore", "filelock", "fsspec", "httpx", "datasets", "matplotlib", "PIL")


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in QUIET_LOGGERS:
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # Read by transformers when it is imported: importing it here would cost every command, a config error
    # included, seconds before it could say anything.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "warning")


def run_command(prog: str, body: Callable[[], None]) -> int:
    """Run an entry point's body; returns the exit code (0, 2 for a user error, 130 when interrupted)."""
    try:
        body()
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; rerun the same command (same run.name) to resume", file=sys.stderr)
        return 130
    except Exception as exc:
        problem = user_error(exc)
        if problem is None:
            raise  # a bug: keep the stack trace
        line = (str(problem).strip().splitlines() or [type(problem).__name__])[0]
        print(f"{prog}: error: {redact(line)}", file=sys.stderr)
        return 2
    return 0


def format_metrics(metrics: dict[str, Any]) -> str:
    lines = [f"ROUGE F1 x100 over {metrics['count']} examples (95% bootstrap interval):"]
    for name in ROUGE_TYPES:
        m = metrics[name]
        if m["mean"] is not None:
            lines.append(f"  {name:<10} {100 * m['mean']:6.2f}  [{100 * m['low']:.2f}, {100 * m['high']:.2f}]")
    return "\n".join(lines)


def format_before_after(before: dict[str, Any], after: dict[str, Any]) -> str:
    lines = ["ROUGE F1 x100     before (base model)   after (fine-tuned)"]
    for name in ROUGE_TYPES:
        lines.append(f"  {name:<10} {100 * before[name]['mean']:>18.2f} {100 * after[name]['mean']:>20.2f}")
    return "\n".join(lines)

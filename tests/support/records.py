"""Small real records and files to feed the jobs."""

from __future__ import annotations

import json
from pathlib import Path


def good(i: int) -> dict:
    return {"id": f"g{i}", "document": f"The council of town {i} voted on Monday to build a new bridge over the "
                                       f"river, after years of delays.", "summary": f"Town {i} will build a bridge."}


def write_jsonl(path: Path, rows: list) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)

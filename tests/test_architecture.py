"""The layout's rules (docs/architecture.md), checked on the source: no import cycle among phi2sum's modules
(function-level imports included), Ray only under phi2sum/distributed, storage on nothing but errors (and the
test-only faults), small
modules; and the package works installed, outside the checkout."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "phi2sum"
MAX_MODULE_LINES = 450


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in PACKAGE.rglob("*.py")}


def imported(path: Path, known: set[str]) -> set[str]:
    """phi2sum modules `path` imports anywhere in its body (inside functions too)."""
    name = module_name(path)
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        targets = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = ".".join(package[: len(package) - node.level + 1] + [node.module or ""]) if node.level \
                else node.module or ""
            targets = [base.rstrip("."), *(f"{base.rstrip('.')}.{alias.name}" for alias in node.names)]
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: imported(path, set(mods)) for name, path in mods.items()}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in edges:
        if v not in index:
            visit(v)
    return found


def test_no_import_cycle():
    assert cycles(graph()) == []


def test_the_cycle_check_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_ray_is_imported_only_in_phi2sum_distributed():
    for name, path in modules().items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        uses_ray = any(
            (isinstance(n, ast.Import) and any(a.name.split(".")[0] == "ray" for a in n.names))
            or (isinstance(n, ast.ImportFrom) and (n.module or "").split(".")[0] == "ray" and not n.level)
            for n in ast.walk(tree))
        assert not uses_ray or name.startswith("phi2sum.distributed"), name


def test_storage_depends_on_nothing_but_errors_and_faults():
    edges = graph()
    for name in edges:
        if name.startswith("phi2sum.storage"):
            assert {t for t in edges[name] if not t.startswith("phi2sum.storage")} <= {"phi2sum.errors",
                                                                                      "phi2sum.faults"}, name


def test_modules_stay_small():
    sizes = {name: len(path.read_text(encoding="utf-8").splitlines()) for name, path in modules().items()}
    assert {n: s for n, s in sizes.items() if s > MAX_MODULE_LINES} == {}


def phi2sum_names_used_by(path: Path) -> set[tuple[str, str]]:
    """(module, name) for every `from phi2sum... import name` in a file, top level or inside functions."""
    return {(node.module, alias.name) for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("phi2sum")
            for alias in node.names}


def test_the_benchmarks_and_jobs_import_what_exists():
    """Benchmarks import inside their functions and no test runs them: a renamed module must not rot them."""
    import importlib

    files = [*(REPO / "tests" / "benchmarks").glob("*.py"), *(REPO / "jobs").glob("*.py")]
    missing = []
    for path in files:
        for module, name in sorted(phi2sum_names_used_by(path)):
            try:
                target = importlib.import_module(module)
            except ImportError as exc:
                missing.append(f"{path.name}: {module} ({exc})")
                continue
            if not hasattr(target, name):
                try:
                    importlib.import_module(f"{module}.{name}")
                except ImportError:
                    missing.append(f"{path.name}: {module}.{name}")
    assert files and missing == []


@pytest.mark.slow
def test_a_non_editable_install_works_outside_the_checkout(tmp_path):
    """Presets are package data: an installed phi2sum finds them from any directory."""
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--target",
                    str(target), str(REPO)], check=True, capture_output=True, timeout=300)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(target), "HF_HUB_OFFLINE": "1"}
    plan = subprocess.run([str(target / "bin" / "phi2sum"), "plan", "--config", "phi2-xsum-t4"], cwd=elsewhere,
                          env=env, capture_output=True, text=True, timeout=120)
    assert plan.returncode == 0, plan.stderr[-2000:]
    assert "FITS on one T4" in plan.stdout
    probe = ("import phi2sum.config as c; cfg = c.load_config('tiny-cpu'); "
             "print(c.__file__); print(cfg.model.base, cfg.data.source)")
    loaded = subprocess.run([sys.executable, "-c", probe], cwd=elsewhere, env=env, capture_output=True, text=True,
                            timeout=120)
    assert loaded.returncode == 0, loaded.stderr[-2000:]
    where, values = loaded.stdout.strip().splitlines()
    assert where.startswith(str(target)) and values == "embedded:tiny-phi embedded:synthetic-xsum"

"""The CLI: help that explains, and one-line errors with a non-zero exit instead of stack traces."""

from __future__ import annotations

import subprocess

import pytest

from support.processes import clean_env, phi2sum


def cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return phi2sum(*args, env=clean_env(**(env or {})), timeout=300)


def test_help_lists_the_commands():
    out = cli("--help")
    assert out.returncode == 0
    for command in ("run", "train", "summarize", "evaluate", "demo", "report", "plan"):
        assert command in out.stdout
    sub = cli("run", "--help")
    assert sub.returncode == 0 and "section.key=value" in sub.stdout and "--config" in sub.stdout


@pytest.mark.parametrize("args, message", [
    (["run", "--config", "tiny-cpu", "train.learnin_rate=1"], "did you mean 'train.learning_rate'"),
    (["run", "--config", "tiny-cpu", "generation.num_beams=0"], "'generation.num_beams' is 0"),
    (["run", "--config", "no-such-preset"], "not found"),
    (["run", "--config", "tiny-cpu", "model.base=/nonexistent/model"], "model path '/nonexistent/model' does not exist"),
    (["evaluate", "--predictions", "/nonexistent/predictions.parquet"], "/nonexistent/predictions.parquet"),
])
def test_user_errors_are_one_line(args, message):
    out = cli(*args)
    assert out.returncode == 2, out.stderr
    lines = [line for line in out.stderr.splitlines() if line.strip() and " WARNING " not in line]
    assert len(lines) == 1 and lines[0].startswith("phi2sum: error: "), out.stderr
    assert message in lines[0]
    assert "Traceback" not in out.stderr


def test_phi2_recipe_offline_says_the_model_could_not_be_fetched(tmp_path):
    out = cli("run", "--config", "phi2-xsum-t4", f"storage.output={tmp_path}",
              env={"HF_HOME": str(tmp_path / "hf")})
    assert out.returncode == 2
    assert "could not fetch model 'microsoft/phi-2'" in out.stderr and "Traceback" not in out.stderr
    assert not any(tmp_path.glob("run-*"))  # failed before writing anything


def test_demo_runs_from_its_default_relative_output_folder(tmp_path):
    """`make demo` as a user runs it: the default `storage.output=runs` is relative to the working directory."""
    out = phi2sum("demo", "data.num_train=32", "data.num_eval=8", "train.epochs=1", cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "before (base model)   after (fine-tuned)" in out.stdout
    [run] = list((tmp_path / "runs").iterdir())
    report = f"runs/{run.name}/report/report.md"
    assert out.stdout.rstrip().endswith(f"report: {report}")
    assert "## Next steps" in (tmp_path / report).read_text()

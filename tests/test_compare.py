"""`phi2sum compare`: the paired bootstrap on arrays whose answer is known, the id checks, every kind of
location (run folder, predictions.parquet, summarize output, s3://), the outputs, and the CLI on the real tiny
run (baseline vs fine-tuned)."""

from __future__ import annotations

import io
import json
import re
import shutil

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from phi2sum import storage
from phi2sum.cli import main
from phi2sum.errors import DataError
from phi2sum.eval.compare import (OUTPUT_FILES, compare, default_out_dir, load_scores, location_name,
                                  paired_bootstrap, write_comparison)
from phi2sum.eval.metrics import ROUGE_LABELS, ROUGE_TYPES, score_examples

# --------------------------------------------------------------------------------------------- helpers


def write_predictions(uri: str, ids, scores=None, with_reference=True) -> None:
    """A predictions.parquet: per-example ROUGE columns when `scores` (id -> value for every type) is given."""
    rows = []
    for i in ids:
        row = {"id": str(i), "prediction": f"the cat sat on mat {i}"}
        if with_reference:
            row["reference"] = f"the cat sat on the mat {i} today"
        if scores is not None:
            row.update({name: scores[i] for name in ROUGE_TYPES})
        rows.append(row)
    storage.write_parquet(pa.Table.from_pylist(rows), uri)


def two_runs(tmp_path, ids_a, ids_b, gain=0.1):
    """Run folders A and B whose B scores `gain` above A on every id (ids are ints)."""
    rng = np.random.default_rng(1)
    base = {i: float(rng.uniform(0.1, 0.5)) for i in set(ids_a) | set(ids_b)}
    a, b = str(tmp_path / "run-a"), str(tmp_path / "run-b")
    write_predictions(storage.join(a, "predictions.parquet"), ids_a, base)
    write_predictions(storage.join(b, "predictions.parquet"), ids_b,
                      {i: v + gain + float(rng.normal(0, 0.02)) for i, v in base.items()})
    return a, b


def check_png(data: bytes) -> None:
    image = Image.open(io.BytesIO(data)).convert("RGB")
    assert image.size[0] >= 600 and image.size[1] >= 400
    assert len(image.getcolors(maxcolors=1 << 22)) > 50  # drawn, not blank


def table_cells(markdown: str, label: str) -> list[str]:
    for line in markdown.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and cells[0] == label:
            return cells
    raise AssertionError(f"no row {label!r} in\n{markdown}")


# --------------------------------------------------------------------------------------------- the bootstrap


def test_a_clear_improvement_has_an_interval_above_zero_and_a_small_p():
    rng = np.random.default_rng(0)
    a = rng.uniform(0.1, 0.5, 200)
    b = a + 0.03 + rng.normal(0, 0.05, 200)
    boot = paired_bootstrap(a, b)
    assert boot.delta == pytest.approx(float(np.mean(b - a)))
    assert 0 < boot.low < boot.delta < boot.high
    assert boot.p_value < 0.001
    # swapping the sides mirrors everything: the same seed draws the same resamples
    mirrored = paired_bootstrap(b, a)
    assert mirrored.delta == pytest.approx(-boot.delta)
    assert (mirrored.low, mirrored.high) == pytest.approx((-boot.high, -boot.low))
    assert mirrored.p_value == pytest.approx(boot.p_value)


def test_identical_inputs_give_zero_and_p_one():
    a = np.random.default_rng(3).uniform(0, 1, 50)
    boot = paired_bootstrap(a, a.copy())
    assert (boot.delta, boot.low, boot.high, boot.p_value) == (0.0, 0.0, 0.0, 1.0)


def test_no_difference_on_average_is_not_significant():
    a = np.full(100, 0.3)
    b = a + np.tile([0.05, -0.05], 50)  # mean difference exactly 0, symmetric
    boot = paired_bootstrap(a, b)
    assert boot.low < 0 < boot.high
    assert boot.p_value > 0.5


def test_the_seed_decides_the_resamples():
    rng = np.random.default_rng(5)
    a, b = rng.uniform(0, 1, 60), rng.uniform(0, 1, 60)
    assert paired_bootstrap(a, b, seed=7) == paired_bootstrap(a, b, seed=7)
    assert paired_bootstrap(a, b, seed=7).low != paired_bootstrap(a, b, seed=8).low


def test_the_interval_narrows_as_the_ids_grow():
    rng = np.random.default_rng(11)

    def width(n: int) -> float:
        a = rng.uniform(0.1, 0.5, n)
        boot = paired_bootstrap(a, a + 0.02 + rng.normal(0, 0.1, n), n_samples=4000)
        return boot.high - boot.low

    small, large = width(50), width(800)
    assert large < 0.5 * small  # ~1/sqrt(16) = 0.25 expected


def test_bad_arrays_are_refused():
    with pytest.raises(ValueError, match="same length"):
        paired_bootstrap([0.1, 0.2], [0.1])
    with pytest.raises(ValueError, match="non-empty"):
        paired_bootstrap([], [])


# --------------------------------------------------------------------------------------------- ids and locations


def test_differing_ids_are_refused_and_nothing_is_written(tmp_path, capsys):
    a, b = two_runs(tmp_path, range(10), [*range(9), 99])
    assert main(["compare", a, b]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("phi2sum: error: A has 10 ids and B 10, 9 shared; pass --intersect to compare on the shared ids")
    assert not storage.exists(default_out_dir(a, b))
    assert sorted(p.name for p in (tmp_path / "run-b").iterdir()) == ["predictions.parquet"]


def test_intersect_compares_on_the_shared_ids(tmp_path, capsys):
    a, b = two_runs(tmp_path, range(30), [*range(5, 30), 100, 101], gain=0.1)
    assert main(["compare", a, b, "--intersect", "--samples", "2000", "--seed", "3"]) == 0
    out = default_out_dir(a, b)
    assert out == storage.join(b, "compare-vs-run-a")
    assert sorted(storage.list_relative(out)) == sorted(OUTPUT_FILES)
    saved = json.loads(storage.read_text(storage.join(out, "comparison.json")))
    assert (saved["shared_ids"], saved["only_a"], saved["only_b"]) == (25, 5, 2)
    assert saved["bootstrap"]["samples"] == 2000 and saved["bootstrap"]["seed"] == 3
    frame_a = storage.read_parquet(storage.join(a, "predictions.parquet")).to_pandas().set_index("id")
    frame_b = storage.read_parquet(storage.join(b, "predictions.parquet")).to_pandas().set_index("id")
    shared = [str(i) for i in range(5, 30)]
    for name in ROUGE_TYPES:
        m = saved["metrics"][name]
        assert m["mean_a"] == pytest.approx(frame_a.loc[shared, name].mean())
        assert m["mean_b"] == pytest.approx(frame_b.loc[shared, name].mean())
        assert m["delta"] == pytest.approx(m["mean_b"] - m["mean_a"]) and m["low"] > 0.05
    printed = capsys.readouterr().out
    cells = table_cells(printed, "ROUGE-L")
    assert float(cells[3]) == pytest.approx(100 * saved["metrics"]["rougeL"]["delta"], abs=0.006)
    assert "25 shared ids (A has 30, B 27; --intersect)" in printed and f"comparison: {out}" in printed
    assert storage.read_text(storage.join(out, "comparison.md")) in printed
    check_png(storage.read_bytes(storage.join(out, "comparison.png")))


def test_no_shared_ids_is_an_error_even_with_intersect(tmp_path):
    a, b = two_runs(tmp_path, range(5), range(10, 15))
    with pytest.raises(DataError, match="share no ids"):
        compare(load_scores(a), load_scores(b), intersect=True)


def test_a_summarize_output_is_scored_from_its_references(tmp_path):
    """A Ray output keeps no per-example ROUGE: its parts are read across shards and scored here."""
    output = str(tmp_path / "preds")
    for shard, ids in ((0, range(0, 6)), (1, range(6, 12))):
        folder = storage.join(output, f"shard-{shard}-of-2")
        write_predictions(storage.join(folder, f"part-{shard:020d}.parquet"), ids)
        storage.write_json(storage.join(folder, "_SUCCESS.json"), {"rows": len(ids)})
    scores = load_scores(output)
    assert scores.scored_here and scores.name == "preds" and len(scores.frame) == 12
    expected = score_examples([f"the cat sat on mat {i}" for i in range(12)],
                              [f"the cat sat on the mat {i} today" for i in range(12)])
    for name in ROUGE_TYPES:
        np.testing.assert_allclose(scores.frame.loc[[str(i) for i in range(12)], name], [e[name] for e in expected])
    run = str(tmp_path / "run")
    write_predictions(storage.join(run, "predictions.parquet"), range(12), {i: 0.9 for i in range(12)})
    result = compare(scores, load_scores(storage.join(run, "predictions.parquet")), n_samples=500)
    assert result.b.name == "run" and not result.b.scored_here
    assert result.metrics[0].delta == pytest.approx(0.9 - float(scores.frame["rouge1"].mean()))
    storage.delete(storage.join(output, "shard-1-of-2", "_SUCCESS.json"))
    with pytest.raises(Exception, match="missing or incomplete"):
        load_scores(output)


def test_predictions_without_scores_or_references_are_refused(tmp_path):
    uri = str(tmp_path / "bare" / "predictions.parquet")
    write_predictions(uri, range(3), with_reference=False)
    with pytest.raises(DataError, match="no per-example ROUGE columns .* no 'reference' column"):
        load_scores(uri)
    with pytest.raises(DataError, match="no predictions at"):
        load_scores(str(tmp_path / "nowhere"))


def test_an_out_folder_holding_other_files_is_left_alone(tmp_path):
    a, b = two_runs(tmp_path, range(8), range(8))
    result = compare(load_scores(a), load_scores(b), n_samples=200)
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match="already holds other files"):
        write_comparison(result, str(busy))
    assert [p.name for p in busy.iterdir()] == ["notes.txt"]
    write_comparison(result, str(tmp_path / "fresh"))
    write_comparison(result, str(tmp_path / "fresh"))  # an earlier comparison is replaced
    assert sorted(p.name for p in (tmp_path / "fresh").iterdir()) == sorted(OUTPUT_FILES)


def test_location_names_and_default_outputs():
    assert location_name("runs/x/predictions.parquet") == "x"
    assert location_name("s3://bucket/runs/tiny/baseline/") == "baseline"
    assert location_name("preds/other.parquet") == "other"
    assert default_out_dir("runs/a", "runs/b/predictions.parquet") == "runs/b/compare-vs-a"
    assert default_out_dir("runs/a/baseline", "s3://bk/runs/b") == "s3://bk/runs/b/compare-vs-baseline"


def test_compare_on_s3(tmp_path, s3_env):
    a, b = two_runs(tmp_path, range(12), range(12))
    for local, name in ((a, "a"), (b, "b")):
        storage.upload_dir(local, f"{s3_env}/runs/{name}")
    result = compare(load_scores(f"{s3_env}/runs/a"), load_scores(f"{s3_env}/runs/b/predictions.parquet"),
                     n_samples=300)
    out = write_comparison(result, default_out_dir(f"{s3_env}/runs/a", f"{s3_env}/runs/b/predictions.parquet"))
    assert out == f"{s3_env}/runs/b/compare-vs-a"
    assert sorted(storage.list_relative(out)) == sorted(OUTPUT_FILES)
    assert json.loads(storage.read_text(f"{out}/comparison.json"))["shared_ids"] == 12


# --------------------------------------------------------------------------------------------- the real tiny run


def test_cli_compares_the_tiny_runs_baseline_with_its_fine_tuned_model(tiny_run, tmp_path, capsys):
    run = tmp_path / "tiny"
    shutil.copytree(tiny_run.uri, run, ignore=shutil.ignore_patterns("checkpoints", "adapter", "report"))
    assert main(["compare", str(run / "baseline"), str(run)]) == 0
    printed = capsys.readouterr().out
    out = run / "compare-vs-baseline"
    assert sorted(p.name for p in out.iterdir()) == sorted(OUTPUT_FILES)
    saved = json.loads((out / "comparison.json").read_text())
    baseline = json.loads((run / "baseline" / "metrics.json").read_text())
    fine_tuned = json.loads((run / "metrics.json").read_text())
    assert saved["shared_ids"] == fine_tuned["count"] == baseline["count"]
    for name in ROUGE_TYPES:
        m = saved["metrics"][name]
        assert m["mean_a"] == pytest.approx(baseline[name]["mean"])
        assert m["mean_b"] == pytest.approx(fine_tuned[name]["mean"])
        cells = table_cells(printed, ROUGE_LABELS[name])
        assert float(cells[1]) == pytest.approx(100 * baseline[name]["mean"], abs=0.006)
        assert float(cells[2]) == pytest.approx(100 * fine_tuned[name]["mean"], abs=0.006)
        low, high = (float(v) for v in re.fullmatch(r"\[(\S+), (\S+)\]", cells[4]).groups())
        assert low == pytest.approx(100 * m["low"], abs=0.006) and high == pytest.approx(100 * m["high"], abs=0.006)
    assert saved["metrics"]["rougeL"]["low"] > 0 and saved["metrics"]["rougeL"]["p_value"] < 0.01  # it learned
    check_png((out / "comparison.png").read_bytes())

"""ROUGE against values worked out by hand, and the bootstrap interval's shape."""

import pytest

from phi2sum.eval.metrics import ROUGE_TYPES, aggregate, rouge, score_examples


def test_rouge_by_hand():
    # reference: "the cat sat on the mat" (6 tokens), prediction: "the cat lay on a mat" (6 tokens)
    # unigram overlap: the, cat, on, mat = 4 -> P = R = 4/6 -> F1 = 0.6667
    # bigram overlap: "the cat" only = 1 of 5 -> F1 = 0.2
    # LCS: the cat on mat = 4 -> F1 = 0.6667
    [row] = score_examples(["the cat lay on a mat"], ["the cat sat on the mat"])
    assert row["rouge1"] == pytest.approx(4 / 6)
    assert row["rouge2"] == pytest.approx(1 / 5)
    assert row["rougeL"] == pytest.approx(4 / 6)


def test_stemming_is_on():
    [row] = score_examples(["cats running"], ["cat runs"])
    assert row["rouge1"] == pytest.approx(1.0)


def test_empty_prediction_scores_zero():
    [row] = score_examples([""], ["something here"])
    assert all(row[name] == 0.0 for name in ROUGE_TYPES)


def test_rougelsum_uses_sentences():
    # Two sentences in different order: LCS over the whole text is short, summary-level LCS finds both.
    reference = "alpha beta gamma. delta epsilon zeta."
    prediction = "delta epsilon zeta. alpha beta gamma."
    [row] = score_examples([prediction], [reference])
    assert row["rougeLsum"] > row["rougeL"]
    assert row["rougeLsum"] == pytest.approx(1.0)


def test_aggregate_mean_and_interval():
    per_example = [{name: v for name in ROUGE_TYPES} for v in (0.0, 0.5, 1.0, 0.5)]
    result = aggregate(per_example, seed=1)
    assert result["count"] == 4
    for name in ROUGE_TYPES:
        m = result[name]
        assert m["mean"] == pytest.approx(0.5)
        assert 0.0 <= m["low"] <= m["mean"] <= m["high"] <= 1.0
        assert m["high"] - m["low"] > 0.1
    assert aggregate(per_example, seed=1) == result  # seeded: the same numbers every time


def test_rouge_rejects_mismatched_lengths():
    with pytest.raises(ValueError):
        rouge(["a"], ["a", "b"])


def _write_output(root, shards):
    """A summarize job's output by hand: shard-i-of-n folders of parts, each shard marked complete."""
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    for i, parts in enumerate(shards):
        folder = root / f"shard-{i}-of-{len(shards)}"
        folder.mkdir(parents=True)
        for k, rows in enumerate(parts):
            pq.write_table(pa.Table.from_pylist(rows), folder / f"part-{k}.parquet")
        (folder / "_SUCCESS.json").write_text(json.dumps({"rows": sum(len(p) for p in parts)}))


ROWS = [{"id": f"d{k}", "reference": f"the cat sat on mat number {k}", "prediction": p}
        for k, p in enumerate(["the cat sat", "a dog ran on the mat", "", "the cat sat on mat number 3",
                               "mat number five", "nothing alike here"])]


def test_evaluating_an_output_part_by_part_equals_scoring_it_whole(tmp_path):
    """evaluate_output scores parts in worker processes: its metrics are those of one table of every row."""
    import pyarrow as pa

    from phi2sum.eval.scoring import evaluate_output, score_table

    _write_output(tmp_path / "out", [[ROWS[:2], ROWS[2:3]], [ROWS[3:]]])
    metrics = evaluate_output(str(tmp_path / "out"), processes=2)
    whole, _ = score_table(pa.Table.from_pylist(ROWS))
    for name in ROUGE_TYPES:
        assert metrics[name] == pytest.approx(whole[name])
    assert (tmp_path / "out" / "metrics.json").exists()


def test_evaluating_an_output_with_an_id_twice_names_it(tmp_path):
    from phi2sum.errors import Phi2SumError
    from phi2sum.eval.scoring import evaluate_output

    _write_output(tmp_path / "out", [[ROWS[:3]], [ROWS[2:]]])
    with pytest.raises(Phi2SumError, match="'d2'.*evaluate one output at a time"):
        evaluate_output(str(tmp_path / "out"), processes=2)
    assert not (tmp_path / "out" / "metrics.json").exists()

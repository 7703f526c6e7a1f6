"""Generation: batching changes nothing but speed; output is cut at EOS; OOM splits a batch instead of dropping."""

import pytest
import torch

from phi2sum.config import load_config
from phi2sum.embedded import synthetic_records
from phi2sum.generate import Summarizer


@pytest.fixture(scope="module")
def greedy():
    cfg = load_config("tiny-cpu", ["generation.num_beams=1", "generation.max_new_tokens=16",
                                   "quantization.load_in_4bit=false"])
    return Summarizer(cfg, batch_size=8)


def test_batched_greedy_equals_one_at_a_time(greedy):
    docs = [r["document"] for r in synthetic_records("test")[:10]]
    batched = greedy.summarize(docs)
    greedy.batch_size = 1
    try:
        single = greedy.summarize(docs)
    finally:
        greedy.batch_size = 8
    assert [s.prediction for s in batched] == [s.prediction for s in single]
    assert sum(s.padding_tokens for s in batched) > 0 == sum(s.padding_tokens for s in single)


def test_output_is_cut_at_eos_and_only_new_tokens_decoded(greedy, monkeypatch):
    tok = greedy.tokenizer
    words = tok(" Ashford won the cup.", add_special_tokens=False)["input_ids"]
    junk = tok(" ### Article: more", add_special_tokens=False)["input_ids"]

    def fake_generate(input_ids, attention_mask, **kwargs):
        tail = torch.tensor([words + [tok.eos_token_id] + junk] * input_ids.shape[0])
        return torch.cat([input_ids, tail], dim=1)

    monkeypatch.setattr(greedy.model, "generate", fake_generate)
    [summary] = greedy.summarize(["Some article text."])
    assert summary.prediction == "Ashford won the cup."
    assert summary.generated_tokens == len(words)


def test_out_of_memory_splits_the_batch(greedy, monkeypatch):
    real = greedy._generate_once
    sizes = []

    def flaky(prompts):
        sizes.append(len(prompts))
        if len(prompts) > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(prompts)

    monkeypatch.setattr(greedy, "_generate_once", flaky)
    docs = [r["document"] for r in synthetic_records("test")[:8]]
    out = greedy.summarize(docs)
    assert len(out) == 8 and all(s.prediction is not None for s in out)
    assert sizes == [8, 4, 2, 2, 4, 2, 2]  # halved until it fits, every half retried, nothing dropped

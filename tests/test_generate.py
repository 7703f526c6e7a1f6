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


def _beam_outputs_with_and_without_prefill(summarizer, docs):
    plain_generate_calls = []
    real = summarizer.model.generate

    def spy(*args, **kwargs):
        plain_generate_calls.append("cache" in kwargs)
        return real(*args, **kwargs)

    summarizer.model.generate = spy
    try:
        prefilled = summarizer.summarize(docs)
        summarizer.prefill_once = False
        plain = summarizer.summarize(docs)
    finally:
        summarizer.prefill_once = True
        del summarizer.model.generate
    assert plain_generate_calls[0] is True and plain_generate_calls[-1] is False  # both paths really ran
    return prefilled, plain


def test_prompt_prefilled_once_gives_the_same_beam_search_output():
    """Beam search from a cache prefilled once per document = generate() prefilling every beam (with padding)."""
    cfg = load_config("tiny-cpu", ["generation.num_beams=4", "generation.max_new_tokens=12",
                                   "quantization.load_in_4bit=false"])
    summarizer = Summarizer(cfg, batch_size=4)
    docs = [r["document"] for r in synthetic_records("test")[:6]]
    prefilled, plain = _beam_outputs_with_and_without_prefill(summarizer, docs)
    assert sum(s.padding_tokens for s in prefilled) > 0
    assert [(s.prediction, s.generated_tokens) for s in prefilled] == \
        [(s.prediction, s.generated_tokens) for s in plain]
    assert any(s.prediction for s in plain)


def test_prefill_works_through_a_peft_adapter_on_a_4bit_model(tiny_run):
    summarizer = Summarizer(tiny_run.cfg, adapter=tiny_run.adapter_uri, batch_size=4)
    assert summarizer.cfg.generation.num_beams > 1 and summarizer.cfg.quantization.load_in_4bit
    docs = [r["document"] for r in synthetic_records("test")[:4]]
    prefilled, plain = _beam_outputs_with_and_without_prefill(summarizer, docs)
    assert [s.prediction for s in prefilled] == [s.prediction for s in plain]


def test_no_repeat_ngram_blocks_repeats_in_the_summary_but_not_phrases_of_the_article():
    from transformers import NoRepeatNGramLogitsProcessor

    from phi2sum.generate import NoRepeatNGramInSummary

    prompt = [11, 12, 13]  # the article holds the bigram (12, 13)
    copies_article = torch.tensor([prompt + [20, 12]])  # summary so far: 20 12 -> may continue with 13
    repeats_itself = torch.tensor([prompt + [12, 13, 20, 12]])  # summary already has (12, 13)
    banned = lambda processor, ids: torch.isinf(processor(ids, torch.zeros(1, 32))).nonzero()[:, 1].tolist()

    assert banned(NoRepeatNGramLogitsProcessor(2), copies_article) == [13]  # what transformers alone would do
    assert banned(NoRepeatNGramInSummary(2, len(prompt)), copies_article) == []
    assert banned(NoRepeatNGramInSummary(2, len(prompt)), repeats_itself) == [13]

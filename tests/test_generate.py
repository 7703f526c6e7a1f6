"""Generation: batching changes nothing but speed; output is cut at EOS; OOM splits a batch instead of dropping."""

import weakref

import pytest
import torch

from phi2sum.config import load_config
from phi2sum.demo import synthetic_records
from phi2sum.generate import Summarizer


@pytest.fixture
def quick(greedy, monkeypatch):
    """The greedy Summarizer generating 2 tokens: for tests about batching, not about the text."""
    monkeypatch.setattr(greedy.cfg.generation, "max_new_tokens", 2)
    return greedy


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


def test_out_of_memory_splits_the_batch(quick, monkeypatch):
    real = quick._generate_once
    sizes = []

    def flaky(prompts):
        sizes.append(len(prompts))
        if len(prompts) > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(prompts)

    monkeypatch.setattr(quick, "_generate_once", flaky)
    docs = [r["document"] for r in synthetic_records("test")[:8]]
    out = quick.summarize(docs)
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


def test_out_of_memory_retry_starts_after_the_failed_attempt_is_freed(quick, monkeypatch):
    """Retrying inside the `except` block keeps the failed attempt's frames (KV cache, beams) alive."""
    real = quick._generate_once
    failed, freed_at_each_call = [], []

    def flaky(prompts):
        freed_at_each_call.append(all(ref() is None for ref in failed))
        workspace = torch.empty(1024)  # stands in for the failed attempt's KV cache
        if len(prompts) > 2:
            failed.append(weakref.ref(workspace))
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(prompts)

    monkeypatch.setattr(quick, "_generate_once", flaky)
    quick.summarize([r["document"] for r in synthetic_records("test")[:8]])
    assert len(freed_at_each_call) == 7 and all(freed_at_each_call)


@pytest.mark.parametrize("error, split", [
    (RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"), True),
    (RuntimeError("shape mismatch"), False),
])
def test_cublas_allocation_failure_is_out_of_memory_too(quick, monkeypatch, error, split):
    real = quick._generate_once
    sizes = []

    def flaky(prompts):
        sizes.append(len(prompts))
        if len(prompts) > 2:
            raise error
        return real(prompts)

    monkeypatch.setattr(quick, "_generate_once", flaky)
    docs = [r["document"] for r in synthetic_records("test")[:4]]
    if split:
        assert len(quick.summarize(docs)) == 4 and sizes == [4, 2, 2]
    else:
        with pytest.raises(RuntimeError, match="shape mismatch"):
            quick.summarize(docs)


def test_one_document_that_does_not_fit_is_a_clear_error(quick, monkeypatch):
    from phi2sum.errors import ModelError

    def oom(prompts):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")

    monkeypatch.setattr(quick, "_generate_once", oom)
    with pytest.raises(ModelError, match="lower generation.num_beams"):
        quick.summarize(["One article."])


def test_null_batch_size_is_planned_for_the_replicas_own_device(monkeypatch):
    """`generation.batch_size: null` used to fall back to 8: the planner's size must reach generate()."""
    from phi2sum import plan

    asked = []

    def planner(cfg, gpu=None, total_memory_bytes=None, device=None):
        asked.append(device)
        return 3

    monkeypatch.setattr(plan, "generation_batch_size", planner)
    cfg = load_config("tiny-cpu", ["generation.num_beams=1", "generation.max_new_tokens=4", "generation.batch_size=null",
                                   "quantization.load_in_4bit=false"])
    summarizer = Summarizer(cfg)
    sizes = []
    real = summarizer._generate_once
    monkeypatch.setattr(summarizer, "_generate_once", lambda prompts: sizes.append(len(prompts)) or real(prompts))
    summarizer.summarize([r["document"] for r in synthetic_records("test")[:7]])
    assert asked == [summarizer.device] and sizes == [3, 3, 1]


def test_planned_batch_uses_the_cards_memory(monkeypatch):
    from types import SimpleNamespace

    from phi2sum import plan

    cfg = load_config("phi2-xsum-t4", ["generation.batch_size=null"])
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda device: SimpleNamespace(total_memory=plan.GPUS["T4"].memory_bytes))
    on_t4 = plan.generation_batch_size(cfg, device=torch.device("cuda", 0))
    assert on_t4 == plan.generation_batch_size(cfg, gpu="T4") > plan.CPU_GENERATION_BATCH
    assert plan.generation_batch_size(cfg, device=torch.device("cpu")) == plan.CPU_GENERATION_BATCH


def test_merged_weights_give_the_4bit_paths_greedy_output(tiny_run):
    """Dequantizing the 4-bit base once and merging the adapter into it computes what the 4-bit path computes:
    the same greedy summaries, token for token, with logits a hair apart."""
    import dataclasses

    from phi2sum.adapters import load_for_inference

    cfg = dataclasses.replace(tiny_run.cfg, generation=dataclasses.replace(
        tiny_run.cfg.generation, num_beams=1, max_new_tokens=16))
    four_bit, tokenizer = load_for_inference(cfg, tiny_run.adapter_uri, merged=False)
    merged, _ = load_for_inference(cfg, tiny_run.adapter_uri, merged=True)
    import bitsandbytes as bnb

    assert any(isinstance(m, bnb.nn.Linear4bit) for m in four_bit.modules())
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in merged.modules()) and not hasattr(merged, "peft_config")
    docs = [r["document"] for r in synthetic_records("test")[:8]]
    a = Summarizer(cfg, model=four_bit, tokenizer=tokenizer, batch_size=4).summarize(docs)
    b = Summarizer(cfg, model=merged, tokenizer=tokenizer, batch_size=4).summarize(docs)
    assert [s.prediction for s in a] == [s.prediction for s in b]
    ids = tokenizer(docs[0], return_tensors="pt")
    with torch.no_grad():
        difference = (four_bit(**ids).logits - merged(**ids).logits).abs().max().item()
    assert difference < 0.1, difference  # measured 0.03 on this model (bitsandbytes' CPU kernel rounds)


def test_the_job_generates_on_merged_weights_unless_told_otherwise(tiny_run):
    from phi2sum.adapters import uses_merged_weights

    model = type("M", (), {"device": torch.device("cpu")})()
    assert uses_merged_weights(tiny_run.cfg, model)  # auto, on a CPU
    assert not uses_merged_weights(load_config("tiny-cpu", ["generation.weights=4bit"]), model)
    assert not uses_merged_weights(load_config("tiny-cpu", ["quantization.load_in_4bit=false"]), model)

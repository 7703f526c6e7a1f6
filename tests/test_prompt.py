"""The prompt fixes the seed's mistakes: EOS on targets, loss on the summary only, the document (only) truncated.

Uses the real Phi-2 tokenizer and a long real XSum document from ../shared.
"""

import json

import pytest

from phi2sum.config import Config
from phi2sum.prompt import encode_example, encode_prompt
from support.shared import PHI2_DIR, XSUM_DIR, needs_phi2_tokenizer, needs_xsum

TEMPLATE = Config().prompt.template
pytestmark = [needs_phi2_tokenizer, needs_xsum]


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(PHI2_DIR))


@pytest.fixture(scope="module")
def long_record():
    records = [json.loads(line) for line in (XSUM_DIR / "validation-sample.jsonl").open(encoding="utf-8")]
    return max(records, key=lambda r: len(r["document"]))


def test_target_ends_with_eos_and_only_summary_carries_loss(tokenizer):
    ex = encode_example(tokenizer, TEMPLATE, "The council met on Monday.", "The council met.", 512)
    ids, mask = ex["input_ids"], ex["completion_mask"]
    assert ids[-1] == tokenizer.eos_token_id
    assert mask[-1] == 1
    first = mask.index(1)
    assert all(m == 0 for m in mask[:first]) and all(m == 1 for m in mask[first:])
    assert tokenizer.decode(ids[:first]) == TEMPLATE.format(document="The council met on Monday.")
    assert tokenizer.decode(ids[first:-1]) == "The council met."


def test_long_document_is_truncated_never_the_summary(tokenizer, long_record):
    assert len(tokenizer(long_record["document"])["input_ids"]) > 2000
    ex = encode_example(tokenizer, TEMPLATE, long_record["document"], long_record["summary"], 512)
    assert len(ex["input_ids"]) == 512 and ex["truncated"]
    text = tokenizer.decode(ex["input_ids"])
    assert text.startswith("### Article:\n")
    assert text.endswith("\n\n### Summary:\n" + long_record["summary"].strip() + tokenizer.eos_token)
    n_summary = len(tokenizer(long_record["summary"].strip())["input_ids"]) + 1
    assert sum(ex["completion_mask"]) == n_summary


def test_inference_prompt_is_the_training_prompt(tokenizer, long_record):
    ex = encode_example(tokenizer, TEMPLATE, long_record["document"], long_record["summary"], 512)
    prompt = encode_prompt(tokenizer, TEMPLATE, long_record["document"], ex["prompt_tokens"])
    assert prompt.ids == ex["input_ids"][: ex["prompt_tokens"]]
    short = encode_prompt(tokenizer, TEMPLATE, "Short text.", 448)
    assert not short.truncated
    assert short.ids == tokenizer(TEMPLATE.format(document="Short text."))["input_ids"]


def test_summary_that_cannot_fit_is_reported(tokenizer):
    assert encode_example(tokenizer, TEMPLATE, "doc", "word " * 600, 512) is None


def test_separate_tokenization_matches_joint(tokenizer, long_record):
    # The boundary between prompt and summary tokenizes the same way jointly and apart, so the model trains on
    # exactly the token sequence it continues at inference.
    doc = long_record["document"][:500]
    ex = encode_example(tokenizer, TEMPLATE, doc, long_record["summary"], 4096)
    joint = tokenizer(TEMPLATE.format(document=doc.strip()) + long_record["summary"].strip())["input_ids"]
    assert ex["input_ids"][:-1] == joint

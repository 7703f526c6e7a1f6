"""The prompt: one function builds it for training and for inference, so the model sees the same text in both.

The seed notebook's mistakes are fixed here: training targets end with EOS (so the model learns to stop),
only summary tokens carry loss (`completion_mask`), and when an example is too long the *document* is cut,
never the template or the summary, so every example fits `prompt.max_length`.
"""

from __future__ import annotations

from dataclasses import dataclass

from phi2sum.errors import ConfigError

DOCUMENT_SLOT = "{document}"


@dataclass
class EncodedPrompt:
    ids: list[int]
    document_tokens: int  # tokens of the document actually used
    truncated: bool  # True when the document was cut to fit


def _encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"] if text else []


def encode_prompt(tokenizer, template: str, document: str, max_tokens: int) -> EncodedPrompt:
    """Template around the document, with the document cut (at a token boundary) to fit `max_tokens`."""
    prefix, suffix = template.split(DOCUMENT_SLOT)
    head, tail = _encode(tokenizer, prefix), _encode(tokenizer, suffix)
    budget = max_tokens - len(head) - len(tail)
    if budget < 1:
        raise ConfigError(f"prompt.template alone is {len(head) + len(tail)} tokens, leaving no room for the document "
                          f"in {max_tokens} prompt tokens; shorten the template or raise generation.max_prompt_tokens "
                          "(or prompt.max_length)")
    # A document can be far longer than the budget; tokenizing a generous character prefix keeps this cheap.
    doc_ids = _encode(tokenizer, document[: budget * 16])
    truncated = len(doc_ids) > budget or len(document) > budget * 16
    doc_ids = doc_ids[:budget]
    return EncodedPrompt(head + doc_ids + tail, len(doc_ids), truncated)


def encode_example(tokenizer, template: str, document: str, summary: str, max_length: int) -> dict | None:
    """A training example: prompt + summary + EOS, loss mask on the summary and EOS only.

    Returns None when the summary alone (with the template) cannot fit, so the caller can count it as skipped.
    """
    target = _encode(tokenizer, summary) + [tokenizer.eos_token_id]
    prompt_budget = max_length - len(target)
    prefix, suffix = template.split(DOCUMENT_SLOT)
    if prompt_budget - len(_encode(tokenizer, prefix)) - len(_encode(tokenizer, suffix)) < 1:
        return None
    prompt = encode_prompt(tokenizer, template, document, prompt_budget)
    return {
        "input_ids": prompt.ids + target,
        "completion_mask": [0] * len(prompt.ids) + [1] * len(target),
        "prompt_tokens": len(prompt.ids),
        "truncated": prompt.truncated,
    }


def check_template_fits(tokenizer, template: str, max_prompt_tokens: int) -> None:
    """Fail before any work when the template leaves no room for a document (a one-line ConfigError)."""
    encode_prompt(tokenizer, template, "x", max_prompt_tokens)

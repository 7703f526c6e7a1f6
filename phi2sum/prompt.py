"""The prompt: one function builds it for training and for inference, so the model sees the same text in both.

The seed notebook's mistakes are fixed here: training targets end with EOS (so the model learns to stop),
only summary tokens carry loss (`completion_mask`), and when an example is too long the *document* is cut,
never the template or the summary, so every example fits `prompt.max_length`.
"""

from __future__ import annotations

from dataclasses import dataclass

from phi2sum.errors import ConfigError

DOCUMENT_SLOT = "{document}"
_SENTINEL = "\u241fPHI2SUM-DOCUMENT\u241f"  # stands for the document while a chat template is rendered


@dataclass
class EncodedPrompt:
    ids: list[int]
    document_tokens: int  # tokens of the document actually used
    truncated: bool  # True when the document was cut to fit


def _encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"] if text else []


def frame(tokenizer, template: str, chat: bool = False) -> tuple[list[int], list[int]]:
    """The token ids before and after the document: the same for training and inference.

    Plain: the tokenizer's own leading special tokens (a BOS, for tokenizers that add one; none for Phi's or
    SmolLM2's), then the template's text around `{document}`. With `chat`, the template is the user's message in
    the tokenizer's chat template, with the assistant's turn opened, so an instruct model sees its own format.
    """
    prefix, suffix = template.split(DOCUMENT_SLOT)
    if chat:
        if not getattr(tokenizer, "chat_template", None):
            raise ConfigError("prompt.chat_template=true but this tokenizer has no chat template; set "
                              "prompt.chat_template=false or use an instruct model")
        rendered = tokenizer.apply_chat_template([{"role": "user", "content": prefix + _SENTINEL + suffix}],
                                                 tokenize=False, add_generation_prompt=True)
        head, tail = rendered.split(_SENTINEL)
        return _encode(tokenizer, head), _encode(tokenizer, tail)
    specials = tokenizer("", add_special_tokens=True)["input_ids"]
    leading = [t for t in specials if t != tokenizer.eos_token_id]  # a BOS; an EOS it appends is no prompt's
    return leading + _encode(tokenizer, prefix), _encode(tokenizer, suffix)


def encode_prompt(tokenizer, template: str, document: str, max_tokens: int, chat: bool = False) -> EncodedPrompt:
    """Template around the document, with the document cut (at a token boundary) to fit `max_tokens`."""
    head, tail = frame(tokenizer, template, chat)
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


def target_ids(tokenizer, summary: str) -> list[int]:
    """The summary's tokens ending in EOS exactly once (the model must learn to stop, once)."""
    ids = _encode(tokenizer, summary)
    return ids if ids and ids[-1] == tokenizer.eos_token_id else [*ids, tokenizer.eos_token_id]


def encode_example(tokenizer, template: str, document: str, summary: str, max_length: int,
                   chat: bool = False) -> dict | None:
    """A training example: prompt + summary + EOS, loss mask on the summary and EOS only.

    Returns None when the summary alone (with the template) cannot fit, so the caller can count it as skipped.
    """
    target = target_ids(tokenizer, summary)
    prompt_budget = max_length - len(target)
    head, tail = frame(tokenizer, template, chat)
    if prompt_budget - len(head) - len(tail) < 1:
        return None
    prompt = encode_prompt(tokenizer, template, document, prompt_budget, chat)
    return {
        "input_ids": prompt.ids + target,
        "completion_mask": [0] * len(prompt.ids) + [1] * len(target),
        "prompt_tokens": len(prompt.ids),
        "truncated": prompt.truncated,
    }


def check_template_fits(tokenizer, template: str, max_prompt_tokens: int, chat: bool = False) -> None:
    """Fail before any work when the template leaves no room for a document (a one-line ConfigError)."""
    encode_prompt(tokenizer, template, "x", max_prompt_tokens, chat)

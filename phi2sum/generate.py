"""Generation: `Summarizer` loads the model once and summarizes batches of records with beam search.

It is used as-is in local mode and as the Ray Data actor class (`map_batches` calls it with a dict of
columns). Batches are sorted by prompt length to cut padding; only the new tokens are decoded and the text
is cut at EOS, so a model that rambles past its summary is not rewarded (the seed notebook decoded the
whole sequence and split on the template).

Beam search in `generate()` copies each prompt once per beam before its first forward pass, so the prompt --
hundreds of tokens against a few dozen summary tokens, most of the work -- would be computed `num_beams` times.
The Summarizer runs the prompt through the model once, repeats the KV cache for the beams and lets `generate()`
continue from there: the same tokens come out (tested), 1.4x faster on CPU and with a smaller prefill peak.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Iterable, Iterator

import torch
from transformers import LogitsProcessorList, NoRepeatNGramLogitsProcessor

from phi2sum.config import Config, GenerationSettings, prompt_token_budget
from phi2sum.errors import ModelError
from phi2sum.devices import free_memory, is_out_of_memory
from phi2sum.adapters import dequantize_per_matmul, load_for_inference
from phi2sum.prompt import encode_prompt

log = logging.getLogger(__name__)


@dataclass
class Prediction:
    prediction: str
    prompt_tokens: int
    generated_tokens: int
    truncated: bool
    padding_tokens: int  # pad tokens this document's batch row carried (to measure padding waste)


def normalize(text: str) -> str:
    return " ".join(text.split())


class NoRepeatNGramInSummary(NoRepeatNGramLogitsProcessor):
    """`no_repeat_ngram_size` over the generated tokens only.

    transformers' processor also counts the prompt on a decoder-only model, so a summary could not reuse any
    n-word phrase of its article ("the Bank of England", a name and title), which summaries do all the time; it
    also rescans the whole prompt at every step. With left padding every row's summary starts at `prompt_width`.
    """

    def __init__(self, ngram_size: int, prompt_width: int):
        super().__init__(ngram_size)
        self.prompt_width = prompt_width

    def __call__(self, input_ids: torch.LongTensor, scores: torch.Tensor) -> torch.Tensor:
        return super().__call__(input_ids[:, self.prompt_width:], scores)


class Summarizer:
    """Callable on a batch of records; `model`/`tokenizer` may be passed to reuse ones already loaded."""

    def __init__(self, cfg: Config, adapter: str | None = None, model=None, tokenizer=None,
                 batch_size: int | None = None):
        self.cfg = cfg
        if model is None:
            model, tokenizer = load_for_inference(cfg, adapter)
        self.model, self.tokenizer = model, tokenizer
        self.tokenizer.padding_side = "left"  # decoder-only generation continues from the right edge
        self.device = next(model.parameters()).device
        self.batch_size = batch_size or cfg.generation.batch_size or self._planned_batch_size()
        self.max_prompt_tokens = prompt_token_budget(cfg)
        self.prefill_once = True  # off only to compare against plain generate() (tests, benchmark)
        dequantize_per_matmul(model)  # a model passed in (the trainer's) may be 4-bit

    def _planned_batch_size(self) -> int:
        """`generation.batch_size: null`: the largest batch the planner fits on this replica's own GPU."""
        from phi2sum.plan import generation_batch_size

        size = generation_batch_size(self.cfg, device=self.device)
        log.info("generation batch %d (planned for %s)", size, self.device)
        return size

    # -- core ----------------------------------------------------------------------------------------------

    def summarize(self, documents: list[str], progress: bool = False) -> list[Prediction]:
        """Summaries in input order; internally batched longest-first so rows of a batch have similar lengths."""
        results: list[Prediction | None] = [None] * len(documents)
        bar = _progress(len(documents), progress)
        for batch in self.summarize_in_batches(documents):
            for index, summary in batch:
                results[index] = summary
            bar.update(len(batch))
        bar.close()
        return results  # type: ignore[return-value]

    def summarize_in_batches(self, documents: list[str]) -> Iterator[list[tuple[int, Prediction]]]:
        """(index in `documents`, summary) pairs, one generation batch at a time, longest prompts first: for a
        caller that commits work as it goes (the Ray actor bounds a part by time as well as by rows)."""
        prompts = [encode_prompt(self.tokenizer, self.cfg.prompt.template, d, self.max_prompt_tokens,
                                 self.cfg.prompt.chat_template)
                   for d in documents]
        order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i].ids))
        for start in range(0, len(order), self.batch_size):
            batch = order[start:start + self.batch_size]
            yield list(zip(batch, self._generate([prompts[i] for i in batch])))

    def _generate(self, prompts) -> list[Prediction]:
        """One generate() call; out of GPU memory, the batch is split in two and retried, never dropped.

        The retry starts only after the `except` block is left: inside it the traceback still holds the failed
        attempt's frames (KV cache, beams, logits), and each half would run out of memory next to them.
        """
        try:
            return self._generate_once(prompts)
        except (torch.cuda.OutOfMemoryError, RuntimeError) as exc:
            if not is_out_of_memory(exc):
                raise
            if len(prompts) == 1:
                raise ModelError("one document alone runs out of GPU memory in beam search; lower "
                                 "generation.num_beams or generation.max_prompt_tokens") from None
        free_memory()
        half = len(prompts) // 2
        log.warning("out of GPU memory on a batch of %d; retrying as %d + %d", len(prompts), half,
                    len(prompts) - half)
        return self._generate(prompts[:half]) + self._generate(prompts[half:])

    def _generate_once(self, prompts) -> list[Prediction]:
        pad = self.tokenizer.pad_token_id
        eos = self.tokenizer.eos_token_id
        width = max(len(p.ids) for p in prompts)
        input_ids = torch.full((len(prompts), width), pad, dtype=torch.long)
        attention = torch.zeros((len(prompts), width), dtype=torch.long)
        for row, p in enumerate(prompts):  # left padding
            input_ids[row, width - len(p.ids):] = torch.tensor(p.ids)
            attention[row, width - len(p.ids):] = 1
        output = beam_search(self.model, self.cfg.generation, input_ids.to(self.device),
                             attention.to(self.device), pad_id=pad, eos_id=eos, prefill_once=self.prefill_once)
        new_tokens = output[:, width:].tolist()
        summaries = []
        for p, tokens in zip(prompts, new_tokens):
            if eos in tokens:
                tokens = tokens[: tokens.index(eos)]
            text = self.tokenizer.decode(tokens, skip_special_tokens=True)
            summaries.append(Prediction(normalize(text), len(p.ids), len(tokens), p.truncated, width - len(p.ids)))
        return summaries

    # -- Ray Data interface --------------------------------------------------------------------------------

    def __call__(self, batch: dict[str, Any]) -> dict[str, list]:
        """`{"id": [...], "document": [...], ...}` -> the same columns plus prediction and token counts."""
        documents = [str(d) for d in batch["document"]]
        started = time.time()
        summaries = self.summarize(documents)
        out = {key: list(values) for key, values in batch.items()}
        out["prediction"] = [s.prediction for s in summaries]
        out["prompt_tokens"] = [s.prompt_tokens for s in summaries]
        out["generated_tokens"] = [s.generated_tokens for s in summaries]
        out["truncated"] = [s.truncated for s in summaries]
        out["padding_tokens"] = [s.padding_tokens for s in summaries]
        log.debug("summarized %d documents in %.1fs", len(documents), time.time() - started)
        return out


def beam_search(model, g: GenerationSettings, input_ids: torch.Tensor, attention: torch.Tensor, pad_id: int,
                eos_id: int, prefill_once: bool = True, **overrides) -> torch.Tensor:
    """`generate()` on a left-padded batch as the summarize job runs it (the GPU check measures this too):
    prompt prefilled once for all beams, n-gram blocking within the summary. Returns prompt + new token ids."""
    width = input_ids.shape[1]
    kwargs: dict[str, Any] = dict(
        max_new_tokens=g.max_new_tokens, num_beams=g.num_beams, length_penalty=g.length_penalty,
        no_repeat_ngram_size=0,  # a model's own default would count the prompt; ours is in logits_processor
        early_stopping=g.early_stopping if g.num_beams > 1 else False, do_sample=False,
        pad_token_id=pad_id, eos_token_id=eos_id)
    if g.no_repeat_ngram_size:
        kwargs["logits_processor"] = LogitsProcessorList([NoRepeatNGramInSummary(g.no_repeat_ngram_size, width)])
    if prefill_once and g.num_beams > 1:
        kwargs["cache"] = prefill_cache(model, input_ids, attention, g.num_beams)
    return model.generate(input_ids=input_ids, attention_mask=attention, **{**kwargs, **overrides})


def prefill_cache(model, input_ids: torch.Tensor, attention: torch.Tensor, num_beams: int):
    """KV cache of every prompt token but the last, computed once per document and repeated per beam.

    `generate()` sees a cache one token shorter than the prompt, so it feeds only the last prompt token and
    goes on as usual. Position ids follow the attention mask (left padding), as `generate()` itself does.
    """
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    positions = (attention.cumsum(-1) - 1).clamp(min=0)
    model(input_ids=input_ids[:, :-1], attention_mask=attention[:, :-1], position_ids=positions[:, :-1],
          cache=cache, use_cache=True, logits_to_keep=1)
    cache.batch_repeat_interleave(num_beams)
    return cache


def _progress(total: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="summarizing", unit="doc", disable=not enabled)


def summarize_records(summarizer: Summarizer, records: Iterable[dict[str, str]], progress: bool = True):
    """Local mode: summaries for records, as rows ready for predictions.parquet."""
    records = list(records)
    summaries = summarizer.summarize([r["document"] for r in records], progress=progress)
    return [
        {"id": r["id"], "document": r["document"], "reference": r.get("summary"), "prediction": s.prediction,
         "prompt_tokens": s.prompt_tokens, "generated_tokens": s.generated_tokens, "truncated": s.truncated,
         "padding_tokens": s.padding_tokens}
        for r, s in zip(records, summaries)
    ]

"""Value checks that types alone cannot express, run on every loaded config before anything else happens."""

from __future__ import annotations

import re
from typing import Any

from phi2sum.config.schema import Config
from phi2sum.errors import ConfigError


TRACKERS = ("tensorboard", "mlflow")


def _check(ok: bool, key: str, value: Any, need: str) -> None:
    if not ok:
        raise ConfigError(f"'{key}' is {value!r}; it must be {need}")


def validate(cfg: Config) -> None:
    """Value checks that types alone cannot express."""
    t, g, p, lo, d, q = cfg.train, cfg.generation, cfg.prompt, cfg.lora, cfg.data, cfg.quantization
    _check(t.learning_rate > 0, "train.learning_rate", t.learning_rate, "> 0")
    _check(t.epochs > 0, "train.epochs", t.epochs, "> 0")
    _check(t.max_steps == -1 or t.max_steps > 0, "train.max_steps", t.max_steps, "-1 (use epochs) or > 0")
    _check(t.batch_size == "auto" or (isinstance(t.batch_size, int) and t.batch_size >= 1), "train.batch_size",
           t.batch_size, "an integer >= 1, or auto")
    for key in ("grad_accum", "logging_steps", "save_steps", "save_total_limit"):
        _check(getattr(t, key) >= 1, f"train.{key}", getattr(t, key), ">= 1")
    for key in ("eval_steps", "rouge_steps", "early_stopping_patience"):
        _check(getattr(t, key) >= 0, f"train.{key}", getattr(t, key), ">= 0 (0 = off)")
    _check(t.rouge_documents >= 1, "train.rouge_documents", t.rouge_documents, ">= 1")
    _check(d.num_validation >= 1, "data.num_validation", d.num_validation, ">= 1")
    for key in ("keep_best", "early_stopping_patience"):
        _check(not getattr(t, key) or t.eval_steps > 0, f"train.{key}", getattr(t, key),
               "off (false/0) when train.eval_steps=0: both need the validation loss; set train.eval_steps")
    unknown = [name for name in cfg.track if name not in TRACKERS]
    _check(not unknown, "track", cfg.track, f"a list of {' and '.join(TRACKERS)} (unknown: {', '.join(unknown)})")
    _check(t.warmup_steps >= 0, "train.warmup_steps", t.warmup_steps, ">= 0")
    _check(t.max_grad_norm >= 0, "train.max_grad_norm", t.max_grad_norm, ">= 0")
    _check(g.num_beams >= 1, "generation.num_beams", g.num_beams, ">= 1")
    _check(g.max_new_tokens >= 1, "generation.max_new_tokens", g.max_new_tokens, ">= 1")
    _check(g.batch_size is None or g.batch_size >= 1, "generation.batch_size", g.batch_size, ">= 1 or null")
    _check(g.weights in ("auto", "merged", "4bit"), "generation.weights", g.weights, "auto, merged or 4bit")
    _check(g.no_repeat_ngram_size >= 0, "generation.no_repeat_ngram_size", g.no_repeat_ngram_size, ">= 0")
    _check(p.max_length >= 16, "prompt.max_length", p.max_length, ">= 16")
    _check(p.template.count("{document}") == 1, "prompt.template", p.template, "a string with one {document}")
    if g.max_prompt_tokens is not None:
        _check(g.max_prompt_tokens >= 8, "generation.max_prompt_tokens", g.max_prompt_tokens, ">= 8 or null")
    else:
        _check(prompt_token_budget(cfg) >= 8, "generation.max_new_tokens", g.max_new_tokens,
               f"at least 8 below prompt.max_length={p.max_length} (the rest is the prompt), or set "
               "generation.max_prompt_tokens")
    _check(0 <= t.seed < 2**32, "train.seed", t.seed, "in [0, 2**32)")
    _check(0 <= d.seed < 2**32, "data.seed", d.seed, "in [0, 2**32)")
    _check(lo.r >= 1, "lora.r", lo.r, ">= 1")
    _check(lo.alpha > 0, "lora.alpha", lo.alpha, "> 0")
    _check(0 <= lo.dropout < 1, "lora.dropout", lo.dropout, "in [0, 1)")
    _check(bool(lo.target_modules), "lora.target_modules", lo.target_modules, "a non-empty list")
    _check(lo.bias in ("none", "all", "lora_only"), "lora.bias", lo.bias, "none, all or lora_only")
    _check(q.quant_type in ("nf4", "fp4"), "quantization.quant_type", q.quant_type, "nf4 or fp4")
    _check(d.on_bad_record in ("skip", "error"), "data.on_bad_record", d.on_bad_record, "skip or error")
    for key in ("num_train", "num_eval"):
        value = getattr(d, key)
        _check(value is None or value >= 1, f"data.{key}", value, ">= 1 or null (all)")
    _check(set(d.columns) <= {"id", "document", "summary"}, "data.columns", d.columns,
           "a mapping with keys among id, document, summary")
    _check(d.max_document_chars >= 100, "data.max_document_chars", d.max_document_chars, ">= 100")
    _check(cfg.model.dtype in ("auto", "float16", "bfloat16", "float32"), "model.dtype", cfg.model.dtype,
           "auto, float16, bfloat16 or float32")
    _check(re.fullmatch(r"auto|cpu|cuda(:\d+)?", cfg.model.device) is not None, "model.device",
           cfg.model.device, "auto, cpu, cuda or cuda:N")
    _check(cfg.model.attn_implementation in ("sdpa", "eager"), "model.attn_implementation",
           cfg.model.attn_implementation, "sdpa or eager")
    _check(not (cfg.model.attn_implementation == "eager" and cfg.model.dtype == "float16"),
           "model.attn_implementation", "eager", "sdpa with model.dtype=float16 (eager attention overflows to NaN "
           "in fp16)")
    _check(bool(cfg.model.base.strip()), "model.base", cfg.model.base, "a hub id or a local path")
    check_location("storage.output", cfg.storage.output)
    if cfg.model.adapter is not None:
        check_location("model.adapter", cfg.model.adapter)
    if "://" in cfg.data.source or cfg.data.source.lower().startswith("s3:"):
        check_location("data.source", cfg.data.source)
    if cfg.run.name is not None:
        _check(re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}", cfg.run.name) is not None, "run.name",
               cfg.run.name, "letters, digits, '.', '_' or '-' (no slashes)")
    r = cfg.ray
    _check(r.num_workers >= 1, "ray.num_workers", r.num_workers, ">= 1")
    _check(r.actors >= 1, "ray.actors", r.actors, ">= 1")
    _check(r.max_failures >= -1, "ray.max_failures", r.max_failures, ">= 0 (or -1 for unlimited)")
    _check(r.cpus_per_worker > 0, "ray.cpus_per_worker", r.cpus_per_worker, "> 0")
    _check(r.actor_cpus > 0, "ray.actor_cpus", r.actor_cpus, "> 0")
    _check(r.part_rows >= 1, "ray.part_rows", r.part_rows, ">= 1")
    _check(r.part_seconds > 0, "ray.part_seconds", r.part_seconds, "> 0")
    _check(r.checkpoints_to_keep >= 1, "ray.checkpoints_to_keep", r.checkpoints_to_keep, ">= 1")


S3_URI = re.compile(r"s3://[^/\s]+(/.*)?")  # a non-empty bucket (S3-compatible stores differ on the rest)


def check_location(key: str, value: str) -> None:
    """A storage location is a local path or `s3://bucket[/prefix]`: anything else would be written somewhere
    unintended (an empty output meant `/<run.name>`; `s3:/b/x` meant a local folder named `s3:`)."""
    _check(bool(value.strip()), key, value, "a local folder or s3://bucket/prefix (not empty)")
    if value.lower().startswith("s3:") or "://" in value:
        _check(S3_URI.fullmatch(value) is not None, key, value,
               "a local path or s3://bucket[/prefix] with a bucket name (other schemes are not supported)")


def check_trainer_names(cfg: Config) -> None:
    """`train.optim` and `train.lr_scheduler` are names transformers knows: checked before any model loads, by
    the training entry points (importing transformers takes seconds, which `phi2sum plan` should not pay)."""
    from transformers.trainer_utils import SchedulerType
    from transformers.training_args import OptimizerNames

    for key, value, names in (("train.optim", cfg.train.optim, [o.value for o in OptimizerNames]),
                              ("train.lr_scheduler", cfg.train.lr_scheduler, [s.value for s in SchedulerType])):
        if value not in names:
            import difflib

            close = difflib.get_close_matches(value, names, n=1)
            hint = f"did you mean '{close[0]}'?" if close else f"one of {', '.join(names)}"
            raise ConfigError(f"'{key}' is {value!r}, which transformers does not know; {hint}")


def prompt_token_budget(cfg: Config) -> int:
    """How many prompt tokens generation may use, leaving room for the summary."""
    return cfg.generation.max_prompt_tokens or cfg.prompt.max_length - cfg.generation.max_new_tokens

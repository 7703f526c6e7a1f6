"""One typed job config, loaded from YAML with `section.key=value` overrides.

The defaults are the seed notebook's recipe for `microsoft/phi-2` on XSum (see jobs/configs/phi2-xsum-t4.yaml);
presets and the command line only override what differs. Unknown keys and bad values fail at load time with
the key named and a close match suggested, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from phi2sum.errors import ConfigError

REPO_ROOT = Path(__file__).resolve().parents[1]
PRESET_DIR = REPO_ROOT / "jobs" / "configs"


@dataclass
class ModelConfig:
    base: str = "microsoft/phi-2"  # hub id, local folder, or "embedded:tiny-phi"
    revision: str | None = None
    adapter: str | None = None  # PEFT adapter (local or s3://) to load for summarize/evaluate
    dtype: str = "auto"  # compute dtype: auto picks fp16 (GPU without bf16, e.g. T4), bf16, or fp32 on CPU
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    attn_implementation: str = "sdpa"  # sdpa | eager (flash attention is unavailable on T4 and CPU)
    gradient_checkpointing: bool = True


@dataclass
class QuantizationConfig:
    load_in_4bit: bool = True
    quant_type: str = "nf4"
    double_quant: bool = True


@dataclass
class LoraConfig:
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "dense"])
    bias: str = "none"


@dataclass
class DataConfig:
    # Hub dataset id, a JSONL/Parquet/CSV file or folder (local or s3://; "{split}" is replaced by the split name),
    # or "embedded:synthetic-xsum".
    source: str = "EdinburghNLP/xsum"
    train_split: str = "train"
    eval_split: str = "test"
    num_train: int | None = 1500  # seeded random subset; null = all
    num_eval: int | None = 150
    seed: int = 42
    columns: dict[str, str] = field(
        default_factory=lambda: {"id": "id", "document": "document", "summary": "summary"}
    )
    on_bad_record: str = "skip"  # skip (count and log) | error
    max_document_chars: int = 100_000  # longer documents are cut before tokenizing (a 1 MB article is no crash)


@dataclass
class PromptConfig:
    template: str = "### Article:\n{document}\n\n### Summary:\n"
    max_length: int = 512  # tokens of prompt + summary + EOS in training; the document is what gets truncated


@dataclass
class TrainConfig:
    epochs: float = 1.0
    max_steps: int = -1  # > 0 overrides epochs
    batch_size: int = 1  # per device
    grad_accum: int = 8
    keep_effective_batch: bool = False  # divide grad_accum by the number of Ray workers to keep the batch constant
    learning_rate: float = 2e-4
    lr_scheduler: str = "cosine"
    warmup_steps: int = 30
    weight_decay: float = 0.0
    max_grad_norm: float = 0.3
    optim: str = "paged_adamw_8bit"
    logging_steps: int = 10
    save_steps: int = 50  # checkpoint interval (used for resume)
    save_total_limit: int = 2
    seed: int = 42


@dataclass
class GenerationConfig:
    num_beams: int = 4
    max_new_tokens: int = 64
    length_penalty: float = 1.0
    no_repeat_ngram_size: int = 3
    early_stopping: bool = True
    batch_size: int | None = 8  # documents per generate() call; null lets the summarize job pick one
    max_prompt_tokens: int | None = None  # null = prompt.max_length - max_new_tokens


@dataclass
class StorageConfig:
    output: str = "runs"  # local folder or s3://bucket/prefix; each run writes <output>/<run.name>/
    endpoint_url: str | None = None  # S3-compatible endpoint; else AWS_ENDPOINT_URL; credentials: the AWS chain


@dataclass
class RunConfig:
    name: str | None = None  # default: run-<UTC time>; reusing a name resumes or skips that run
    baseline: bool = False  # also score the base model without the adapter (zero-shot) for comparison


@dataclass
class RayConfig:
    address: str | None = None  # None: the cluster of `ray job submit`, or a local one
    num_workers: int = 1
    use_gpu: bool | None = None  # None = use GPUs when the cluster has them
    cpus_per_worker: float = 1.0
    max_failures: int = 2
    checkpoints_to_keep: int = 2
    actors: int = 1  # Ray Data summarize actor pool size
    actor_cpus: float = 0.5  # fractional CPUs per CPU actor avoid the Ray Data deadlock on small machines


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    quantization: QuantizationConfig = field(default_factory=QuantizationConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    data: DataConfig = field(default_factory=DataConfig)
    prompt: PromptConfig = field(default_factory=PromptConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    run: RunConfig = field(default_factory=RunConfig)
    ray: RayConfig = field(default_factory=RayConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True)

    def fingerprint(self) -> str:
        """A short hash of what determines a run's results (not where they go, nor how many Ray workers)."""
        d = self.to_dict()
        for volatile in ("storage", "run", "ray"):
            d.pop(volatile)
        d["model"].pop("device")  # where it runs (local mode pins cuda:N to the process's one GPU)
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:12]


# --- loading -------------------------------------------------------------------------------------------------


def resolve_config_path(name_or_path: str) -> Path:
    """A path to a YAML file, or the name of a preset in jobs/configs (e.g. `tiny-cpu`)."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    preset = PRESET_DIR / f"{name_or_path}.yaml"
    if preset.is_file():
        return preset
    presets = sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))
    raise ConfigError(f"config file '{name_or_path}' not found; pass a YAML path or a preset name: {', '.join(presets)}")


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Defaults, then the YAML file, then `section.key=value` overrides; validated."""
    data: dict[str, Any] = {}
    if path is not None:
        file = resolve_config_path(str(path))
        try:
            data = yaml.safe_load(file.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{file}: not valid YAML ({str(exc).splitlines()[0]}); fix the file") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{file}: the top level must be a mapping of sections (model:, data:, ...)")
    for item in overrides:
        _apply_override(data, item)
    return config_from_dict(data)


def parse_override(item: str) -> tuple[list[str], Any]:
    """`train.learning_rate=1e-4` -> (["train", "learning_rate"], 1e-4); values are parsed as YAML scalars."""
    if "=" not in item:
        raise ConfigError(f"override '{item}' must look like section.key=value (e.g. train.learning_rate=1e-4)")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not re.fullmatch(r"[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*", key):
        raise ConfigError(f"override '{item}': '{key}' is not a dotted key like train.learning_rate")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def _apply_override(data: dict[str, Any], item: str) -> None:
    parts, value = parse_override(item)
    node = data
    for part in parts[:-1]:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    node[parts[-1]] = value


def config_from_dict(data: dict[str, Any]) -> Config:
    cfg = _build(Config, data, "")
    validate(cfg)
    return cfg


def _build(cls: type, data: Any, prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"'{prefix.rstrip('.') or 'config'}' must be a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in data:
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f"; did you mean '{prefix}{close[0]}'?" if close else f"; valid keys: {', '.join(names)}"
            raise ConfigError(f"unknown config key '{prefix}{key}'{hint}")
    kwargs = {}
    for name in names:
        if name not in data:
            continue
        kind = hints[name]
        if dataclasses.is_dataclass(kind):
            kwargs[name] = _build(kind, data[name] if data[name] is not None else {}, f"{prefix}{name}.")
        else:
            kwargs[name] = _coerce(data[name], kind, f"{prefix}{name}")
    return cls(**kwargs)


def _coerce(value: Any, kind: Any, key: str) -> Any:
    """Check a value against its annotation; ints are accepted for floats, nothing else is converted."""
    origin = typing.get_origin(kind)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(kind)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, key)
            except ConfigError as exc:
                errors.append(exc)
        raise errors[0]
    if origin is list:
        if isinstance(value, str):  # lora.target_modules=q_proj,v_proj on the command line
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list):
            raise ConfigError(f"'{key}' must be a list, got {value!r}")
        (item_kind,) = typing.get_args(kind)
        return [_coerce(v, item_kind, key) for v in value]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"'{key}' must be a mapping, got {value!r}")
        return {str(k): _coerce(v, str, f"{key}.{k}") for k, v in value.items()}
    if kind is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"'{key}' must be true or false, got {value!r}")
    if kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"'{key}' must be an integer, got {value!r}")
    if kind is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "2e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"'{key}' must be a number, got {value!r}")
    if kind is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)  # e.g. run.name=2024
        raise ConfigError(f"'{key}' must be a string, got {value!r}")
    raise ConfigError(f"'{key}': unsupported type {kind}")  # pragma: no cover - a bug in the schema


def _check(ok: bool, key: str, value: Any, need: str) -> None:
    if not ok:
        raise ConfigError(f"'{key}' is {value!r}; it must be {need}")


def validate(cfg: Config) -> None:
    """Value checks that types alone cannot express."""
    t, g, p, lo, d, q = cfg.train, cfg.generation, cfg.prompt, cfg.lora, cfg.data, cfg.quantization
    _check(t.learning_rate > 0, "train.learning_rate", t.learning_rate, "> 0")
    _check(t.epochs > 0, "train.epochs", t.epochs, "> 0")
    _check(t.max_steps == -1 or t.max_steps > 0, "train.max_steps", t.max_steps, "-1 (use epochs) or > 0")
    for key in ("batch_size", "grad_accum", "logging_steps", "save_steps", "save_total_limit"):
        _check(getattr(t, key) >= 1, f"train.{key}", getattr(t, key), ">= 1")
    _check(t.warmup_steps >= 0, "train.warmup_steps", t.warmup_steps, ">= 0")
    _check(t.max_grad_norm >= 0, "train.max_grad_norm", t.max_grad_norm, ">= 0")
    _check(g.num_beams >= 1, "generation.num_beams", g.num_beams, ">= 1")
    _check(g.max_new_tokens >= 1, "generation.max_new_tokens", g.max_new_tokens, ">= 1")
    _check(g.batch_size is None or g.batch_size >= 1, "generation.batch_size", g.batch_size, ">= 1 or null")
    _check(g.no_repeat_ngram_size >= 0, "generation.no_repeat_ngram_size", g.no_repeat_ngram_size, ">= 0")
    _check(p.max_length >= 16, "prompt.max_length", p.max_length, ">= 16")
    _check(p.template.count("{document}") == 1, "prompt.template", p.template, "a string with one {document}")
    prompt_budget = g.max_prompt_tokens or p.max_length - g.max_new_tokens
    _check(prompt_budget >= 8, "generation.max_new_tokens", g.max_new_tokens, "well below prompt.max_length")
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
    if cfg.run.name is not None:
        _check(re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}", cfg.run.name) is not None, "run.name",
               cfg.run.name, "letters, digits, '.', '_' or '-' (no slashes)")
    r = cfg.ray
    _check(r.num_workers >= 1, "ray.num_workers", r.num_workers, ">= 1")
    _check(r.actors >= 1, "ray.actors", r.actors, ">= 1")
    _check(r.max_failures >= -1, "ray.max_failures", r.max_failures, ">= 0 (or -1 for unlimited)")
    _check(r.cpus_per_worker > 0, "ray.cpus_per_worker", r.cpus_per_worker, "> 0")
    _check(r.actor_cpus > 0, "ray.actor_cpus", r.actor_cpus, "> 0")
    _check(r.checkpoints_to_keep >= 1, "ray.checkpoints_to_keep", r.checkpoints_to_keep, ">= 1")


def prompt_token_budget(cfg: Config) -> int:
    """How many prompt tokens generation may use, leaving room for the summary."""
    return cfg.generation.max_prompt_tokens or cfg.prompt.max_length - cfg.generation.max_new_tokens

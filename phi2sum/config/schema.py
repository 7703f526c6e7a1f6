"""The job config's schema: one typed section per stage, with the seed notebook's recipe as the defaults.

The defaults are the recipe for `microsoft/phi-2` on XSum (preset `phi2-xsum-t4`); presets and the command line
only override what differs. Section classes are named `*Settings` so they never read as the library classes
they feed (peft's LoraConfig, Ray's RunConfig, transformers' GenerationConfig).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

import yaml


@dataclass
class ModelSettings:
    base: str = "microsoft/phi-2"  # hub id, local folder, or "embedded:tiny-phi"
    revision: str | None = None
    adapter: str | None = None  # PEFT adapter (local or s3://) to load for summarize/evaluate
    allow_adapter_mismatch: bool = False  # load an adapter made for another base, or one that only partly fits
    dtype: str = "auto"  # compute dtype: auto picks fp16 (GPU without bf16, e.g. T4), bf16, or fp32 on CPU
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    attn_implementation: str = "sdpa"  # sdpa | eager (flash attention is unavailable on T4 and CPU)
    gradient_checkpointing: bool = True


@dataclass
class QuantizationSettings:
    load_in_4bit: bool = True
    quant_type: str = "nf4"
    double_quant: bool = True


@dataclass
class LoraSettings:
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    # auto: the architecture's attention projections (Phi: q_proj, k_proj, v_proj, dense; Llama family: q_proj,
    # k_proj, v_proj, o_proj), resolved before the run's config.yaml is written; or all-linear, or names
    target_modules: list[str] = field(default_factory=lambda: ["auto"])
    bias: str = "none"


@dataclass
class DataSettings:
    # Hub dataset id, a JSONL/Parquet/CSV file or folder (local or s3://; "{split}" is replaced by the split name),
    # or "embedded:synthetic-xsum".
    source: str = "EdinburghNLP/xsum"
    train_split: str = "train"
    eval_split: str = "test"
    num_train: int | None = 1500  # seeded random subset; null = all
    num_eval: int | None = 150
    # the in-training validation set (train.eval_steps, train.rouge_steps): this split when the source has it (XSum
    # and the demo corpus do), else a seeded slice of train held out of training; null = always that slice
    validation_split: str | None = "validation"
    num_validation: int = 100
    seed: int = 42
    columns: dict[str, str] = field(
        default_factory=lambda: {"id": "id", "document": "document", "summary": "summary"}
    )
    on_bad_record: str = "skip"  # skip (count and log) | error
    max_document_chars: int = 100_000  # longer documents are cut before tokenizing (a 1 MB article is no crash)


@dataclass
class PromptSettings:
    template: str = "### Article:\n{document}\n\n### Summary:\n"
    max_length: int = 512  # tokens of prompt + summary + EOS in training; the document is what gets truncated
    chat_template: bool = False  # wrap the template in the tokenizer's chat template (instruct models)


@dataclass
class TrainSettings:
    epochs: float = 1.0
    max_steps: int = -1  # > 0 overrides epochs
    # per device; auto: the largest micro-batch that fits (the planner, on a GPU; a measured best on CPU) and
    # divides grad_accum, which is then the examples per optimizer step per worker (the seed's 1 x 8 = 8)
    batch_size: int | str = 1
    group_by_length: bool = True  # batches of similar lengths: little padding (summary.json: train.padding_fraction)
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
    # validation loss on data.num_validation examples every this many steps and at the end (0 = off); logged,
    # stored in train_log.parquet, plotted beside the training loss
    eval_steps: int = 50
    keep_best: bool = False  # export the adapter of the lowest validation loss, not the last step's
    early_stopping_patience: int = 0  # stop after this many evaluations without a lower validation loss (0 = off)
    # ROUGE-1/2/L of train.rouge_documents validation summaries (generation settings below) every this many steps
    # and at the end (0 = off); under Ray every worker summarizes its share, so no worker waits long
    rouge_steps: int = 0
    rouge_documents: int = 32


@dataclass
class GenerationSettings:
    num_beams: int = 4
    max_new_tokens: int = 64
    length_penalty: float = 1.0
    no_repeat_ngram_size: int = 3
    early_stopping: bool = True
    batch_size: int | None = 8  # documents per generate() call; null lets the summarize job pick one
    max_prompt_tokens: int | None = None  # null = prompt.max_length - max_new_tokens
    # With a 4-bit base: merged = dequantize the base once to the compute dtype and merge the adapter into it (plain
    # matmuls; the same weights the adapter was trained against), 4bit = dequantize every weight at every step;
    # auto = merged unless the planner says the merged model does not fit the GPU
    weights: str = "auto"


@dataclass
class StorageSettings:
    output: str = "runs"  # local folder or s3://bucket/prefix; each run writes <output>/<run.name>/
    endpoint_url: str | None = None  # S3-compatible endpoint; else AWS_ENDPOINT_URL; credentials: the AWS chain


@dataclass
class RunSettings:
    name: str | None = None  # default: run-<UTC time>; reusing a name resumes or skips that run
    baseline: bool = False  # also score the base model without the adapter (zero-shot) for comparison


@dataclass
class RaySettings:
    address: str | None = None  # None: the cluster of `ray job submit`, or a local one
    num_workers: int = 1
    use_gpu: bool | None = None  # None = use GPUs when the cluster has them
    cpus_per_worker: float = 1.0
    max_failures: int = 2
    checkpoints_to_keep: int = 2
    actors: int = 1  # Ray Data summarize actor pool size
    actor_cpus: float = 0.5  # fractional CPUs per CPU actor avoid the Ray Data deadlock on small machines
    # rows per committed Parquet part of a summarize job (fewer when the shard is small, so every actor gets
    # work): one atomic write each, and what a killed actor can lose; lower it for a slow model
    part_rows: int = 1000
    # ... or the rows one actor finished in this many seconds, whichever comes first: a slow model's parts stay
    # small enough that a killed actor loses minutes, not an hour
    part_seconds: float = 300.0


@dataclass
class Config:
    model: ModelSettings = field(default_factory=ModelSettings)
    quantization: QuantizationSettings = field(default_factory=QuantizationSettings)
    lora: LoraSettings = field(default_factory=LoraSettings)
    data: DataSettings = field(default_factory=DataSettings)
    prompt: PromptSettings = field(default_factory=PromptSettings)
    train: TrainSettings = field(default_factory=TrainSettings)
    generation: GenerationSettings = field(default_factory=GenerationSettings)
    storage: StorageSettings = field(default_factory=StorageSettings)
    run: RunSettings = field(default_factory=RunSettings)
    ray: RaySettings = field(default_factory=RaySettings)
    # experiment trackers fed during training (rank 0): tensorboard (event files in <run>/tensorboard/), mlflow
    # (MLFLOW_TRACKING_URI, else a sqlite file beside the runs); needs `pip install 'phi2sum[track]'`
    track: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True)

    def fingerprint(self) -> str:
        """A short hash of what decides this run's results (see `decisive`)."""
        return fingerprint(decisive(self))


def decisive(cfg: Config, summaries_only: bool = False) -> dict[str, Any]:
    """What decides the results, the one definition both run folders and summarize outputs are keyed by.

    Not where outputs go, how many Ray workers, on which device, nor the generation batch size (a rerun with a
    smaller batch after running out of memory is the same job). `summaries_only`: what decides a summarize job's
    summaries (the model, adapter, prompt and generation settings, not the training recipe).
    """
    d = cfg.to_dict()
    d["model"].pop("device")
    d["generation"].pop("batch_size")
    if summaries_only:
        return {"base": d["model"]["base"], "revision": d["model"]["revision"], "adapter": d["model"]["adapter"],
                "quantization": d["quantization"], "prompt": d["prompt"], "generation": d["generation"]}
    d.pop("track")
    for where in ("storage", "run", "ray"):
        d.pop(where)
    return d


def fingerprint(decided: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(decided, sort_keys=True).encode()).hexdigest()[:12]

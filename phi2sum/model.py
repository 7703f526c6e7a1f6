"""Model: the base LLM (4-bit NF4 when configured), its tokenizer, and LoRA adapters.

Device and dtype come from `phi2sum.devices`, so training, generation and every Ray worker agree. Load failures
become one-line `ModelError`s, e.g. when the hub cannot be reached or an adapter was made for another base model.
"""

from __future__ import annotations

import logging
import os

import torch

from phi2sum import demo, gguf
from phi2sum.config import Config
from phi2sum.devices import compute_dtype, resolve_device
from phi2sum.errors import ModelError

log = logging.getLogger(__name__)

EMBEDDED_PREFIX = "embedded:"


EMBEDDED_MODELS = (demo.EMBEDDED_MODEL, gguf.EMBEDDED_SMOLLM2)


def resolve_model_path(base: str) -> str:
    """A hub id or folder as given; an embedded model, or a `.gguf` file, as the local folder built (once, cached)
    from it: `embedded:tiny-phi` (trained here), `embedded:smollm2-135m` (from its wheel's GGUF file)."""
    if base.startswith(EMBEDDED_PREFIX):
        if base == demo.EMBEDDED_MODEL:
            return demo.tiny_model_path()
        if base in gguf.WHEELS:
            return gguf.hf_folder(gguf.wheel_file(base))
        raise ModelError(f"unknown embedded model '{base}'; the embedded ones are {', '.join(EMBEDDED_MODELS)}")
    if base.lower().endswith(".gguf"):
        return gguf.hf_folder(base)
    path = os.path.expanduser(base)
    if base.startswith((".", "/", "~")) and not os.path.isdir(path):
        raise ModelError(f"model path '{base}' does not exist; set model.base to a model folder or a hub id")
    if os.path.isdir(path) and not os.path.isfile(os.path.join(path, "config.json")):
        raise ModelError(f"model folder '{base}' has no config.json, so it is not a Hugging Face model folder; point "
                         "model.base at the folder save_pretrained() wrote, or at a hub id")
    return path


def _load_error(what: str, name: str, exc: Exception, path: str | None = None) -> ModelError:
    """`path`: where `name` resolved to; a local folder (an embedded or converted model too) is not the Hub's."""
    reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:240]
    folder = path or name
    if os.path.isdir(os.path.expanduser(folder)):  # a local folder: the Hub has nothing to do with it
        return ModelError(f"could not load {what} '{name}' from folder '{folder}' ({reason}); check that the folder "
                          "is complete")
    offline = os.environ.get("HF_HUB_OFFLINE") == "1" or "offline" in reason.lower() or "connect" in reason.lower()
    hint = ("it is not cached and the Hugging Face Hub could not be reached; download it with network first or set "
            "model.base to a local folder") if offline else "check model.base (a hub id or a local folder)"
    return ModelError(f"could not fetch {what} '{name}': {hint} ({reason})")


def load_tokenizer(cfg: Config, padding_side: str = "right"):
    """Phi-2 has no pad token: EOS pads. Generation needs left padding, training right."""
    from transformers import AutoTokenizer

    path = resolve_model_path(cfg.model.base)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, revision=cfg.model.revision)
    except Exception as exc:
        raise _load_error("model", cfg.model.base, exc, path) from None
    if tokenizer.eos_token_id is None:
        raise ModelError(f"tokenizer of '{cfg.model.base}' has no EOS token; summaries need one to end")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = padding_side
    return tokenizer


def load_base_model(cfg: Config, device: torch.device | None = None, training: bool = False):
    """The base causal LM on one device, quantized to 4-bit NF4 (double quant) when configured."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    device = device or resolve_device(cfg)
    dtype = compute_dtype(cfg, device)
    kwargs = {"dtype": dtype, "attn_implementation": cfg.model.attn_implementation, "revision": cfg.model.revision}
    if cfg.quantization.load_in_4bit:
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=cfg.quantization.quant_type,
            bnb_4bit_use_double_quant=cfg.quantization.double_quant,
            bnb_4bit_compute_dtype=dtype,
        )
        kwargs["device_map"] = {"": device}  # each (DDP) worker loads its own copy on its own device
    path = resolve_model_path(cfg.model.base)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except Exception as exc:
        raise _load_error("model", cfg.model.base, exc, path) from None
    if not cfg.quantization.load_in_4bit:
        model.to(device)
    model.config.use_cache = not training  # the KV cache is useless (and warns) with gradient checkpointing
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = model.config.eos_token_id
    return model


# The attention projections of each family (the seed recipe's choice for Phi, and the QLoRA paper's usual one).
ATTENTION_TARGETS = {
    "phi": ["q_proj", "k_proj", "v_proj", "dense"],
    **{family: ["q_proj", "k_proj", "v_proj", "o_proj"]
       for family in ("llama", "mistral", "mixtral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "olmo2")},
}
ALL_LINEAR = "all-linear"


def lora_targets(configured: list[str], model_type: str) -> list[str]:
    """`lora.target_modules` with `auto` resolved for the architecture (its attention projections; `all-linear`
    for a family not listed), so the run's config.yaml says which layers were adapted."""
    if list(configured) != ["auto"]:
        return list(configured)
    return ATTENTION_TARGETS.get(model_type, [ALL_LINEAR])


def peft_targets(targets: list[str]) -> list[str] | str:
    return ALL_LINEAR if targets == [ALL_LINEAR] else targets


def model_type(cfg: Config) -> str:
    """The base model's architecture, from its config.json (no weights loaded)."""
    from transformers import AutoConfig

    path = resolve_model_path(cfg.model.base)
    try:
        return AutoConfig.from_pretrained(path, revision=cfg.model.revision).model_type
    except OSError as exc:
        raise _load_error("model", cfg.model.base, exc, path) from None


def resolve_lora_targets(cfg: Config) -> None:
    """Replace `lora.target_modules: auto` in `cfg` by the architecture's layers, before the config is saved."""
    if list(cfg.lora.target_modules) == ["auto"]:
        cfg.lora.target_modules = lora_targets(["auto"], model_type(cfg))


def attach_lora(model, cfg: Config):
    """Wrap the base model with fresh trainable LoRA adapters (QLoRA when the base is 4-bit)."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if cfg.quantization.load_in_4bit:
        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=cfg.model.gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},  # reentrant checkpointing breaks under DDP
        )
    lora = LoraConfig(
        r=cfg.lora.r,
        lora_alpha=cfg.lora.alpha,
        lora_dropout=cfg.lora.dropout,
        target_modules=peft_targets(lora_targets(cfg.lora.target_modules, model.config.model_type)),
        bias=cfg.lora.bias,
        task_type="CAUSAL_LM",
    )
    try:
        return get_peft_model(model, lora)
    except ValueError as exc:
        raise ModelError(f"LoRA could not attach ({str(exc).splitlines()[0][:200]}); check lora.target_modules "
                         "against the model's module names") from None


def count_parameters(model) -> tuple[int, int]:
    """(trainable, total) parameters; 4-bit weights count as their unpacked size, as PEFT reports them."""
    trainable, total = model.get_nb_trainable_parameters() if hasattr(model, "get_nb_trainable_parameters") else (
        sum(p.numel() for p in model.parameters() if p.requires_grad), sum(p.numel() for p in model.parameters()))
    return int(trainable), int(total)



"""Model: the base LLM (4-bit NF4 when configured), its tokenizer, and LoRA adapters.

One place decides device and dtype so training, generation and every Ray worker agree: fp16 on GPUs without
bf16 (the T4), bf16 where supported, fp32 on CPU. Load failures become one-line `ModelError`s, e.g. when the
hub cannot be reached or an adapter was made for another base model.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import tempfile

import torch

from phi2sum import storage
from phi2sum.config import Config
from phi2sum.errors import ModelError

log = logging.getLogger(__name__)

EMBEDDED_PREFIX = "embedded:"
_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def resolve_device(cfg: Config) -> torch.device:
    if cfg.model.device != "auto":
        if cfg.model.device.startswith("cuda") and not torch.cuda.is_available():
            raise ModelError(f"model.device={cfg.model.device} but no CUDA GPU is visible; use model.device=auto")
        return torch.device(cfg.model.device)
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def compute_dtype(cfg: Config, device: torch.device) -> torch.dtype:
    """fp16 on GPUs without native bf16 (the T4), bf16 where the GPU has it, fp32 on CPU; or `model.dtype`.

    Two combinations are refused because they run but go wrong: bf16 on a card without it (sm < 80: emulated,
    several times slower) and eager attention in fp16 (transformers 5 computes Phi's q·k in the compute dtype,
    which overflows to NaN in fp16; sdpa does not).
    """
    if cfg.model.dtype != "auto":
        dtype = _DTYPES[cfg.model.dtype]
    elif device.type == "cuda":
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16
    else:
        dtype = torch.float32
    if dtype == torch.bfloat16 and device.type == "cuda" and not torch.cuda.is_bf16_supported(including_emulation=False):
        raise ModelError(f"model.dtype=bfloat16 but {torch.cuda.get_device_name(device)} has no native bf16 (it would "
                         "be emulated, several times slower); use model.dtype=auto, which picks float16 there")
    if dtype == torch.float16 and cfg.model.attn_implementation == "eager":
        raise ModelError("model.attn_implementation=eager in float16 overflows Phi's attention to NaN; use "
                         "model.attn_implementation=sdpa (the default)")
    return dtype


def pin_one_gpu(cfg: Config) -> None:
    """Local mode trains on one GPU: expose only that one to this process, before CUDA starts.

    Without a distributed launch, transformers' Trainer counts every visible GPU (`n_gpu`), multiplies the
    micro-batch by it and puts accelerate on cuda:0, while a 4-bit model cannot move: with several GPUs TRL
    refuses to train, and a model on cuda:N (N > 0) fails with accelerate's "loaded in 8-bit or 4-bit precision
    on a different device". Exposing the chosen GPU alone, as cuda:0 (`CUDA_VISIBLE_DEVICES`, as torchrun
    users do), makes both right. Several GPUs on one node are what the Ray job is for.
    """
    device = cfg.model.device
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if device == "cpu" or (visible is not None and not visible.strip()):
        return  # no GPU wanted, or none visible (a CPU run, the test session)
    index = int(device.partition(":")[2] or 0)
    if torch.cuda.is_initialized():  # too late to hide GPUs from this process
        if index or torch.cuda.device_count() > 1:
            raise ModelError(f"CUDA started before phi2sum could pin one GPU for model.device={device}; set "
                             "CUDA_VISIBLE_DEVICES to the one GPU to use and model.device=cuda")
        return
    entries = [v.strip() for v in visible.split(",")] if visible is not None else None
    if entries is not None and index >= len(entries):
        raise ModelError(f"model.device={device} but CUDA_VISIBLE_DEVICES={visible} exposes {len(entries)} GPU(s); "
                         f"use model.device=cuda:0..cuda:{len(entries) - 1}")
    os.environ["CUDA_VISIBLE_DEVICES"] = entries[index] if entries is not None else str(index)
    if device.startswith("cuda:"):
        cfg.model.device = "cuda"  # the chosen GPU is now this process's cuda:0
    log.info("local mode uses one GPU: CUDA_VISIBLE_DEVICES=%s", os.environ["CUDA_VISIBLE_DEVICES"])


def resolve_model_path(base: str) -> str:
    """A hub id or folder as given; `embedded:tiny-phi` is built (once, cached) on this machine."""
    if base.startswith(EMBEDDED_PREFIX):
        from phi2sum import embedded

        if base != embedded.EMBEDDED_MODEL:
            raise ModelError(f"unknown embedded model '{base}'; the only one is {embedded.EMBEDDED_MODEL}")
        return embedded.tiny_model_path()
    if base.startswith((".", "/", "~")) and not os.path.isdir(os.path.expanduser(base)):
        raise ModelError(f"model path '{base}' does not exist; set model.base to a model folder or a hub id")
    return os.path.expanduser(base)


def _load_error(what: str, name: str, exc: Exception) -> ModelError:
    reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:240]
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
        raise _load_error("model", cfg.model.base, exc) from None
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
        raise _load_error("model", cfg.model.base, exc) from None
    if not cfg.quantization.load_in_4bit:
        model.to(device)
    model.config.use_cache = not training  # the KV cache is useless (and warns) with gradient checkpointing
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = model.config.eos_token_id
    return model


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
        target_modules=list(cfg.lora.target_modules),
        bias=cfg.lora.bias,
        task_type="CAUSAL_LM",
    )
    try:
        return get_peft_model(model, lora)
    except ValueError as exc:
        raise ModelError(f"LoRA could not attach ({str(exc).splitlines()[0][:200]}); check lora.target_modules "
                         "against the model's module names") from None


def fetch_adapter(uri: str) -> str:
    """A local folder holding the PEFT adapter at `uri` (downloaded once when it is on S3)."""
    if storage.is_s3(uri):
        local = tempfile.mkdtemp(prefix="phi2sum-adapter-")
        storage.download_dir(uri, local)
        uri = local
    uri = os.path.expanduser(uri)
    if not os.path.isfile(os.path.join(uri, "adapter_config.json")):
        raise ModelError(f"no PEFT adapter at '{uri}' (adapter_config.json missing); set model.adapter to the "
                         "adapter/ folder of a run")
    return uri


def load_adapter(model, uri: str, cfg: Config):
    """Attach a trained adapter for inference; a size mismatch means it was trained on another base model."""
    from peft import PeftModel

    path = fetch_adapter(uri)
    try:
        return PeftModel.from_pretrained(model, path, is_trainable=False)
    except (RuntimeError, ValueError, KeyError) as exc:
        with open(os.path.join(path, "adapter_config.json"), encoding="utf-8") as f:
            made_for = json.load(f).get("base_model_name_or_path")
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()] or [type(exc).__name__]
        # torch's first line is only "Error(s) in loading state_dict for ...:"; the first size mismatch says why
        reason = next((line for line in lines if line.startswith("size mismatch")), lines[0])
        made_for = f"'{made_for}'" if made_for else "another base model"
        raise ModelError(f"adapter '{uri}' does not fit base model '{cfg.model.base}' (it was made for "
                         f"{made_for}: {reason[:200]}); set model.base to the model it was trained on") from None


def load_for_inference(cfg: Config, adapter: str | None = None, device: torch.device | None = None):
    """Tokenizer (left padding) and the model in eval mode, with the adapter attached when one is given."""
    tokenizer = load_tokenizer(cfg, padding_side="left")
    model = load_base_model(cfg, device)
    if adapter:
        model = load_adapter(model, adapter, cfg)
    model.eval()
    return model, tokenizer


def count_parameters(model) -> tuple[int, int]:
    """(trainable, total) parameters; 4-bit weights count as their unpacked size, as PEFT reports them."""
    trainable, total = model.get_nb_trainable_parameters() if hasattr(model, "get_nb_trainable_parameters") else (
        sum(p.numel() for p in model.parameters() if p.requires_grad), sum(p.numel() for p in model.parameters()))
    return int(trainable), int(total)


def free_memory() -> None:
    """Collect garbage and return PyTorch's cached GPU blocks, between stages and before an out-of-memory retry.

    TRL's fused LM-head forward leaves a trained model in a reference cycle, so dropping the trainer frees nothing
    until the cycle collector runs; and freed GPU blocks stay in PyTorch's cache until emptied.
    """
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def is_out_of_memory(exc: BaseException) -> bool:
    """CUDA out of memory, including the cuBLAS form of it (a RuntimeError, not an OutOfMemoryError)."""
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and ("CUBLAS_STATUS_ALLOC_FAILED" in text or "CUDA out of memory" in text)

"""Trained LoRA adapters: fetching one (local or s3://), checking it really fits the base model, attaching it.

An adapter that only partly fits is the dangerous case: PEFT loads what matches and ignores the rest with a
warning, so an adapter trained on a 4-layer base loaded into a 2-layer one of the same width silently loses half
of itself. Here every LoRA tensor in the file must land in the model and every LoRA module of the model must get
one, and the adapter must have been made for a base of the same name, unless `model.allow_adapter_mismatch`.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile

import torch

from phi2sum import storage
from phi2sum.config import Config
from phi2sum.devices import compute_dtype
from phi2sum.errors import ModelError
from phi2sum.model import load_base_model, load_tokenizer, resolve_model_path

log = logging.getLogger(__name__)

WEIGHTS = "adapter_model.safetensors"


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


def load_for_inference(cfg: Config, adapter: str | None = None, device=None, merged: bool | None = None):
    """Tokenizer (left padding) and the model in eval mode, with the adapter when one is given.

    A 4-bit base is generated on merged weights unless `generation.weights` (or `merged`) says otherwise: the base
    dequantized once to the compute dtype, which are exactly the weights the adapter was trained against, and the
    adapter merged into them. bitsandbytes would otherwise dequantize every weight before every matmul of every
    generation step on a GPU (no tensor-core path for batches); see `dequantize_per_matmul` for CPUs.
    """
    tokenizer = load_tokenizer(cfg, padding_side="left")
    model = load_base_model(cfg, device)
    if merged if merged is not None else uses_merged_weights(cfg, model):
        if cfg.quantization.load_in_4bit:  # a base loaded in full precision has nothing to dequantize
            model = model.dequantize(dtype=compute_dtype(cfg, model.device))
        if adapter:
            model = load_adapter(model, adapter, cfg).merge_and_unload()
        log.info("generating on merged weights (%s%s%s)", model.dtype,
                 ", the 4-bit base dequantized" if cfg.quantization.load_in_4bit else "",
                 ", adapter merged" if adapter else "")
    elif adapter:
        model = load_adapter(model, adapter, cfg)
    model.eval()
    if cfg.quantization.load_in_4bit:
        dequantize_per_matmul(model)
    return model, tokenizer


def dequantize_per_matmul(model):
    """Have bitsandbytes compute a 4-bit model on CPU as it does on a GPU: each weight dequantized to the compute
    dtype before its matmul, the numbers the adapter was trained with (and the ones merged weights reproduce).

    On CPUs with AVX512-BF16, bitsandbytes otherwise repacks the weights at the first inference call for a fused
    kernel that computes in bf16: its logits differ from the training-time ones by ~0.4 on SmolLM2, and the
    repacked layout breaks a later training forward on the same model: any no-grad forward in eval mode repacks,
    so the training model is switched too (its validation loss and ROUGE forwards; a worker that never saves a
    checkpoint, which would unpack the weights again, crashes on its next training step otherwise).
    """
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
    return model


def uses_merged_weights(cfg: Config, model) -> bool:
    """`generation.weights` for this model on its device (auto: the planner's verdict for this GPU)."""
    if not cfg.quantization.load_in_4bit or cfg.generation.weights == "4bit":
        return False
    if cfg.generation.weights == "merged" or model.device.type != "cuda":
        return True
    from phi2sum.plan import merged_generation, model_shape

    total = torch.cuda.get_device_properties(model.device).total_memory
    return merged_generation(model_shape(cfg)[0], cfg, total)


def check_adapter(cfg: Config) -> None:
    """What can be checked of `model.adapter` without loading a model (it exists, its weights file is readable, it
    was made for a base of this name): run before a run folder is claimed, so a wrong adapter leaves nothing."""
    if cfg.model.adapter:
        path = fetch_adapter(cfg.model.adapter)
        _problem(cfg, check_base_name(adapter_base(path), cfg.model.base), cfg.model.adapter)
        saved_tensor_names(path, cfg.model.adapter)


def load_adapter(model, uri: str, cfg: Config):
    """Attach a trained adapter for inference, after checking that it is whole and made for this base."""
    from peft import PeftModel

    path = fetch_adapter(uri)
    made_for = adapter_base(path)
    _problem(cfg, check_base_name(made_for, cfg.model.base), uri)
    saved = saved_tensor_names(path, uri)
    try:
        peft_model = PeftModel.from_pretrained(model, path, is_trainable=False)
    except (RuntimeError, ValueError, KeyError) as exc:
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()] or [type(exc).__name__]
        # torch's first line is only "Error(s) in loading state_dict for ...:"; the first size mismatch says why
        reason = next((line for line in lines if line.startswith("size mismatch")), lines[0])
        made_for = f"'{made_for}'" if made_for else "another base model"
        raise ModelError(f"adapter '{uri}' does not fit base model '{cfg.model.base}' (it was made for "
                         f"{made_for}: {reason[:200]}); set model.base to the model it was trained on") from None
    _problem(cfg, check_tensors_fit(peft_model, saved, made_for, cfg.model.base), uri)
    return peft_model


def adapter_base(path: str) -> str | None:
    """The base model the adapter says it was trained on (`base_model_name_or_path`)."""
    try:
        with open(os.path.join(path, "adapter_config.json"), encoding="utf-8") as f:
            return json.load(f).get("base_model_name_or_path")
    except (OSError, ValueError, AttributeError) as exc:
        raise ModelError(f"{path}/adapter_config.json cannot be read ({exc}); re-export the adapter") from None


def check_base_name(made_for: str | None, base: str) -> str | None:
    """Why an adapter made for `made_for` does not belong on `base`, by name (None when the names agree).

    Names are compared after resolving each to its folder name, so `microsoft/phi-2` and a local `/models/phi-2`
    agree, as do `embedded:tiny-phi` and the cache folder it resolves to.
    """
    if not made_for:
        return None
    ours = os.path.basename(resolve_model_path(base).rstrip("/"))
    theirs = os.path.basename(made_for.rstrip("/"))
    if theirs == ours or made_for == base:
        return None
    return f"it was trained on '{made_for}', not on model.base '{base}'"


def saved_tensor_names(path: str, uri: str) -> set[str]:
    """The tensor names in the adapter's weights file; a truncated or corrupt file is a one-line error."""
    from safetensors import SafetensorError, safe_open

    weights = os.path.join(path, WEIGHTS)
    if not os.path.isfile(weights):
        raise ModelError(f"adapter '{uri}' has no {WEIGHTS}; re-export it (phi2sum saves adapters as safetensors)")
    try:
        with safe_open(weights, framework="pt") as f:
            return set(f.keys())
    except (SafetensorError, OSError, ValueError) as exc:
        raise ModelError(f"adapter '{uri}': {WEIGHTS} is truncated or corrupt ({str(exc)[:120]}); copy it again or "
                         "re-train") from None


def check_tensors_fit(peft_model, saved: set[str], made_for: str | None, base: str) -> str | None:
    """Why the saved tensors and the model's LoRA modules do not match one to one (None when they do)."""
    from peft import get_peft_model_state_dict

    expected = set(get_peft_model_state_dict(peft_model).keys())
    unused, empty = sorted(saved - expected), sorted(expected - saved)
    if not unused and not empty:
        return None
    detail = f"{len(unused)} of its {len(saved)} tensors have no place in the model (e.g. {unused[0]})" if unused \
        else f"{len(empty)} LoRA tensors of the model get no weights from it (e.g. {empty[0]})"
    return f"it only partly fits ({detail}); made for '{made_for or '?'}', loaded into '{base}'"


def _problem(cfg: Config, why: str | None, uri: str) -> None:
    if why is None:
        return
    message = f"adapter '{uri}' does not match the base model: {why}"
    if cfg.model.allow_adapter_mismatch:
        log.warning("%s (loaded anyway: model.allow_adapter_mismatch=true)", message)
        return
    raise ModelError(f"{message}; set model.base to the model it was trained on, or model.allow_adapter_mismatch=true "
                     "to load it anyway")

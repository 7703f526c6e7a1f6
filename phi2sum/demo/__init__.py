"""The embedded default: a synthetic XSum-shaped corpus and a tiny Phi built from it on the fly.

Why: the project must run end to end offline on a CPU, without downloading microsoft/phi-2 or XSum.
`EMBEDDED_DATA` (`corpus`) names a deterministic news corpus; `EMBEDDED_MODEL` (`tiny_model`) names a tiny
Phi with a tokenizer trained on that corpus and a short pre-training, built once per machine into a cache
folder named by its recipe hash (`cache`, which makes concurrent callers such as Ray workers share one
build). This module only re-exports what the rest of the project uses; private helpers stay in their
module (patch `phi2sum.demo.tiny_model._build`, not a copy of it here, which nothing would call).
"""

from phi2sum.demo.cache import cached_build, is_cached
from phi2sum.demo.corpus import EMBEDDED_DATA, SPLIT_SIZES, corpus_texts, synthetic_records
from phi2sum.demo.tiny_model import (
    BUILD_INFO_FILE,
    EMBEDDED_MODEL,
    EOS_TOKEN,
    RECIPE,
    cache_root,
    is_built,
    recipe_hash,
    tiny_model_path,
    train_tokenizer,
)

__all__ = [
    "BUILD_INFO_FILE",
    "EMBEDDED_DATA",
    "EMBEDDED_MODEL",
    "EOS_TOKEN",
    "RECIPE",
    "SPLIT_SIZES",
    "cache_root",
    "cached_build",
    "corpus_texts",
    "is_built",
    "is_cached",
    "recipe_hash",
    "synthetic_records",
    "tiny_model_path",
    "train_tokenizer",
]

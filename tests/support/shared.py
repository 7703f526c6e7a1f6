"""Paths to ../shared (the real Phi-2 tokenizer and XSum samples); tests that need them skip when absent."""

from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[3] / "shared"  # beside the checkout
PHI2_DIR = SHARED / "models" / "phi-2"
XSUM_DIR = SHARED / "data" / "xsum"

needs_phi2_tokenizer = pytest.mark.skipif(not (PHI2_DIR / "tokenizer.json").is_file(),
                                          reason="../shared/models/phi-2 is absent")
needs_xsum = pytest.mark.skipif(not (XSUM_DIR / "validation-sample.jsonl").is_file(),
                                reason="../shared/data/xsum is absent")
KUBERAY_SCHEMAS = SHARED / "schemas" / "kuberay-v1.7.0"
needs_kuberay_schemas = pytest.mark.skipif(not (KUBERAY_SCHEMAS / "ray.io_rayjobs.yaml").is_file(),
                                           reason="../shared/schemas/kuberay-v1.7.0 is absent")

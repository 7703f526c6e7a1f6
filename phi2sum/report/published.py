"""The scores a run is set against: the original notebook's and published XSum results, and how ROUGE is labelled.

They are XSum scores, so only a run scored on XSum is compared with them (see :func:`on_xsum`).
"""

from __future__ import annotations

from phi2sum.eval.metrics import ROUGE_LABELS
from phi2sum.report.load import RunArtifacts, lookup

__all__ = ["NOTEBOOK", "PUBLISHED", "ROUGE_LABELS", "on_xsum"]
# Published ROUGE F1 x100 on XSum (no ROUGE-Lsum published for these): (label, scores, colour, line style).
PUBLISHED = (
    ("Original notebook (Phi-2 + LoRA, 1 epoch)", {"rouge1": 7.13, "rouge2": 0.21, "rougeL": 6.03}, "black", ":"),
    ("PEGASUS (published, XSum)", {"rouge1": 47.21, "rouge2": 24.56, "rougeL": 39.25}, "tab:red", "--"),
    ("BART-large (published, XSum)", {"rouge1": 45.14, "rouge2": 22.27, "rougeL": 37.25}, "tab:purple", "-."),
)
NOTEBOOK = PUBLISHED[0][1]


def on_xsum(art: RunArtifacts) -> bool:
    """The notebook's and the published marks are XSum scores: only a run scored on XSum is set against them
    (the demo's synthetic corpus is not, though its name says xsum)."""
    source = str(lookup(art.config, "data.source", ""))
    return "xsum" in source.lower() and not source.startswith("embedded:")

"""Objectives: modules with forward(output, batch) -> scalar loss; their weights live in the config."""
from __future__ import annotations

from torch import nn

from vlp.objectives.contrastive import VIEWS, Contrastive

OBJECTIVES = {
    "ernie-vil2": tuple(VIEWS),
    "imagebert": ("mlm", "moc", "mrfr", "itm", "retrieval_bce", "retrieval_ce", "retrieval_triplet"),
}
MASKED = ("mlm", "moc", "mrfr")          # objectives that need masked inputs (single stream)


def valid_objectives(arch: str) -> tuple[str, ...]:
    return OBJECTIVES.get(arch, ())


def build_objectives(arch: str, weights: dict[str, float]) -> dict[str, tuple[float, nn.Module]]:
    """name -> (weight, module), skipping zero weights. One `match` per architecture, no registry."""
    match arch:
        case "ernie-vil2":
            return {name: (w, Contrastive(name)) for name, w in weights.items() if w > 0}
        case "imagebert":
            from vlp.objectives.masked_lm import MaskedLM
            from vlp.objectives.masked_region import MaskedObjectClassification, MaskedRegionFeatureRegression
            from vlp.objectives.matching import ImageTextMatching, RetrievalFinetune
            make = {"mlm": MaskedLM, "moc": MaskedObjectClassification, "mrfr": MaskedRegionFeatureRegression,
                    "itm": ImageTextMatching, "retrieval_bce": lambda: RetrievalFinetune("bce"),
                    "retrieval_ce": lambda: RetrievalFinetune("ce"),
                    "retrieval_triplet": lambda: RetrievalFinetune("triplet")}
            return {name: (w, make[name]()) for name, w in weights.items() if w > 0}
    raise ValueError(f"unknown arch {arch!r}; valid: {', '.join(OBJECTIVES)}")

"""ImageBERT (Qi et al. 2020, "ImageBERT: Cross-modal Pre-training with Large-scale Weak-supervised
Image-Text Data"): one BERT over [CLS] caption [SEP] + detector regions.

    data        RegionPairDataset (a manifest's records joined with a region store) + PairCollator (matched
                pairs, sampled and hard negatives, masks made in the collator)
    model       ImageBERT: the text tower's embeddings + RegionEmbedder, one transformer, heads where a loss needs them
    objectives  MLM, MOC, MRFR, ITM ("Pre-training tasks"); retrieval fine-tuning losses ("Fine-tuning tasks")
    evaluation  cross-encoder retrieval: every pair scored, or a dual encoder's top k reranked (eval/rerank.py)
"""
from __future__ import annotations

from torch import nn

from vlp.systems import EvalOptions, TrainData
from vlp.systems.regions import check_store, cross_encoder_retrieval, pair_data
# cross-encoders: nothing to do before step 1, no periodic evaluation (quadratic), no extra log scalars
from vlp.systems.regions import before_training, log_stats, periodic_eval  # noqa: F401

OBJECTIVES = ("mlm", "moc", "mrfr", "itm", "retrieval_bce", "retrieval_ce", "retrieval_triplet")
MASKED = ("mlm", "moc", "mrfr")          # objectives that need masked inputs
CROSS_ENCODER = True


def check(cfg) -> None:
    """The region store sizes the model; the hard negatives' source must be "tfidf" or a dual-encoder checkpoint."""
    check_store(cfg, "imagebert")


def build_model(model_cfg, vocab_size: int, saved_text: dict | None = None) -> nn.Module:
    from vlp.models import build_text_tower
    from vlp.models.single_stream import ImageBERT
    if model_cfg.region_dim <= 0 or model_cfg.region_classes <= 0:
        raise ValueError("imagebert needs model.region_dim and model.region_classes (the training loop reads them "
                         "from data.regions, the region store)")
    return ImageBERT(build_text_tower(model_cfg, vocab_size, saved_text), model_cfg.region_dim,
                     model_cfg.region_classes)


def build_objectives(weights: dict[str, float]) -> dict[str, tuple[float, nn.Module]]:
    from vlp.objectives.masked_lm import MaskedLM
    from vlp.objectives.masked_region import MaskedObjectClassification, MaskedRegionFeatureRegression
    from vlp.objectives.matching import ImageTextMatching, RetrievalFinetune
    make = {"mlm": MaskedLM, "moc": MaskedObjectClassification, "mrfr": MaskedRegionFeatureRegression,
            "itm": ImageTextMatching, "retrieval_bce": lambda: RetrievalFinetune("bce"),
            "retrieval_ce": lambda: RetrievalFinetune("ce"), "retrieval_triplet": lambda: RetrievalFinetune("triplet")}
    return {name: (w, make[name]()) for name, w in weights.items() if w > 0}


def train_data(cfg, records: list, tokenizer, report, log, progress: bool = True) -> TrainData:
    """(caption, regions) pairs; negatives and masks (ImageBERT's: tokens and independent regions) in the collator."""
    masked = any(cfg.objectives.get(name, 0) > 0 for name in MASKED)
    return pair_data(cfg, records, tokenizer, report, log, progress, masked=masked, mine=cfg.data.hard_negatives > 0)


def evaluate(model: nn.Module, tokenizer, cfg, records: list, opts: EvalOptions) -> dict:
    """Every pair scored by ITM, or with `opts.first_stage` each query's top `rerank_k` from that dual encoder reranked."""
    return cross_encoder_retrieval(model, tokenizer, cfg, records, opts)

"""ImageBERT (Qi et al. 2020, "ImageBERT: Cross-modal Pre-training with Large-scale Weak-supervised
Image-Text Data"): one BERT over [CLS] caption [SEP] + detector regions.

    data        RegionPairDataset (a manifest's records joined with a region store) + PairCollator (matched
                pairs, sampled and hard negatives, masks made in the collator)
    model       ImageBERT: the text tower's embeddings + RegionEmbedder, one transformer, heads where a loss needs them
    objectives  MLM, MOC, MRFR, ITM ("Pre-training tasks"); retrieval fine-tuning losses ("Fine-tuning tasks")
    evaluation  cross-encoder retrieval: every pair scored, or a dual encoder's top k reranked (eval/rerank.py)
"""
from __future__ import annotations

from pathlib import Path

from torch import nn

from vlp.config import ConfigError
from vlp.systems import EvalOptions, TrainData

OBJECTIVES = ("mlm", "moc", "mrfr", "itm", "retrieval_bce", "retrieval_ce", "retrieval_triplet")
MASKED = ("mlm", "moc", "mrfr")          # objectives that need masked inputs
CROSS_ENCODER = True


def check(cfg) -> None:
    """The region store sizes the model (feature size, detector classes: recorded in the config); the hard
    negatives' source must be "tfidf" or a dual-encoder checkpoint."""
    from vlp.data.regions import RegionStore
    d = cfg.data
    if d.hard_negatives > 0 and d.hard_from != "tfidf" and not Path(d.hard_from).exists():
        raise ConfigError(f"data.hard_from = {d.hard_from!r} is neither \"tfidf\" nor a dual-encoder checkpoint folder")
    if not d.regions:
        raise ConfigError("model.arch = imagebert reads detector regions: set data.regions to a region store "
                          "(vlp regions extract ... or vlp regions import ...)")
    store = RegionStore(d.regions)
    dims = (int(store.features.shape[1]), max(1, len(store.class_names)))
    if cfg.model.region_dim and (cfg.model.region_dim, cfg.model.region_classes) != dims:
        raise ConfigError(f"{d.regions} holds {dims[0]}-d features over {dims[1]} classes, but the model was built "
                          f"for {cfg.model.region_dim} / {cfg.model.region_classes}")
    cfg.model.region_dim, cfg.model.region_classes = dims


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
    """(caption, regions) pairs; negatives and masks are made in the collator."""
    from vlp.data.collate import PairCollator
    from vlp.data.region_pairs import RegionPairDataset, mine_neighbours
    from vlp.data.regions import RegionStore
    d, seed = cfg.data, cfg.train.seed
    group_key = "hex" if any("hex" in r.meta for r in records) else ""     # emoji: one group per emoji
    dataset = RegionPairDataset(records, RegionStore(d.regions), seed=seed, report=report, group_key=group_key,
                                negatives=d.negatives)
    if d.hard_negatives > 0:
        log.info(f"hard negatives: the {d.hard_pool} nearest records by "
                 + ("caption TF-IDF" if d.hard_from == "tfidf" else f"the dual encoder {d.hard_from}"))
        dataset.neighbours = mine_neighbours(dataset.records, dataset.group_ids, d.hard_from, d.hard_pool,
                                             d.hard_max_sim, progress=progress)
    masked = any(cfg.objectives.get(name, 0) > 0 for name in MASKED)
    if d.itm_clean and not masked:
        log.info("warning: data.itm_clean has no effect without a masked objective (nothing is masked)")
    collate = PairCollator(tokenizer, cfg.model.text_max_len, negatives=d.negatives, mask=masked, seed=seed,
                           hard=d.hard_negatives, clean_itm=d.itm_clean)
    clusters = None
    if d.cluster_key:
        ids: dict = {}
        clusters = [ids.setdefault(r.meta.get(d.cluster_key, f"\0{n}"), len(ids)) for n, r in enumerate(dataset.records)]
    return TrainData(dataset, collate, dataset.records, len(set(dataset.group_ids)), clusters)


def before_training(model: nn.Module, data: TrainData, tokenizer, cfg, autocast, log) -> None:
    return None


def periodic_eval(cfg, report):
    """None: cross-encoder retrieval is quadratic in the pairs; evaluate a finished run with `vlp evaluate`."""
    return None


def log_stats(model: nn.Module) -> dict:
    return {}


def evaluate(model: nn.Module, tokenizer, cfg, records: list, opts: EvalOptions) -> dict:
    """Every pair scored by ITM (the papers' protocol for small sets), or with `opts.first_stage` each query's
    top `rerank_k` from that dual encoder reranked."""
    from vlp.data.regions import RegionStore
    from vlp.eval.rerank import evaluate_cross_encoder
    from vlp.train.checkpoint import load_checkpoint
    if not opts.regions:
        raise ValueError("a single-stream checkpoint reads regions: pass --regions STORE")
    if opts.by:
        raise ValueError("--by is for dual encoders (per-group recall of embedded images)")
    first = None
    if opts.first_stage:
        dual, dual_tok, dual_cfg = load_checkpoint(opts.first_stage)
        first = (dual, dual_tok, dual_cfg.model.image_size)
    return evaluate_cross_encoder(model, tokenizer, records, RegionStore(opts.regions), cfg.model.text_max_len,
                                  k=opts.rerank_k, first_stage=first, limit=opts.limit, batch_size=opts.batch_size,
                                  fuse=opts.fuse, bf16=opts.bf16, progress=opts.progress)

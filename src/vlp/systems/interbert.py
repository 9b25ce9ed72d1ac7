"""InterBERT (Lin et al. 2020, "InterBERT: Vision-and-Language Interaction for Multi-modal Pretraining"):
single-stream interaction over [regions; text], then a text-only and an image-only stream.

    data        RegionPairDataset + PairCollator, as ImageBERT, with InterBERT's masking: MSM segments (whole
                words, `data.msm_spans`) and overlap-masked regions (`data.mrm_masking`); ITM negatives from
                the batch and, with `data.hard_negatives` (the preset: 0.2), from each caption's TF-IDF neighbours
    model       models/hybrid_stream.py: shared layers, then text-only and image-only layers (`model.extract_layers`)
    objectives  the paper's pre-training tasks: MSM (`mlm` = BERT's token masking instead, the ablation), MRM (KL
                to the detector's class distribution), ITM; retrieval fine-tuning: the released code's 4-way
                cross-entropy (`retrieval_4way`) and ImageBERT's three losses
    evaluation  cross-modal ITM retrieval (every pair, or a dual encoder's top k reranked: eval/rerank.py) and,
                in `single_modal`, the same model as a dual encoder (eval/single_modal.py)
"""
from __future__ import annotations

from pathlib import Path

from torch import nn

from vlp.config import ConfigError
from vlp.systems import EvalOptions, TrainData

OBJECTIVES = ("msm", "mlm", "mrm", "itm", "retrieval_4way", "retrieval_bce", "retrieval_ce", "retrieval_triplet")
MASKED = ("msm", "mlm", "mrm")          # objectives that need masked inputs
CROSS_ENCODER = True


def check(cfg) -> None:
    """The region store sizes the model (feature size, detector classes: recorded in the config); MRM needs the
    store's class distributions; MSM and token MLM exclude each other; retrieval_4way reads 4 rows per pair."""
    from vlp.data.regions import RegionStore
    d, w = cfg.data, cfg.objectives
    if d.msm_spans not in ("anchors", "one"):
        raise ConfigError(f"data.msm_spans = {d.msm_spans!r}; valid choices: anchors, one")
    if d.mrm_masking not in ("overlap", "independent"):
        raise ConfigError(f"data.mrm_masking = {d.mrm_masking!r}; valid choices: overlap, independent")
    if cfg.model.extract_layers < 0:
        raise ConfigError(f"model.extract_layers = {cfg.model.extract_layers} must be >= 0 (0 = all layers shared)")
    if w.get("msm", 0) > 0 and w.get("mlm", 0) > 0:
        raise ConfigError("objectives msm and mlm mask the same captions two ways: keep one (msm = InterBERT's "
                          "segments, mlm = BERT's tokens)")
    if w.get("retrieval_4way", 0) > 0 and d.negatives != 3:
        raise ConfigError(f"objectives.retrieval_4way scores [positive, random caption, random image, hard image]: "
                          f"set data.negatives = 3 (got {d.negatives})")
    if d.hard_negatives > 0 and d.hard_from != "tfidf" and not Path(d.hard_from).exists():
        raise ConfigError(f"data.hard_from = {d.hard_from!r} is neither \"tfidf\" nor a dual-encoder checkpoint folder")
    if not d.regions:
        raise ConfigError("model.arch = interbert reads detector regions: set data.regions to a region store "
                          "(vlp regions extract ... or vlp regions import ...)")
    store = RegionStore(d.regions)
    dims = (int(store.features.shape[1]), max(1, len(store.class_names)))
    if w.get("mrm", 0) > 0 and (not store.class_names or store.cls_prob.shape[1] == 0):
        raise ConfigError(f"objectives.mrm predicts the detector's class distribution, but {d.regions} holds none "
                          "(cls_prob): extract with a classifier, import features with cls_prob, or set mrm = 0")
    if cfg.model.region_dim and (cfg.model.region_dim, cfg.model.region_classes) != dims:
        raise ConfigError(f"{d.regions} holds {dims[0]}-d features over {dims[1]} classes, but the model was built "
                          f"for {cfg.model.region_dim} / {cfg.model.region_classes}")
    cfg.model.region_dim, cfg.model.region_classes = dims


def build_model(model_cfg, vocab_size: int, saved_text: dict | None = None) -> nn.Module:
    from vlp.models import build_text_tower
    from vlp.models.hybrid_stream import InterBERT
    if model_cfg.region_dim <= 0 or model_cfg.region_classes <= 0:
        raise ValueError("interbert needs model.region_dim and model.region_classes (the training loop reads them "
                         "from data.regions, the region store)")
    return InterBERT(build_text_tower(model_cfg, vocab_size, saved_text), model_cfg.region_dim,
                     model_cfg.region_classes, model_cfg.extract_layers)


def build_objectives(weights: dict[str, float]) -> dict[str, tuple[float, nn.Module]]:
    from vlp.objectives.masked_lm import MaskedLM
    from vlp.objectives.masked_region import MaskedRegionModeling
    from vlp.objectives.matching import ImageTextMatching, RetrievalFinetune
    make = {"msm": MaskedLM, "mlm": MaskedLM, "mrm": MaskedRegionModeling, "itm": ImageTextMatching,
            "retrieval_4way": lambda: RetrievalFinetune("4way"), "retrieval_bce": lambda: RetrievalFinetune("bce"),
            "retrieval_ce": lambda: RetrievalFinetune("ce"), "retrieval_triplet": lambda: RetrievalFinetune("triplet")}
    return {name: (w, make[name]()) for name, w in weights.items() if w > 0}


def train_data(cfg, records: list, tokenizer, report, log, progress: bool = True) -> TrainData:
    """(caption, regions) pairs; negatives and masks are made in the collator."""
    from vlp.data.collate import PairCollator
    from vlp.data.region_pairs import RegionPairDataset, mine_neighbours
    from vlp.data.regions import RegionStore
    d, w, seed = cfg.data, cfg.objectives, cfg.train.seed
    group_key = "hex" if any("hex" in r.meta for r in records) else ""     # emoji: one group per emoji
    dataset = RegionPairDataset(records, RegionStore(d.regions), seed=seed, report=report, group_key=group_key,
                                negatives=d.negatives)
    four_way = w.get("retrieval_4way", 0) > 0
    if d.hard_negatives > 0 or four_way:          # the 4-way loss always has a hard image
        log.info(f"hard negatives: the {d.hard_pool} nearest records by "
                 + ("caption TF-IDF" if d.hard_from == "tfidf" else f"the dual encoder {d.hard_from}"))
        dataset.neighbours = mine_neighbours(dataset.records, dataset.group_ids, d.hard_from, d.hard_pool,
                                             d.hard_max_sim, progress=progress)
    masked = any(w.get(name, 0) > 0 for name in MASKED)
    if d.itm_clean and not masked:
        log.info("warning: data.itm_clean has no effect without a masked objective (nothing is masked)")
    text_masking = ("tokens" if w.get("mlm", 0) > 0 else "one_segment" if d.msm_spans == "one" else "segments")
    collate = PairCollator(tokenizer, cfg.model.text_max_len, negatives=d.negatives, mask=masked, seed=seed,
                           hard=d.hard_negatives, clean_itm=d.itm_clean, text_masking=text_masking,
                           region_masking=d.mrm_masking, four_way=four_way)
    clusters = None
    if d.cluster_key:
        ids: dict = {}
        clusters = [ids.setdefault(r.meta.get(d.cluster_key, f"\0{n}"), len(ids))
                    for n, r in enumerate(dataset.records)]
    return TrainData(dataset, collate, dataset.records, len(set(dataset.group_ids)), clusters)


def before_training(model: nn.Module, data: TrainData, tokenizer, cfg, autocast, log) -> None:
    return None


def periodic_eval(cfg, report):
    """None: cross-encoder retrieval is quadratic in the pairs; evaluate a finished run with `vlp evaluate`."""
    return None


def log_stats(model: nn.Module) -> dict:
    return {}


def evaluate(model: nn.Module, tokenizer, cfg, records: list, opts: EvalOptions) -> dict:
    """Cross-modal: every pair scored by ITM, or with `opts.first_stage` each query's top `rerank_k` from that
    dual encoder reranked (as ImageBERT). `single_modal`: the captions and the images' regions embedded
    alone, by the text and image streams, and ranked by cosine (and by the ITM head's weighted product)."""
    from vlp.data.regions import RegionStore
    from vlp.eval.rerank import evaluate_cross_encoder
    from vlp.eval.single_modal import single_modal_recall
    from vlp.train.checkpoint import load_checkpoint
    if not opts.regions:
        raise ValueError("an InterBERT checkpoint reads regions: pass --regions STORE")
    if opts.by:
        raise ValueError("--by is for dual encoders (per-group recall of embedded images)")
    first = None
    if opts.first_stage:
        dual, dual_tok, dual_cfg = load_checkpoint(opts.first_stage)
        first = (dual, dual_tok, dual_cfg.model.image_size)
    store = RegionStore(opts.regions)
    res = evaluate_cross_encoder(model, tokenizer, records, store, cfg.model.text_max_len, k=opts.rerank_k,
                                 first_stage=first, limit=opts.limit, batch_size=opts.batch_size, fuse=opts.fuse,
                                 bf16=opts.bf16, progress=opts.progress)
    res["single_modal"] = single_modal_recall(model, tokenizer, records, store, cfg.model.text_max_len,
                                              limit=opts.limit, batch_size=opts.batch_size)
    return res

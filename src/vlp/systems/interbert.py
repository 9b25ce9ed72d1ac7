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

from torch import nn

from vlp.config import ConfigError
from vlp.systems import EvalOptions, TrainData
from vlp.systems.regions import check_store, cross_encoder_retrieval, pair_data
# cross-encoders: nothing to do before step 1, no periodic evaluation (quadratic), no extra log scalars
from vlp.systems.regions import before_training, log_stats, periodic_eval  # noqa: F401

OBJECTIVES = ("msm", "mlm", "mrm", "itm", "retrieval_4way", "retrieval_bce", "retrieval_ce", "retrieval_triplet")
MASKED = ("msm", "mlm", "mrm")          # objectives that need masked inputs
CROSS_ENCODER = True


def check(cfg) -> None:
    """The region store sizes the model (feature size, detector classes: recorded in the config); MRM needs the
    store's class distributions; MSM and token MLM exclude each other; retrieval_4way reads 4 rows per pair."""
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
    check_store(cfg, "interbert", classes_for="objectives.mrm" if w.get("mrm", 0) > 0 else "")


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
    """(caption, regions) pairs; negatives and InterBERT's masks (MSM segments, overlap-masked regions) in the
    collator; the 4-way fine-tuning loss always has a hard image, so it mines neighbours too."""
    d, w = cfg.data, cfg.objectives
    four_way = w.get("retrieval_4way", 0) > 0
    text_masking = ("tokens" if w.get("mlm", 0) > 0 else "one_segment" if d.msm_spans == "one" else "segments")
    return pair_data(cfg, records, tokenizer, report, log, progress, masked=any(w.get(n, 0) > 0 for n in MASKED),
                     mine=d.hard_negatives > 0 or four_way, text_masking=text_masking, region_masking=d.mrm_masking,
                     four_way=four_way)


def evaluate(model: nn.Module, tokenizer, cfg, records: list, opts: EvalOptions) -> dict:
    """Cross-modal: every pair scored by ITM, or with `opts.first_stage` each query's top `rerank_k` from that
    dual encoder reranked (as ImageBERT). `single_modal`: the captions and the images' regions embedded
    alone, by the text and image streams, and ranked by cosine (and by the ITM head's weighted product)."""
    from vlp.data.regions import RegionStore
    from vlp.eval.single_modal import single_modal_recall
    res = cross_encoder_retrieval(model, tokenizer, cfg, records, opts)
    res["single_modal"] = single_modal_recall(model, tokenizer, records, RegionStore(opts.regions),
                                              cfg.model.text_max_len, limit=opts.limit, batch_size=opts.batch_size)
    return res

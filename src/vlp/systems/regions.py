"""What the systems that read detector regions (ImageBERT, InterBERT) share: the region store checked and
sizing the model, (caption, regions) training data, and cross-encoder retrieval. Each system module calls
these with its own settings; nothing here knows a system's name."""
from __future__ import annotations

from pathlib import Path

from torch import nn

from vlp.config import ConfigError
from vlp.systems import EvalOptions, TrainData


def check_store(cfg, arch: str, classes_for: str = "") -> None:
    """The region store sizes the model (feature size, detector classes: recorded in the config); the hard
    negatives' source must be "tfidf" or a dual-encoder checkpoint; `classes_for` (why, e.g. "objectives.mrm"):
    the store must hold class distributions (cls_prob)."""
    from vlp.data.regions import RegionStore
    d = cfg.data
    if d.hard_negatives > 0 and d.hard_from != "tfidf" and not Path(d.hard_from).exists():
        raise ConfigError(f"data.hard_from = {d.hard_from!r} is neither \"tfidf\" nor a dual-encoder checkpoint folder")
    if not d.regions:
        raise ConfigError(f"model.arch = {arch} reads detector regions: set data.regions to a region store "
                          "(vlp regions extract ... or vlp regions import ...)")
    store = RegionStore(d.regions)
    dims = (int(store.features.shape[1]), max(1, len(store.class_names)))
    if classes_for and (not store.class_names or store.cls_prob.shape[1] == 0):
        raise ConfigError(f"{classes_for} predicts the detector's class distribution, but {d.regions} holds none "
                          "(cls_prob): extract with a classifier, import features with cls_prob, or drop the objective")
    if cfg.model.region_dim and (cfg.model.region_dim, cfg.model.region_classes) != dims:
        raise ConfigError(f"{d.regions} holds {dims[0]}-d features over {dims[1]} classes, but the model was built "
                          f"for {cfg.model.region_dim} / {cfg.model.region_classes}")
    cfg.model.region_dim, cfg.model.region_classes = dims


def pair_data(cfg, records: list, tokenizer, report, log, progress: bool, masked: bool, mine: bool,
              **collator_options) -> TrainData:
    """(caption, regions) pairs of the records with regions in `data.regions`; negatives and masks are made in
    the collator (`PairCollator`, with the system's masking options). mine: give each record its nearest
    records (`data.hard_from`), for hard negatives."""
    from vlp.data.collate import PairCollator
    from vlp.data.region_pairs import RegionPairDataset, mine_neighbours
    from vlp.data.regions import RegionStore
    d, seed = cfg.data, cfg.train.seed
    group_key = "hex" if any("hex" in r.meta for r in records) else ""     # emoji: one group per emoji
    dataset = RegionPairDataset(records, RegionStore(d.regions), seed=seed, report=report, group_key=group_key,
                                negatives=d.negatives)
    if mine:
        log.info(f"hard negatives: the {d.hard_pool} nearest records by "
                 + ("caption TF-IDF" if d.hard_from == "tfidf" else f"the dual encoder {d.hard_from}"))
        dataset.neighbours = mine_neighbours(dataset.records, dataset.group_ids, d.hard_from, d.hard_pool,
                                             d.hard_max_sim, progress=progress)
    if d.itm_clean and not masked:
        log.info("warning: data.itm_clean has no effect without a masked objective (nothing is masked)")
    collate = PairCollator(tokenizer, cfg.model.text_max_len, negatives=d.negatives, mask=masked, seed=seed,
                           hard=d.hard_negatives, clean_itm=d.itm_clean, **collator_options)
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


def cross_encoder_retrieval(model: nn.Module, tokenizer, cfg, records: list, opts: EvalOptions) -> dict:
    """Every pair scored by ITM (the papers' protocol for small sets), or with `opts.first_stage` each query's
    top `rerank_k` from that dual encoder reranked."""
    from vlp.data.regions import RegionStore
    from vlp.eval.rerank import evaluate_cross_encoder
    from vlp.train.checkpoint import load_checkpoint
    if not opts.regions:
        raise ValueError(f"a {cfg.model.arch} checkpoint reads regions: pass --regions STORE")
    if opts.by:
        raise ValueError("--by is for dual encoders (per-group recall of embedded images)")
    first = None
    if opts.first_stage:
        dual, dual_tok, dual_cfg = load_checkpoint(opts.first_stage)
        first = (dual, dual_tok, dual_cfg.model.image_size)
    return evaluate_cross_encoder(model, tokenizer, records, RegionStore(opts.regions), cfg.model.text_max_len,
                                  k=opts.rerank_k, first_stage=first, limit=opts.limit, batch_size=opts.batch_size,
                                  fuse=opts.fuse, bf16=opts.bf16, progress=opts.progress)

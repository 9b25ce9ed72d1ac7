"""ERNIE-ViL 2.0 (Shan et al. 2022, "ERNIE-ViL 2.0: Multi-view Contrastive Learning for Image-Text
Pre-training"): a dual encoder trained with symmetric InfoNCE over several views of each pair.

    data        PairDataset (images decoded once, two styles / crops per group) + Collator (the views the
                objectives need: image<->caption, image<->tags, image<->image, caption<->caption)
    model       DualEncoder(text tower, image tower): unit-length embeddings, a learnable logit scale
    objectives  one Contrastive (Sec. 3.2) per view pair with a positive weight
    evaluation  embed every image and caption once, recall@K both ways (eval/retrieval.py)
"""
from __future__ import annotations

from torch import nn

from vlp.config import ConfigError
from vlp.objectives.contrastive import VIEWS
from vlp.systems import EvalOptions, TrainData

OBJECTIVES = tuple(VIEWS)                # one symmetric InfoNCE per view pair
CROSS_ENCODER = False


def check(cfg) -> None:
    """Settings that belong to other systems are refused rather than silently ignored."""
    if cfg.data.regions:
        raise ConfigError("data.regions is read by single-stream systems (imagebert); a dual encoder reads the "
                          "images themselves: remove it")


def build_model(model_cfg, vocab_size: int, saved_text: dict | None = None) -> nn.Module:
    from vlp.models import build_image_tower, build_text_tower
    from vlp.models.dual_encoder import DualEncoder
    image, pool = build_image_tower(model_cfg)
    return DualEncoder(build_text_tower(model_cfg, vocab_size, saved_text), image, model_cfg.embed_dim,
                       image_pool=pool, logit_scale_init=model_cfg.logit_scale_init,
                       logit_scale_max=model_cfg.logit_scale_max, text_head=model_cfg.text_head)


def build_objectives(weights: dict[str, float]) -> dict[str, tuple[float, nn.Module]]:
    from vlp.objectives.contrastive import Contrastive
    return {name: (w, Contrastive(name)) for name, w in weights.items() if w > 0}


def train_data(cfg, records: list, tokenizer, report, log, progress: bool = True) -> TrainData:
    from vlp.data.collate import Collator, views_for
    from vlp.data.pairs import PairDataset
    group_key = "hex" if any("hex" in r.meta for r in records) else ""     # emoji: one group per emoji
    d = cfg.data
    dataset = PairDataset(records, cfg.model.image_size, group_key=group_key, augment=d.augment,
                          crop_scale=d.crop_scale, seed=cfg.train.seed, report=report, progress=progress)
    return TrainData(dataset, Collator(tokenizer, cfg.model.text_max_len, views_for(cfg.objectives)),
                     dataset.records, len(dataset), dataset.clusters(d.cluster_key) if d.cluster_key else None)


def before_training(model: nn.Module, data: TrainData, tokenizer, cfg, autocast, log) -> None:
    """LiT's precomputation for what is locked: a locked image trunk beside the trained one (`JointTrunk`) sees
    every training image once; a locked text tower the training captions it cannot change."""
    from vlp.data.transforms import normalize
    from vlp.encoders.joint import JointTrunk
    device = next(model.parameters()).device
    if isinstance(model.image, JointTrunk):
        with autocast:
            n = model.image.precompute(data.dataset.images, normalize)
        log.info(f"locked image trunk: features of {n} training images precomputed")
    if not model.text.freezing.locked:
        return
    captions = sorted({c for r in data.records for c in r.captions})
    ids, mask = tokenizer.encode(captions, cfg.model.text_max_len)
    with autocast:
        if n := model.cache_text(ids.to(device), mask.to(device)):
            log.info(f"locked text tower: features of {n} of {len(captions)} training captions precomputed")


def periodic_eval(cfg, report):
    """Recall on `data.eval_split` during training; a broken eval set is an error at start, not a silent skip."""
    if not cfg.data.eval_split:
        return None
    from vlp.train.loop import TrainingError, prepare_data
    try:
        records = prepare_data(cfg, cfg.data.eval_split, report, progress=False, manifest=cfg.data.eval)
    except ValueError as e:
        raise TrainingError(f"data.eval_split = {cfg.data.eval_split!r}: {e}. Point data.eval at a manifest with that "
                            f"split, or set data.eval_split = \"\" to train without evaluation") from None

    def run(model, tokenizer) -> dict:
        from vlp.eval.retrieval import evaluate
        res = evaluate(model, tokenizer, records, image_size=cfg.model.image_size, max_len=cfg.model.text_max_len,
                       batch_size=cfg.eval.batch_size, progress=False)
        return {k: v for k, v in res.items() if not isinstance(v, dict)}
    return run


def log_stats(model: nn.Module) -> dict:
    return {"logit_scale": model.scale().item()}


def evaluate(model: nn.Module, tokenizer, cfg, records: list, opts: EvalOptions) -> dict:
    from vlp.eval.retrieval import evaluate as evaluate_dual
    if opts.regions or opts.first_stage:
        raise ValueError("--regions and --first-stage are for single-stream checkpoints; this is a dual encoder "
                         f"({cfg.model.arch}), which embeds the images themselves")
    if opts.limit:                  # the same images as a single-stream evaluation with this limit
        records = [r for r in records if r.captions][:opts.limit]
    return evaluate_dual(model, tokenizer, records, image_size=cfg.model.image_size, max_len=cfg.model.text_max_len,
                         lang=opts.lang, batch_size=opts.batch_size, by=opts.by, progress=opts.progress)

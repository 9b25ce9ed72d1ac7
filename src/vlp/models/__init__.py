"""The towers every system composes: a BERT text tower (from a checkpoint, fresh, or as a vlp checkpoint
recorded it) with its declared freezing, and an image tower (our ViT or a CNN trunk). Which model a system
builds from them lives in its module, `vlp.systems.<name>.build_model`."""
from __future__ import annotations

import dataclasses

from torch import nn

from vlp.config import ModelConfig
from vlp.encoders.text import Freezing


def build_text_tower(cfg: ModelConfig, vocab_size: int, saved: dict | None = None) -> nn.Module:
    """A BERT checkpoint (grown to the tokenizer's vocabulary), a fresh BERT of the configured size, or
    the architecture a vlp checkpoint recorded (`saved`, from text_config.json; weights loaded later)."""
    from vlp.data.tokenizer import resolve_checkpoint_dir
    from vlp.encoders.text import TextEncoder
    from vlp.layers import BertConfig, TransformerConfig, load_bert

    if saved is not None:
        bert = dict(saved["bert"])
        bert["transformer"] = TransformerConfig(**bert["transformer"])
        text = TextEncoder(BertConfig(**bert))
        text.freezing = Freezing(pretrained_vocab=saved["pretrained_vocab"])
        freeze_text(text, cfg.text_freeze_layers, train_new_rows=cfg.train_new_tokens)
        return text
    if cfg.text_init:
        text = load_bert(resolve_checkpoint_dir(cfg.text_init), dropout=cfg.dropout, attn_dropout=cfg.dropout)
        old = text.embeddings.word.weight.shape[0]
        if vocab_size > old:
            text.resize_vocab(vocab_size)
        text.freezing = Freezing(pretrained_vocab=old)     # rows below this came from the checkpoint
        freeze_text(text, cfg.text_freeze_layers, train_new_rows=cfg.train_new_tokens)
        return text
    tcfg = TransformerConfig(width=cfg.text_width, layers=cfg.text_layers, heads=cfg.text_heads,
                             intermediate=4 * cfg.text_width, dropout=cfg.dropout, attn_dropout=cfg.dropout)
    return TextEncoder(BertConfig(vocab_size=vocab_size, max_position=max(cfg.text_max_len, 64), transformer=tcfg))


def text_config(model: nn.Module) -> dict:
    """What build_text_tower(saved=...) needs to rebuild a model's text tower without its source checkpoint."""
    return {"bert": dataclasses.asdict(model.text.cfg), "pretrained_vocab": model.text.freezing.pretrained_vocab}


def freeze_text(text: nn.Module, layers: int, train_new_rows: bool = True) -> None:
    """Freeze the embeddings and the bottom `layers` blocks of a pretrained text tower, and declare it in
    `text.freezing` (`encoders.text.Freezing`).

    Word-embedding rows added for new vocabulary (ids >= text.freezing.pretrained_vocab) stay trainable
    unless `train_new_rows` is False: a gradient hook zeroes the rows of the checkpoint's own tokens (they
    carry no weight decay, so Adam leaves them exactly unchanged).
    """
    if layers <= 0:
        return
    first_new_row = text.freezing.pretrained_vocab
    emb = text.embeddings
    for p in emb.parameters():
        p.requires_grad_(False)
    new_rows = train_new_rows and emb.word.weight.shape[0] > first_new_row
    if new_rows:
        emb.word.weight.requires_grad_(True)
        emb.word.weight.register_hook(lambda g: g.index_fill(0, g.new_tensor(range(first_new_row), dtype=int), 0.0))
    for block in text.transformer.blocks[:layers]:
        for p in block.parameters():
            p.requires_grad_(False)
    # locked: nothing but new vocabulary rows can change the output (DualEncoder skips autograd for the rest)
    text.freezing = dataclasses.replace(text.freezing, frozen_layers=min(layers, len(text.transformer.blocks)),
                                        locked=layers >= len(text.transformer.blocks), new_rows_only=new_rows)


def build_image_tower(cfg: ModelConfig) -> tuple[nn.Module, str]:
    """-> (encoder, pooling): our ViT pools its [CLS] token, a CNN trunk means its feature map; with
    `image_locked`, the trained tower joined with a locked ImageNet trunk (`encoders/joint.py`)."""
    if cfg.image_locked:
        import dataclasses

        from vlp.encoders.joint import JointTrunk
        from vlp.encoders.pretrained import TimmTrunk
        trained, pool = build_image_tower(dataclasses.replace(cfg, image_locked=""))
        if pool != "mean":
            raise ValueError("model.image_locked joins a CNN trunk's pooled features; not with image_encoder = \"vit\"")
        locked = TimmTrunk(cfg.image_locked.removeprefix("timm:"), weights="imagenet", frozen_stages=-1)
        return JointTrunk(trained, locked, cfg.image_locked_size), "mean"
    if cfg.image_encoder == "vit":
        from vlp.encoders.patches import PatchEncoder
        return PatchEncoder(cfg.image_size, cfg.patch_size, cfg.vit_width, cfg.vit_layers, cfg.vit_heads,
                            dropout=cfg.dropout), "cls"
    from vlp.encoders.pretrained import is_timm_name
    if is_timm_name(cfg.image_encoder):                             # "efficientnet_lite0", "timm:resnet50", ...
        from vlp.encoders.pretrained import TimmTrunk
        return TimmTrunk(cfg.image_encoder.removeprefix("timm:"), weights=cfg.image_weights,
                         frozen_stages=cfg.image_frozen_stages, freeze_bn=cfg.image_freeze_bn), "mean"
    if cfg.image_frozen_stages or cfg.image_freeze_bn or cfg.image_weights == "imagenet":
        raise ValueError(f"model.image_frozen_stages, image_freeze_bn and image_weights = \"imagenet\" are for timm "
                         f"trunks (e.g. image_encoder = \"efficientnet_lite0\"), not {cfg.image_encoder!r}")
    from vlp.encoders.cnn import TorchvisionTrunk
    name, _, stem = cfg.image_encoder.partition(":")                # e.g. "resnet18:small"
    return TorchvisionTrunk(name, weights=cfg.image_weights, stem=stem or "default"), "mean"

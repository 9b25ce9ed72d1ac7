"""build_model(cfg, vocab_size): one `match` over architecture names, no registry."""
from __future__ import annotations

from torch import nn

from vlp.config import ModelConfig


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
        text.pretrained_vocab = saved["pretrained_vocab"]
        freeze_text(text, cfg.text_freeze_layers, first_new_row=text.pretrained_vocab,
                    train_new_rows=cfg.train_new_tokens)
        return text
    if cfg.text_init:
        text = load_bert(resolve_checkpoint_dir(cfg.text_init), dropout=cfg.dropout, attn_dropout=cfg.dropout)
        old = text.embeddings.word.weight.shape[0]
        if vocab_size > old:
            text.resize_vocab(vocab_size)
        text.pretrained_vocab = old                     # rows below this came from the checkpoint
        freeze_text(text, cfg.text_freeze_layers, first_new_row=old, train_new_rows=cfg.train_new_tokens)
        return text
    tcfg = TransformerConfig(width=cfg.text_width, layers=cfg.text_layers, heads=cfg.text_heads,
                             intermediate=4 * cfg.text_width, dropout=cfg.dropout, attn_dropout=cfg.dropout)
    text = TextEncoder(BertConfig(vocab_size=vocab_size, max_position=max(cfg.text_max_len, 64), transformer=tcfg))
    text.pretrained_vocab = 0
    return text


def text_config(model: nn.Module) -> dict:
    """What build_text_tower(saved=...) needs to rebuild a model's text tower without its source checkpoint."""
    import dataclasses
    return {"bert": dataclasses.asdict(model.text.cfg), "pretrained_vocab": model.text.pretrained_vocab}


def freeze_text(text: nn.Module, layers: int, first_new_row: int, train_new_rows: bool = True) -> None:
    """Freeze the embeddings and the bottom `layers` blocks of a pretrained text tower.

    Word-embedding rows added for new vocabulary (ids >= first_new_row) stay trainable unless
    `train_new_rows` is False: a gradient hook zeroes the rows of the checkpoint's own tokens (they
    carry no weight decay, so Adam leaves them exactly unchanged).
    """
    if layers <= 0:
        return
    emb = text.embeddings
    for p in emb.parameters():
        p.requires_grad_(False)
    if train_new_rows and emb.word.weight.shape[0] > first_new_row:
        emb.word.weight.requires_grad_(True)
        emb.word.weight.new_rows_only = True        # the optimizer gives it the full lr, not text_lr_scale
        emb.word.weight.register_hook(lambda g: g.index_fill(0, g.new_tensor(range(first_new_row), dtype=int), 0.0))
    for block in text.transformer.blocks[:layers]:
        for p in block.parameters():
            p.requires_grad_(False)
    # locked: nothing but new vocabulary rows can change the output (DualEncoder skips autograd for the rest)
    text.locked = layers >= len(text.transformer.blocks)


def build_image_tower(cfg: ModelConfig) -> tuple[nn.Module, str]:
    """-> (encoder, pooling): our ViT pools its [CLS] token, a CNN trunk means its feature map."""
    if cfg.image_encoder == "vit":
        from vlp.encoders.patches import PatchEncoder
        return PatchEncoder(cfg.image_size, cfg.patch_size, cfg.vit_width, cfg.vit_layers, cfg.vit_heads,
                            dropout=cfg.dropout), "cls"
    from vlp.encoders.cnn import TorchvisionTrunk
    name, _, stem = cfg.image_encoder.partition(":")                # e.g. "resnet18:small"
    return TorchvisionTrunk(name, weights=cfg.image_weights, stem=stem or "default"), "mean"


def build_model(cfg: ModelConfig, vocab_size: int, saved_text: dict | None = None) -> nn.Module:
    match cfg.arch:
        case "ernie-vil2":
            from vlp.models.dual_encoder import DualEncoder
            image, pool = build_image_tower(cfg)
            return DualEncoder(build_text_tower(cfg, vocab_size, saved_text), image, cfg.embed_dim, image_pool=pool,
                               logit_scale_init=cfg.logit_scale_init, logit_scale_max=cfg.logit_scale_max,
                               text_head=cfg.text_head)
        case "imagebert":
            from vlp.models.single_stream import ImageBERT
            if cfg.region_dim <= 0 or cfg.region_classes <= 0:
                raise ValueError("imagebert needs model.region_dim and model.region_classes (the training loop "
                                 "reads them from data.regions, the region store)")
            return ImageBERT(build_text_tower(cfg, vocab_size, saved_text), cfg.region_dim, cfg.region_classes)
    raise ValueError(f"unknown model.arch {cfg.arch!r}; valid: ernie-vil2, imagebert")

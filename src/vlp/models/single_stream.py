"""ImageBERT's single-stream model (Qi et al. 2020, "ImageBERT model"): one BERT over [CLS] text [SEP] + regions.

Text tokens are embedded by BERT's own embeddings (segment 0), regions by `RegionEmbedder`
(segment 1, one shared position); the concatenation runs through the shared transformer. Heads:
- MLM ("Pre-training tasks", MLM): BERT's prediction head (dense, GELU, LayerNorm) and a decoder tied to the
  word embeddings, applied only at the masked positions that have a label: computing vocabulary
  logits at every position would cost more than the rest of the forward pass.
- MOC (task 2): the same kind of transform, then the detector's classes.
- MRFR (task 3): the same kind of transform, then the region feature size.
- ITM (task 4): a linear layer on the [CLS] state -> one logit (matched or not).

    model = ImageBERT(load_bert("minilm dir"), feature_dim=512, n_classes=64)
    out = model(batch)        # Batch with text_ids/mask, region_feats/boxes/mask (+ masking targets)
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vlp.data.masking import IGNORE
from vlp.encoders.regions import RegionEmbedder
from vlp.layers import init_weights, length_groups


class SingleStreamOutput(NamedTuple):
    cls: Tensor                          # (B, D) the [CLS] state
    itm_logit: Tensor                    # (B,) matched-pair logit
    mlm_logits: Tensor | None = None     # (M, V) at the labelled masked tokens, in row-major order
    moc_logits: Tensor | None = None     # (K, C) at the target regions, row-major
    mrfr_pred: Tensor | None = None      # (K, F) reconstructed features at the target regions


def _transform(width: int) -> nn.Sequential:
    """BERT's prediction-head transform: dense -> GELU -> LayerNorm."""
    return nn.Sequential(nn.Linear(width, width), nn.GELU(), nn.LayerNorm(width, eps=1e-12))


class ImageBERT(nn.Module):
    def __init__(self, text: nn.Module, feature_dim: int, n_classes: int):
        """text: a `TextEncoder` (BERT embeddings + transformer), e.g. from `load_bert`."""
        super().__init__()
        self.text = text
        width, vocab = text.width, text.embeddings.word.num_embeddings
        self.regions = RegionEmbedder(feature_dim, text.embeddings)
        self.mlm_transform, self.mlm_bias = _transform(width), nn.Parameter(torch.zeros(vocab))
        self.moc = nn.Sequential(_transform(width), nn.Linear(width, n_classes))
        self.mrfr = nn.Sequential(_transform(width), nn.Linear(width, feature_dim))
        self.itm = nn.Linear(width, 1)
        for head in (self.mlm_transform, self.moc, self.mrfr, self.itm):
            head.apply(init_weights)

    def encode(self, ids: Tensor, mask: Tensor, feats: Tensor, boxes: Tensor, region_mask: Tensor,
               buckets: int = 4, min_rows: int = 16) -> tuple[Tensor, Tensor]:
        """ids, mask (B, L); feats (B, R, F), boxes (B, R, 5), region_mask (B, R) -> text states
        (B, L, D), region states (B, R, D); text states at padded positions are zero.

        Rows attend only within themselves, so they run in up to `buckets` groups of similar caption
        length (at least `min_rows` rows each), each trimmed to its own longest caption: the scenes'
        captions average 14 tokens in batches padded to about 34, so one padded pass would spend more
        than half its products on padding. At real tokens and regions the result equals one padded
        pass (tested)."""
        t = self.text.embeddings(ids)                                           # (B, L, D), segment 0
        r = self.regions(feats, boxes, region_mask).x                           # (B, R, D), segment 1
        lengths, L = mask.sum(1), ids.shape[1]
        groups, back = length_groups(lengths, buckets, min_rows)
        texts, regs = [], []
        for rows in groups:
            n = int(lengths[rows].max())
            x = self.text.transformer(torch.cat([t[rows, :n], r[rows]], 1),
                                      torch.cat([mask[rows, :n], region_mask[rows]], 1))   # (b, n+R, D)
            texts.append(F.pad(x[:, :n] * mask[rows, :n, None], (0, 0, 0, L - n)))      # (b, L, D)
            regs.append(x[:, n:])
        return torch.cat(texts)[back], torch.cat(regs)[back]                    # rows back in batch order

    def forward(self, batch) -> SingleStreamOutput:
        text, regions = self.encode(batch.text_ids, batch.text_mask, batch.region_feats, batch.region_boxes,
                                    batch.region_mask)
        cls = text[:, 0]                                                        # (B, D)
        out = {"cls": cls, "itm_logit": self.itm(cls).squeeze(-1)}
        if batch.mlm_labels is not None:
            h = self.mlm_transform(text[batch.mlm_labels != IGNORE])            # (M, D)
            out["mlm_logits"] = F.linear(h, self.text.embeddings.word.weight, self.mlm_bias)   # (M, V)
        if batch.region_targets is not None:
            h = regions[batch.region_targets]                                   # (K, D)
            out["moc_logits"], out["mrfr_pred"] = self.moc(h), self.mrfr(h)
        return SingleStreamOutput(**out)

    def match_scores(self, ids: Tensor, mask: Tensor, feats: Tensor, boxes: Tensor, region_mask: Tensor,
                     bf16: bool = False) -> Tensor:
        """ITM logits (B,) of unmasked (text, regions) pairs: the cross-encoder's retrieval score.
        bf16: the transformer under bf16 autocast, the ITM head in float32 (fewer tied scores)."""
        with torch.autocast(ids.device.type, dtype=torch.bfloat16, enabled=bf16):
            text, _ = self.encode(ids, mask, feats, boxes, region_mask)
        return self.itm(text[:, 0].float()).squeeze(-1)

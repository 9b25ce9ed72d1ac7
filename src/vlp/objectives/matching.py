"""Image-text matching (ImageBERT, Qi et al. 2020, "Pre-training tasks": ITM; InterBERT, Lin et al. 2020: ITM).

The model's `itm_logit` scores whether caption and regions belong together (ImageBERT: a linear layer on
[CLS]; InterBERT: on the product of the pooled text and image); binary cross-entropy against
`batch.itm_label` (1 for the matched pairs, 0 for the negatives the collator sampled: a random
caption for an image, a random image for a caption, or with `data.hard_negatives` a TF-IDF neighbour).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class ImageTextMatching(nn.Module):
    def forward(self, out, batch) -> Tensor:
        logit, label = out.itm_logit.float(), batch.itm_label.float()
        if batch.itm_rows is not None:                  # clean rows only (the masked copies serve the masked tasks)
            logit, label = logit[batch.itm_rows], label[batch.itm_rows]
        return F.binary_cross_entropy_with_logits(logit, label)


class RetrievalFinetune(nn.Module):
    """Retrieval fine-tuning of a cross-encoder (ImageBERT: the three losses its paper compares).

    Rows come grouped per query as [matched pair, P-1 negatives] (`PairCollator(negatives=P-1,
    mask=False)`); with s the (B, P) matrix of ITM logits:
    - "bce": binary cross-entropy on every pair (the paper's best);
    - "ce": multi-class cross-entropy picking the matched pair among the P;
    - "triplet": max(0, margin - s_match + s_hardest negative).
    - "4way": InterBERT's fine-tuning (its released code; the paper reports text-to-image retrieval):
      cross-entropy picking the positive among exactly 4 rows, which `PairCollator(negatives=3,
      four_way=True)` makes [positive, random caption, random image, hard image].
    """

    def __init__(self, loss: str = "bce", margin: float = 0.2):
        super().__init__()
        if loss not in ("bce", "ce", "triplet", "4way"):
            raise ValueError(f"retrieval loss must be 'bce', 'ce', 'triplet' or '4way', got {loss!r}")
        self.loss, self.margin = loss, margin

    def forward(self, out, batch) -> Tensor:
        labels = batch.itm_label.float()
        n_match = int(labels.sum())
        P = len(labels) // max(n_match, 1)
        grid = labels.view(-1, P) if n_match and n_match * P == len(labels) else None
        if grid is None or not (grid[:, 0] == 1).all() or grid[:, 1:].any():
            raise ValueError("retrieval fine-tuning needs rows grouped as [matched pair, P-1 negatives] per query")
        logits = out.itm_logit.float()
        if self.loss == "bce":
            return F.binary_cross_entropy_with_logits(logits, labels)
        s = logits.view(-1, P)                                                   # (B, P), column 0 = match
        if self.loss == "4way" and P != 4:
            raise ValueError(f"retrieval_4way scores 4 rows per pair (positive, random caption, random image, hard "
                             f"image): set data.negatives = 3, got {P - 1}")
        if self.loss in ("ce", "4way"):
            return F.cross_entropy(s, s.new_zeros(s.shape[0], dtype=torch.long))
        return F.relu(self.margin - s[:, 0] + s[:, 1:].max(1).values).mean()

"""Masked language modelling (ImageBERT, Qi et al. 2020, "Pre-training tasks": MLM; BERT's MLM).

15% of the tokens are masked by `vlp.data.masking.mask_tokens` (80% [MASK], 10% random, 10% kept);
the model predicts the original token from the text around it and the regions. The loss counts the
masked tokens of matched pairs only (their labels; the rest carry IGNORE).
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from vlp.data.masking import IGNORE


class MaskedLM(nn.Module):
    def forward(self, out, batch) -> Tensor:
        """out.mlm_logits (M, V) at the labelled positions, in the row-major order of batch.mlm_labels."""
        labels = batch.mlm_labels[batch.mlm_labels != IGNORE]                   # (M,)
        if labels.numel() == 0:
            return out.mlm_logits.sum() * 0.0                                   # no masked token: zero, in the graph
        return F.cross_entropy(out.mlm_logits.float(), labels)

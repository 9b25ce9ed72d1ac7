"""Image-text matching (ImageBERT, Qi et al. 2020, Sec. 3.3 task 4).

The [CLS] state scores whether caption and regions belong together; binary cross-entropy against
`batch.itm_label` (1 for the matched pairs, 0 for the negatives the collator sampled: a random
caption for an image, a random image for a caption).
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


class ImageTextMatching(nn.Module):
    def forward(self, out, batch) -> Tensor:
        return F.binary_cross_entropy_with_logits(out.itm_logit.float(), batch.itm_label.float())

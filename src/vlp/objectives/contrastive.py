"""Multi-view contrastive learning (ERNIE-ViL 2.0, Shan et al. 2022, Sec. 3.2-3.3).

Each view pair (image-caption, image-tags, image-image, text-text) contributes a symmetric InfoNCE
loss. Negatives come from the *global* batch: features are all-gathered across ranks with gradient
and each rank computes only its local rows (OpenCLIP's `local_loss` + `gather_with_grad`), so the
gradient equals that of one process holding the whole batch. Rows that share a group id (captions
of the same image, the two styles of one emoji, identical tag strings) are never each other's
negatives: their logits are masked out, keeping only the designated positive.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vlp.train import dist


def info_nce(q: Tensor, k_all: Tensor, q_ids: Tensor, k_ids_all: Tensor, offset: int, scale: Tensor) -> Tensor:
    """Mean cross-entropy of local queries against all keys.

    q: (n, D) local rows, L2-normalised; k_all: (N, D) keys of the global batch; the positive of q[i]
    is k_all[offset + i]. q_ids: (n,), k_ids_all: (N,) group ids; same-id keys other than the
    positive are removed from the denominator.
    """
    n = q.shape[0]
    logits = scale * q @ k_all.t()                                  # (n, N)
    pos = torch.arange(n, device=q.device) + offset                 # (n,)
    same = q_ids[:, None] == k_ids_all[None, :]                     # (n, N)
    same[torch.arange(n, device=q.device), pos] = False
    logits = logits.masked_fill(same, float("-inf"))
    return F.cross_entropy(logits.float(), pos)


def symmetric_info_nce(a: Tensor, b: Tensor, ids_a: Tensor, ids_b: Tensor, scale: Tensor) -> Tensor:
    """(loss a->b + loss b->a) / 2 with negatives from every rank. a, b: (n, D) local, paired by row."""
    a_all, b_all = dist.gather_with_grad(a), dist.gather_with_grad(b)       # (N, D)
    ids_a_all, ids_b_all = dist.gather_nograd(ids_a), dist.gather_nograd(ids_b)
    offset = dist.rank() * a.shape[0]      # ranks hold equal-sized local batches (the loader drops the tail)
    return 0.5 * (info_nce(a, b_all, ids_a, ids_b_all, offset, scale)
                  + info_nce(b, a_all, ids_b, ids_a_all, offset, scale))


VIEWS = {
    # objective name: (first embedding, second embedding, ids of the second)
    "image_text": ("image", "text", "group"),
    "image_tags": ("image", "tags", "tag_group"),
    "image_image": ("image", "image2", "group"),
    "text_text": ("text", "text2", "group"),
}


class Contrastive(nn.Module):
    """One view pair's symmetric InfoNCE. forward(output, batch) -> scalar.

    For `image_text` the second image view, when present, is paired with the second caption too, so
    both image views and both caption views (e.g. two languages) are aligned across modalities.
    """

    def __init__(self, view: str):
        super().__init__()
        if view not in VIEWS:
            raise ValueError(f"unknown contrastive view {view!r}; valid: {', '.join(VIEWS)}")
        self.view = view

    def forward(self, out, batch) -> Tensor:
        first, second, ids_name = VIEWS[self.view]
        a, b = getattr(out, first), getattr(out, second)
        if a is None or b is None:
            raise ValueError(f"objective {self.view} needs {first!r} and {second!r} in the batch; "
                             f"set its weight to 0 or give the data that view")
        ids_a, ids_b = batch.group, getattr(batch, ids_name)
        if self.view == "image_tags":
            ids_a = ids_b       # images with identical tag strings are not negatives of each other's tags
        loss = symmetric_info_nce(a, b, ids_a, ids_b, out.logit_scale)
        if self.view == "image_text" and out.image2 is not None and out.text2 is not None:
            loss = 0.5 * (loss + symmetric_info_nce(out.image2, out.text2, batch.group, batch.group, out.logit_scale))
        return loss

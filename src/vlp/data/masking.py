"""Masking for the single-stream objectives, as pure functions of (inputs, generator).

ImageBERT (Qi et al. 2020, Sec. 3.3) masks 15% of the text tokens (MLM: 80% [MASK], 10% a random
token, 10% unchanged) and 15% of the regions (MOC / MRFR: a masked region's feature is zeroed 90% of
the time and kept 10%). Every row of a batch is masked the same way, matched or not, so the matching
head cannot tell a pair by its masks; the losses of the masked positions count on matched pairs only,
which the caller selects with `rows`.
"""
from __future__ import annotations

import torch
from torch import Tensor

IGNORE = -100       # label of positions without a loss (torch's cross_entropy ignore_index)


def _select(candidates: Tensor, prob: float, gen: torch.Generator) -> Tensor:
    """(B, N) bool candidates -> (B, N) bool: each candidate independently with probability `prob`.
    No row is forced to mask something: forcing one would erase the only region of a one-object image
    (and a word of a two-word caption) in nearly every row, and the matching task could not learn
    (measured: ITM stayed at chance for 300 steps on single emoji with it, fell to 0.35 without masks)."""
    return (torch.rand(candidates.shape, generator=gen) < prob) & candidates


def mask_tokens(ids: Tensor, mask: Tensor, *, mask_id: int, special_ids: list[int], vocab_size: int,
                rows: Tensor | None = None, prob: float = 0.15, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    """MLM masking. ids, mask: (B, L) long / bool. rows: (B,) bool, the rows whose masked tokens get a
    loss (default all). -> (masked ids (B, L), labels (B, L): the original id where there is a loss,
    IGNORE elsewhere). Special tokens and padding are never masked; random replacements are drawn
    from the non-special ids above the last special id."""
    special = torch.isin(ids, torch.tensor(special_ids, dtype=ids.dtype))
    chosen = _select(mask & ~special, prob, gen)                                # (B, L)
    action = torch.rand(ids.shape, generator=gen)                               # (B, L): < .8 mask, < .9 random
    random_ids = torch.randint(max(special_ids) + 1, vocab_size, ids.shape, generator=gen)
    out = torch.where(chosen & (action < 0.8), torch.full_like(ids, mask_id), ids)
    out = torch.where(chosen & (action >= 0.8) & (action < 0.9), random_ids, out)
    keep = chosen if rows is None else chosen & rows[:, None]
    labels = torch.where(keep, ids, torch.full_like(ids, IGNORE))
    return out, labels


def mask_regions(feats: Tensor, region_mask: Tensor, *, rows: Tensor | None = None, prob: float = 0.15,
                 zero_prob: float = 0.9, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    """MOC / MRFR masking. feats: (B, R, F) region features; region_mask: (B, R) bool, True = real.
    -> (masked features (B, R, F): chosen regions zeroed with probability `zero_prob`, else kept;
    targets (B, R) bool: the chosen regions of the loss rows, whose class and feature are predicted)."""
    chosen = _select(region_mask, prob, gen)                                    # (B, R)
    zero = chosen & (torch.rand(chosen.shape, generator=gen) < zero_prob)       # (B, R)
    out = feats.masked_fill(zero[..., None], 0.0)
    targets = chosen if rows is None else chosen & rows[:, None]
    return out, targets

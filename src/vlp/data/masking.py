"""Masking for the single-stream objectives, as pure functions of (inputs, generator).

ImageBERT (Qi et al. 2020, "Pre-training tasks") masks 15% of the text tokens (MLM: 80% [MASK], 10% a random
token, 10% unchanged) and 15% of the regions (MOC / MRFR: a masked region's feature is zeroed 90% of
the time and kept 10%). Every row of a batch is masked the same way, matched or not, so the matching
head cannot tell a pair by its masks; the losses of the masked positions count on matched pairs only,
which the caller selects with `rows`.

InterBERT (Lin et al. 2020, pre-training tasks) masks differently, so that neither side can copy the answer
from a neighbour: masked segment modeling (`mask_segments`: anchor words at 10%, each masked with its
next 0-2 words, whole words only) and masked region modeling with overlap masking
(`mask_regions_overlap`: anchor regions at 15%, every region overlapping an anchor by IoU >= 0.4
zeroed with it). The 80/10/10 replacement of masked tokens is BERT's in both systems (`_corrupt`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
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
    return _corrupt(ids, chosen, mask_id=mask_id, low=max(special_ids) + 1, vocab_size=vocab_size, rows=rows,
                    gen=gen)


def _corrupt(ids: Tensor, chosen: Tensor, *, mask_id: int, low: int, vocab_size: int, rows: Tensor | None,
             gen: torch.Generator) -> tuple[Tensor, Tensor]:
    """BERT's replacement of the chosen tokens (B, L) bool, each on its own: 80% [MASK], 10% a random id in
    [low, vocab_size), 10% kept. -> (corrupted ids (B, L), labels (B, L): the original id at the chosen
    tokens of the loss rows, IGNORE elsewhere)."""
    action = torch.rand(ids.shape, generator=gen)                               # (B, L): < .8 mask, < .9 random
    random_ids = torch.randint(low, vocab_size, ids.shape, generator=gen)
    out = torch.where(chosen & (action < 0.8), torch.full_like(ids, mask_id), ids)
    out = torch.where(chosen & (action >= 0.8) & (action < 0.9), random_ids, out)
    keep = chosen if rows is None else chosen & rows[:, None]
    labels = torch.where(keep, ids, torch.full_like(ids, IGNORE))
    return out, labels


def segment_tokens(maskable: Tensor, word_start: Tensor, anchors: Tensor, extra: Tensor) -> Tensor:
    """The tokens of MSM segments, deterministic. maskable (B, L) bool: tokens that may be masked (real,
    not special); word_start (B, L) bool: the token begins a word (False for a "##" piece; the first
    maskable token after a non-maskable one always begins a word); anchors (B, L) bool, read at word
    starts only; extra (B, L) long, read at the anchors: how many following words join the anchor's
    segment. -> (B, L) bool: every piece of each anchor word and of its next `extra` maskable words
    (words are counted over the maskable tokens, so a segment ends at [SEP] and skips an [UNK])."""
    B, L = maskable.shape
    prev = F.pad(maskable[:, :-1], (1, 0))                                      # (B, L): the token before is maskable
    start = maskable & (word_start | ~prev)
    word = start.long().cumsum(1) - 1                                           # (B, L) word index of each token
    anchors = anchors & start
    longest = int(extra[anchors].max()) if anchors.any() else -1
    covered = torch.zeros(B, L + max(longest, 0) + 1, dtype=torch.bool)         # (B, words + the longest reach)
    for d in range(longest + 1):
        b, t = (anchors & (extra >= d)).nonzero(as_tuple=True)
        covered[b, word[b, t] + d] = True
    return maskable & covered.gather(1, word.clamp_min(0))


def mask_segments(ids: Tensor, mask: Tensor, *, mask_id: int, special_ids: list[int], vocab_size: int,
                  word_start: Tensor | None = None, rows: Tensor | None = None, prob: float = 0.10,
                  max_extra: int = 2, one_span: bool = False, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    """Masked segment modeling (InterBERT, Lin et al. 2020: MSM). ids, mask: (B, L) long / bool;
    word_start: (B, L) bool, False at the "##" pieces that continue a word (None: every token is a word);
    rows: (B,) bool, the rows whose masked tokens get a loss (default all).

    Each word is an anchor with probability `prob` (the paper: 10%); an anchor and the next 0..`max_extra`
    words (uniform: spans of 1-3 words, 2 on average) are masked, whole words, overlapping segments
    merged, so about 19% of the words are masked (1 - 0.9 x 0.933 x 0.967). `one_span`: exactly one
    anchor per caption instead (the released code). Each masked token is then replaced as BERT does
    (80% [MASK], 10% random, 10% kept, token by token). As `mask_tokens`, no row is forced to mask a
    word unless `one_span`. -> (masked ids (B, L), labels (B, L): original ids at masked tokens of loss rows)."""
    special = torch.isin(ids, torch.tensor(special_ids, dtype=ids.dtype))
    maskable = mask & ~special                                                  # (B, L)
    if word_start is None:
        word_start = torch.ones_like(maskable)
    u = torch.rand(ids.shape, generator=gen)                                    # (B, L) anchor draws
    if one_span:                                                                # the word start with the largest draw
        prev = F.pad(maskable[:, :-1], (1, 0))
        score = torch.where(maskable & (word_start | ~prev), u, -1.0)           # (B, L), -1 off word starts
        best = score.max(1)                                                     # (B,) values and positions
        anchors = torch.zeros_like(maskable)
        anchors[torch.arange(len(ids)), best.indices] = best.values >= 0
    else:
        anchors = u < prob
    extra = torch.randint(0, max_extra + 1, ids.shape, generator=gen)           # (B, L) words after each anchor
    chosen = segment_tokens(maskable, word_start, anchors, extra)
    return _corrupt(ids, chosen, mask_id=mask_id, low=max(special_ids) + 1, vocab_size=vocab_size, rows=rows,
                    gen=gen)


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


def box_iou(boxes: Tensor) -> Tensor:
    """boxes (B, R, 4) as x1, y1, x2, y2 (any unit; the 5-d locations' first four work, IoU is scale-free)
    -> (B, R, R) pairwise intersection over union (0 where a union is empty)."""
    lo = torch.maximum(boxes[:, :, None, :2], boxes[:, None, :, :2])            # (B, R, R, 2)
    hi = torch.minimum(boxes[:, :, None, 2:], boxes[:, None, :, 2:])
    inter = (hi - lo).clamp_min(0).prod(-1)                                     # (B, R, R)
    area = (boxes[..., 2:] - boxes[..., :2]).clamp_min(0).prod(-1)              # (B, R)
    union = area[:, :, None] + area[:, None, :] - inter
    return torch.where(union > 0, inter / union.clamp_min(1e-12), torch.zeros_like(inter))


def overlap_masked(boxes: Tensor, region_mask: Tensor, anchors: Tensor, iou: float = 0.4) -> Tensor:
    """The regions overlap masking hides, deterministic. boxes (B, R, 4) x1, y1, x2, y2; region_mask and
    anchors (B, R) bool -> (B, R) bool: every real anchor, and every real region whose IoU with a real
    anchor of its row is >= `iou` (one hop: a region overlapping only a masked neighbour stays)."""
    anchors = anchors & region_mask
    near = (box_iou(boxes) >= iou) & anchors[:, None, :]                        # (B, R, R): region r near anchor a
    return region_mask & (anchors | near.any(-1))                               # an anchor always masks itself


def mask_regions_overlap(feats: Tensor, boxes: Tensor, region_mask: Tensor, *, rows: Tensor | None = None,
                         prob: float = 0.15, iou: float = 0.4, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    """MRM with overlap masking (InterBERT, Lin et al. 2020: MRM). feats (B, R, F); boxes (B, R, 4)
    x1, y1, x2, y2; region_mask (B, R) bool, True = real; rows (B,) bool, the loss rows (default all).

    Each real region is an anchor with probability `prob` (the paper: 15%; the released code: 10%), and
    every real region whose IoU with an anchor of its image is >= `iou` is masked with it: a detector
    returns many overlapping boxes of one object, and an unmasked twin would hand the model the answer.
    Masked features are zeroed (always: no 10% kept). -> (masked features (B, R, F), targets (B, R) bool:
    the masked regions of the loss rows, whose class distribution is predicted)."""
    masked = overlap_masked(boxes, region_mask, _select(region_mask, prob, gen), iou)     # (B, R)
    out = feats.masked_fill(masked[..., None], 0.0)
    targets = masked if rows is None else masked & rows[:, None]
    return out, targets

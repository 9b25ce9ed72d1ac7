"""Retrieval metrics: recall@K both ways, RSUM, mean and median rank.

The protocol is the image-sentence ranking of Karpathy & Fei-Fei, "Deep Visual-Semantic Alignments for
Generating Image Descriptions" (CVPR 2015, Sec. 4.1: R@K and the median rank of the closest ground truth),
with R@1/5/10 both ways as ImageBERT (Qi et al. 2020, "ImageBERT: Cross-modal Pre-training with
Large-scale Weak-supervised Image-Text Data", Experiments) and UNITER (Chen et al., "UNITER: UNiversal
Image-TExt Representation Learning", ECCV 2020, Experiments) report them; RSUM is the sum of the six.

Image-to-text: an image hits at K if ANY of its ground-truth captions is in the top K; its rank is
the rank of its best-scoring caption. Text-to-image: each caption has exactly one ground-truth image.
Ties are pessimistic, so a collapsed model (all scores equal) scores ~0, never 100%:

    rank(ground truth with score s) = 1 + #(non-ground-truth candidates with score >= s)

Ranks are 1-based. Images without captions are allowed: they are distractors for text-to-image and
are left out of the image-to-text averages. Everything is computed in row blocks (`chunk` rows at a
time), so memory is O(chunk * n) and the full similarity matrix is never built from embeddings.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import Tensor

# A score matrix read by row blocks: (fill, n_rows, n_cols, like, column_major); fill(a, out) writes
# rows a..a+len(out)-1 (against every column) into `out`, one buffer reused for all blocks, made with
# the dtype and device of `like`; column_major lays the buffer out like a transposed matrix, so
# copying rows of one (i.e. columns of the original) is fast.
Source = tuple[Callable[[int, Tensor], Tensor], int, int, Tensor, bool]
MAX_BLOCK = 2**26  # scores per block (256 MB in float32): caps `chunk` rows when rows are very long


def recall_at_k(scores: Tensor, text_to_image: Tensor | Sequence[int], ks: Sequence[int] = (1, 5, 10),
                chunk: int = 1024) -> dict:
    """Recall@K both ways from a full score matrix `scores` (n_texts, n_images); recalls in percent."""
    if scores.dim() != 2:
        raise ValueError(f"scores must be 2-D (n_texts, n_images), got shape {tuple(scores.shape)}")
    n_texts, n_images = scores.shape
    t2i = _check_targets(text_to_image, n_texts, n_images, "text_to_image")
    ks = _check_ks(ks)
    t2i_ranks = _ranks_single_gt(_matrix(scores, check_nan=True), t2i, chunk)  # reads every score once
    i2t_ranks = _ranks_best_gt(_matrix(scores.t()), t2i, chunk)  # (n_images, n_texts) view
    return _summary(i2t_ranks, t2i_ranks, ks, n_images, n_texts)


def recall_at_k_from_embeddings(text_emb: Tensor, image_emb: Tensor, text_to_image: Tensor | Sequence[int],
                                ks: Sequence[int] = (1, 5, 10), chunk: int = 1024) -> dict:
    """Same as `recall_at_k(text_emb @ image_emb.T, ...)` without ever holding the whole matrix.

    Scores are dot products (normalise the embeddings first for cosine). Peak extra memory is one
    block of `chunk` rows (fewer if a block would exceed MAX_BLOCK scores) by max(n_texts, n_images).
    """
    text_emb, image_emb = _check_embeddings(text_emb, image_emb, "text_emb", "image_emb")
    n_texts, n_images = text_emb.shape[0], image_emb.shape[0]
    t2i = _check_targets(text_to_image, n_texts, n_images, "text_to_image")
    ks = _check_ks(ks)
    t2i_ranks = _ranks_single_gt(_product(text_emb, image_emb), t2i, chunk)
    i2t_ranks = _ranks_best_gt(_product(image_emb, text_emb), t2i, chunk)
    return _summary(i2t_ranks, t2i_ranks, ks, n_images, n_texts)


def coco_1k(text_emb: Tensor, image_emb: Tensor, text_to_image: Tensor | Sequence[int], folds: int = 5,
            ks: Sequence[int] = (1, 5, 10), chunk: int = 1024) -> dict:
    """COCO "1K" protocol: `folds` folds of consecutive images (captions follow their image), averaged.

    With the 5,000-image Karpathy test split and folds=5 each fold holds 1,000 images. `n_images` and
    `n_texts` in the result are the totals over all folds; `fold_size` is images per fold.
    """
    text_emb, image_emb = _check_embeddings(text_emb, image_emb, "text_emb", "image_emb")
    n_texts, n_images = text_emb.shape[0], image_emb.shape[0]
    t2i = _check_targets(text_to_image, n_texts, n_images, "text_to_image")
    if folds < 1 or n_images % folds:
        raise ValueError(f"coco_1k: {n_images} images do not split into {folds} equal folds")
    size = n_images // folds
    per_fold = []
    for f in range(folds):
        texts = torch.nonzero(t2i // size == f).squeeze(1)  # (n_texts_in_fold,) caption ids of this fold
        if texts.numel() == 0:
            raise ValueError(f"coco_1k: fold {f} (images {f * size}..{(f + 1) * size - 1}) has no captions")
        per_fold.append(recall_at_k_from_embeddings(
            text_emb[texts], image_emb[f * size:(f + 1) * size], t2i[texts] - f * size, ks, chunk))
    out = {key: sum(m[key] for m in per_fold) / folds for key in per_fold[0]}
    size_name = "1k" if size == 1000 else str(size)
    out.update(n_images=n_images, n_texts=n_texts, fold_size=size, folds=folds,
               protocol=f"coco-{size_name}-{folds}fold")
    return out


def image_to_image(query_emb: Tensor, gallery_emb: Tensor, query_to_gallery: Tensor | Sequence[int],
                   ks: Sequence[int] = (1, 5, 10), chunk: int = 1024) -> dict:
    """Recall@K for queries with exactly one ground-truth gallery item (e.g. the other view of an image)."""
    query_emb, gallery_emb = _check_embeddings(query_emb, gallery_emb, "query_emb", "gallery_emb")
    n_queries, n_gallery = query_emb.shape[0], gallery_emb.shape[0]
    q2g = _check_targets(query_to_gallery, n_queries, n_gallery, "query_to_gallery")
    ks = _check_ks(ks)
    ranks = _ranks_single_gt(_product(query_emb, gallery_emb), q2g, chunk)
    out = _recalls(ranks, ks, "i2i")
    out.update(n_queries=n_queries, n_gallery=n_gallery)
    return out


# --- ranks -----------------------------------------------------------------------------------------

def _matrix(scores: Tensor, check_nan: bool = False) -> Source:
    """Row blocks copied out of a full matrix (float32 at least: 0/1 counts stay exact below 2**24)."""
    like = torch.empty(0, dtype=torch.promote_types(scores.dtype, torch.float32), device=scores.device)
    scores = scores.detach()

    def fill(a: int, out: Tensor) -> Tensor:
        out.copy_(scores[a:a + len(out)])
        if check_nan and torch.isnan(out).any():
            row = a + int(torch.nonzero(torch.isnan(out).any(1))[0])
            raise ValueError(f"scores contain NaN (first in row {row}); ranks would be meaningless")
        return out

    return fill, scores.shape[0], scores.shape[1], like, scores.stride(0) == 1 and scores.stride(1) != 1


def _product(rows: Tensor, cols: Tensor) -> Source:
    """Row blocks of rows @ cols.T, computed on demand."""
    fill = lambda a, out: torch.mm(rows[a:a + len(out)], cols.t(), out=out)  # noqa: E731
    return fill, rows.shape[0], cols.shape[0], rows, False


def _row_blocks(source: Source, chunk: int) -> Iterator[tuple[int, Tensor]]:
    """Yield (a, block): rows a..a+r-1 of the score matrix as an (r, n_cols) view of one reused buffer.

    Reusing one buffer keeps peak memory at a single block: allocating a fresh block per step made
    glibc's allocator hold on to several of them (RSS grew ~15x the block size in the benchmark).
    """
    _check_chunk(chunk)
    fill, n_rows, n_cols, like, column_major = source
    chunk = min(chunk, max(1, MAX_BLOCK // max(n_cols, 1)))
    rows = min(chunk, n_rows)
    buf = like.new_empty(n_cols, rows).t() if column_major else like.new_empty(rows, n_cols)
    for a in range(0, n_rows, chunk):
        out = buf[: min(chunk, n_rows - a)]  # (r, n_cols), the first r rows of buf
        fill(a, out)
        yield a, out


def _ranks_single_gt(source: Source, gt_cols: Tensor, chunk: int) -> Tensor:
    """Rank of each row's one ground-truth column: 1 + #(other columns scoring >= it). -> (n_rows,) long."""
    ranks = []
    gt_cols = gt_cols.to(source[3].device)
    for a, block in _row_blocks(source, chunk):  # block (r, n_cols)
        gt = block.gather(1, gt_cols[a:a + block.shape[0], None])  # (r, 1) ground-truth scores
        # the ground truth itself is counted by ">=" and stands for the "1 +"
        ranks.append(_count_at_least(block, gt))
    return torch.cat(ranks)


def _ranks_best_gt(source: Source, text_to_image: Tensor, chunk: int) -> Tensor:
    """Rank of each image's best caption among all texts; -1 for images without captions. -> (n_images,)."""
    text_to_image = text_to_image.to(source[3].device)
    order = torch.argsort(text_to_image, stable=True)  # caption ids grouped by image
    sorted_images = text_to_image[order]
    ranks = []
    for a, block in _row_blocks(source, chunk):  # block (r, n_texts)
        r = block.shape[0]
        lo, hi = torch.searchsorted(sorted_images, torch.tensor([a, a + r], device=block.device)).tolist()
        texts = order[lo:hi]  # (m,) captions of the images in this block
        rows = text_to_image[texts] - a  # (m,) their image, as a row of the block
        gt = block[rows, texts]  # (m,) ground-truth scores
        best = block.new_full((r,), -math.inf).scatter_reduce(0, rows, gt, "amax")  # (r,)
        gt_at_least_best = rows.new_zeros(r).index_add_(0, rows, (gt >= best[rows]).long())
        has_caption = torch.bincount(rows, minlength=r) > 0
        at_least_best = _count_at_least(block, best[:, None])  # (r,) all texts scoring >= the best caption
        block_ranks = 1 + at_least_best - gt_at_least_best
        ranks.append(torch.where(has_caption, block_ranks, -1))
    return torch.cat(ranks)


def _count_at_least(block: Tensor, threshold: Tensor) -> Tensor:
    """Per row, how many entries of `block` (r, n) are >= `threshold` (r, 1) -> (r,) long; overwrites block.

    Writing the 0/1 comparison into the float block and summing floats is ~7x faster than summing a
    bool mask (which torch widens to int64: 8 bytes per score). Float32 counts are exact below 2**24.
    """
    if block.shape[1] >= 2**24 and block.dtype != torch.float64:
        return (block >= threshold).sum(1)
    return torch.ge(block, threshold, out=block).sum(1).long()


# --- summaries -------------------------------------------------------------------------------------

def _recalls(ranks: Tensor, ks: tuple[int, ...], prefix: str) -> dict:
    """{prefix_rK: percent of ranks <= K, prefix_meanr, prefix_medr} for 1-based `ranks`."""
    out = {f"{prefix}_r{k}": 100.0 * float((ranks <= k).double().mean()) for k in ks}
    out[f"{prefix}_meanr"] = float(ranks.double().mean())
    out[f"{prefix}_medr"] = _median_rank(ranks)
    return out


def _median_rank(ranks: Tensor) -> float:
    """Median rank, rounded down as VSE++/SCAN report it (floor of the midpoint for an even count)."""
    s = ranks.sort().values
    n = s.numel()
    mid = s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2  # midpoint of the two middle ranks
    return float(math.floor(float(mid)))


def _summary(i2t_ranks: Tensor, t2i_ranks: Tensor, ks: tuple[int, ...], n_images: int, n_texts: int) -> dict:
    """Both directions' recalls, RSUM (sum of all recalls) and the counts."""
    i2t = _recalls(i2t_ranks[i2t_ranks > 0], ks, "i2t")  # images without captions are not queries
    t2i = _recalls(t2i_ranks, ks, "t2i")
    rsum = sum(i2t[f"i2t_r{k}"] + t2i[f"t2i_r{k}"] for k in ks)
    return {**{f"i2t_r{k}": i2t[f"i2t_r{k}"] for k in ks}, **{f"t2i_r{k}": t2i[f"t2i_r{k}"] for k in ks},
            "rsum": rsum, "i2t_meanr": i2t["i2t_meanr"], "i2t_medr": i2t["i2t_medr"],
            "t2i_meanr": t2i["t2i_meanr"], "t2i_medr": t2i["t2i_medr"], "n_images": n_images, "n_texts": n_texts}


# --- input checks ----------------------------------------------------------------------------------

def _check_targets(targets: Tensor | Sequence[int], n_queries: int, n_candidates: int, name: str) -> Tensor:
    """`targets` as a (n_queries,) long tensor of candidate indices, or a ValueError naming the bad entry."""
    t = torch.as_tensor(targets)
    if t.dim() != 1 or t.numel() != n_queries:
        raise ValueError(f"{name} must have one entry per query ({n_queries}), got shape {tuple(t.shape)}")
    if n_queries == 0:
        raise ValueError(f"{name}: no queries to evaluate")
    if t.is_floating_point() or t.dtype == torch.bool:
        raise ValueError(f"{name} must hold integer indices, got dtype {t.dtype}")
    bad = torch.nonzero((t < 0) | (t >= n_candidates)).squeeze(1)
    if bad.numel():
        i = int(bad[0])
        raise ValueError(f"{name}[{i}] = {int(t[i])} is out of range for {n_candidates} candidates "
                         f"({bad.numel()} bad entries)")
    return t.long()


def _check_embeddings(a: Tensor, b: Tensor, name_a: str, name_b: str) -> tuple[Tensor, Tensor]:
    """Both embeddings 2-D, same width, finite; cast to a common float dtype (at least float32)."""
    for x, name in ((a, name_a), (b, name_b)):
        if x.dim() != 2:
            raise ValueError(f"{name} must be 2-D (n, dim), got shape {tuple(x.shape)}")
        bad = torch.nonzero(~torch.isfinite(x).all(1)).squeeze(1)
        if bad.numel():
            raise ValueError(f"{name} has non-finite values in {bad.numel()} rows (first: row {int(bad[0])})")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"{name_a} has dim {a.shape[1]} but {name_b} has dim {b.shape[1]}")
    if a.device != b.device:
        raise ValueError(f"{name_a} is on {a.device} but {name_b} is on {b.device}")
    dtype = torch.promote_types(torch.promote_types(a.dtype, b.dtype), torch.float32)
    return a.detach().to(dtype), b.detach().to(dtype)


def _check_ks(ks: Sequence[int]) -> tuple[int, ...]:
    """K values as a tuple of positive ints."""
    ks = tuple(int(k) for k in ks)
    if not ks or min(ks) < 1:
        raise ValueError(f"ks must be positive integers, got {ks}")
    return ks


def _check_chunk(chunk: int) -> None:
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")

"""Retrieval with a cross-encoder: exhaustive ITM scoring, or reranking a dual encoder's top k.

A single-stream model (ImageBERT) scores one (caption, image) pair per forward pass, so scoring every
pair is the papers' protocol for small test sets only. Rerank mode takes each query's top k
candidates from a first stage (a dual encoder's embeddings), scores those k pairs with the
cross-encoder and ranks them by that score; the other candidates stay below, in first-stage order.
With `fuse` = w > 0 the top k are ranked by sigmoid(ITM logit) + w * first-stage cosine instead, as
BLIP ranks its ITM candidates together with their ITC similarity; w = 0 is the paper's ITM alone.
Both work query chunk by query chunk, so memory holds one (chunk, candidates) block at a time, and
return the recall keys of `vlp.metrics` (ties count against the model, as there).

    score = pair_scorer(model, text_ids, text_mask, feats, boxes, region_mask)
    res = cross_encoder_recall(score, text_to_image, k=16, text_emb=te, image_emb=ie)   # rerank
    res = cross_encoder_recall(score, text_to_image)                                      # exhaustive
"""
from __future__ import annotations

import time
from typing import Callable, Sequence

import torch
from torch import Tensor
from tqdm import tqdm

from vlp.metrics import _check_ks, _check_targets, _summary, recall_at_k

PairScorer = Callable[[Tensor, Tensor], Tensor]      # (text indices (N,), image indices (N,)) -> (N,) scores


def pair_scorer(model, text_ids: Tensor, text_mask: Tensor, feats: Tensor, boxes: Tensor, region_mask: Tensor,
                batch_size: int = 256, bf16: bool = False) -> PairScorer:
    """A PairScorer over a tokenised caption set (T, L) and a region set (I, R, ...) with `model.match_scores`
    (bf16: the transformer under bf16 autocast)."""
    @torch.no_grad()
    def score(t: Tensor, i: Tensor) -> Tensor:
        out = []
        for a in range(0, len(t), batch_size):
            tt, ii = t[a:a + batch_size], i[a:a + batch_size]
            L, R = int(text_mask[tt].sum(1).max()), int(region_mask[ii].sum(1).max())   # trim shared padding
            out.append(model.match_scores(text_ids[tt, :L], text_mask[tt, :L], feats[ii, :R], boxes[ii, :R],
                                          region_mask[ii, :R], bf16=bf16).float())
        return torch.cat(out)
    return score


def _rerank_block(first: Tensor, k: int, score_rows: Callable[[Tensor], Tensor], gt: Tensor, fuse: float = 0.0
                  ) -> Tensor:
    """One query block. first (c, N) first-stage scores; score_rows(top (c, k)) -> (c, k) cross-encoder
    scores; gt (c, N) bool ground truth -> (c,) rank of the best ground truth after reranking the top k:
    1 + the number of wrong candidates scoring at least as high (as `vlp.metrics` counts).
    fuse > 0: rank the top k by sigmoid(cross score) + fuse * first-stage score."""
    top = first.topk(k, dim=1).indices                                                   # (c, k)
    s = score_rows(top)                                                                  # (c, k)
    if fuse:
        s = s.sigmoid() + fuse * first.gather(1, top)
    top_gt = gt.gather(1, top)                                                           # (c, k)
    best = s.masked_fill(~top_gt, float("-inf")).max(1, keepdim=True).values             # (c, 1)
    inside = 1 + ((s >= best) & ~top_gt).sum(1)                                          # (c,)
    # no ground truth in the top k: its first-stage rank, below all k reranked candidates
    first_best = first.masked_fill(~gt, float("-inf")).max(1, keepdim=True).values       # (c, 1)
    outside = (1 + ((first >= first_best) & ~gt).sum(1)).clamp_min(k + 1)                # (c,)
    return torch.where(top_gt.any(1), inside, outside)


def cross_encoder_recall(score: PairScorer, text_to_image: Tensor | Sequence[int], k: int | None = None,
                         text_emb: Tensor | None = None, image_emb: Tensor | None = None, n_images: int | None = None,
                         ks: Sequence[int] = (1, 5, 10), chunk: int = 64, progress: bool = True,
                         fuse: float = 0.0) -> dict:
    """Recall both ways with cross-encoder scores. With `text_emb`/`image_emb` (first stage) and `k`:
    rerank each query's top k; without them: exhaustive (every pair scored; needs `n_images`)."""
    t0 = time.perf_counter()
    ks = _check_ks(ks)
    exhaustive = text_emb is None or image_emb is None
    if exhaustive and n_images is None:
        raise ValueError("exhaustive scoring needs n_images (or give text_emb and image_emb for rerank mode)")
    n_img = n_images if exhaustive else image_emb.shape[0]
    t2i = _check_targets(text_to_image, len(text_to_image), n_img, "text_to_image")
    n_txt = len(t2i)
    k_t2i, k_i2t = min(k or 16, n_img), min(k or 16, n_txt)
    pairs = 0

    def ranks(n_queries: int, n_cand: int, kk: int, first_rows, gt_rows, pair) -> Tensor:
        nonlocal pairs
        out = []
        for a in tqdm(range(0, n_queries, chunk), desc="rerank", disable=not progress, leave=False):
            q = torch.arange(a, min(a + chunk, n_queries))
            first = first_rows(q)
            rows = lambda top: pair(q[:, None].expand_as(top).reshape(-1), top.reshape(-1)).view(top.shape)
            out.append(_rerank_block(first, kk, rows, gt_rows(q), fuse))
            pairs += len(q) * kk
        return torch.cat(out)

    if exhaustive:              # every pair once, into one (T, I) matrix
        blocks = []
        for a in tqdm(range(0, n_txt, chunk), desc="score all pairs", disable=not progress, leave=False):
            q = torch.arange(a, min(a + chunk, n_txt))
            blocks.append(score(q.repeat_interleave(n_img), torch.arange(n_img).repeat(len(q))).view(len(q), n_img))
        res = recall_at_k(torch.cat(blocks), t2i, ks)
        res.update(mode="exhaustive", pairs_scored=n_txt * n_img, seconds=round(time.perf_counter() - t0, 2))
        return res
    t2i_ranks = ranks(n_txt, n_img, k_t2i, lambda q: text_emb[q] @ image_emb.t(),
                      lambda q: t2i[q, None] == torch.arange(n_img)[None], lambda t, i: score(t, i))
    has_caption = torch.zeros(n_img, dtype=torch.bool).index_fill_(0, t2i, True)
    i2t_ranks = ranks(n_img, n_txt, k_i2t, lambda q: image_emb[q] @ text_emb.t(),
                      lambda q: q[:, None] == t2i[None], lambda i, t: score(t, i))
    i2t_ranks = torch.where(has_caption, i2t_ranks, -1)                  # images without captions are no queries
    res = _summary(i2t_ranks, t2i_ranks, ks, n_img, n_txt)
    res.update(mode="rerank", k_t2i=k_t2i, k_i2t=k_i2t, fuse=fuse, pairs_scored=pairs,
               seconds=round(time.perf_counter() - t0, 2))
    return res


def _memoized(score: PairScorer) -> PairScorer:
    """A PairScorer that scores each (text, image) pair once and answers repeats from memory."""
    seen: dict[tuple[int, int], float] = {}

    def cached(t: Tensor, i: Tensor) -> Tensor:
        keys = list(zip(t.tolist(), i.tolist()))
        first = {key: n for n, key in reversed(list(enumerate(keys))) if key not in seen}   # new pair -> a row
        if first:
            idx = torch.tensor(list(first.values()))
            for key, v in zip(first, score(t[idx], i[idx]).tolist()):
                seen[key] = v
        return torch.tensor([seen[key] for key in keys])
    return cached


def _region_tensors(store, ids: list[str]) -> tuple[Tensor, Tensor, Tensor]:
    """Store entries -> zero-padded features (I, R, F), 5-d locations (I, R, 5), mask (I, R)."""
    from torchvision.ops import box_convert

    from vlp.encoders.regions import box_features
    items = [store[i] for i in ids]
    R, Fd = max(len(x["features"]) for x in items), items[0]["features"].shape[1]
    feats, boxes = torch.zeros(len(items), R, Fd), torch.zeros(len(items), R, 5)
    mask = torch.zeros(len(items), R, dtype=torch.bool)
    for n, x in enumerate(items):
        k = len(x["features"])
        feats[n, :k] = x["features"]
        boxes[n, :k] = box_features(box_convert(x["boxes"], "xyxy", "xywh"), x["image_w"], x["image_h"])
        mask[n, :k] = True
    return feats, boxes, mask


def evaluate_cross_encoder(model, tokenizer, records: list, store, max_len: int, k: int | None = None,
                           first_stage: tuple | None = None, limit: int | None = None, batch_size: int = 256,
                           progress: bool = True, fuse: float | Sequence[float] = 0.0, bf16: bool = False) -> dict:
    """Recall of a single-stream model over a manifest's records and their region store: exhaustive, or
    rerank mode with `first_stage` = (dual encoder, its tokenizer, its image size) and `k`; several
    `fuse` weights give one result each (`fused_<w>` sections; the ITM scores are computed once per weight).
    limit: evaluate the first `limit` images only (exhaustive scoring grows as images x captions).
    Images without regions (`skipped_no_regions`) and, in rerank mode, images the first stage cannot
    decode (`skipped_unreadable`) are left out with their captions, counted and warned about.
    bf16: score under bf16 autocast (about twice the pairs/s on CPUs with bf16 matmuls)."""
    from vlp.data.formats import SkipReport
    from vlp.data.pairs import decode_images
    from vlp.eval.retrieval import embed_images, embed_texts
    model.eval()
    chosen = [r for r in records if r.captions][:limit]
    kept = [r for r in chosen if r.image_id in store]
    if not kept:
        raise ValueError("no evaluated record has regions in the store and a caption")
    if missing := len(chosen) - len(kept):          # skipped and counted, never silently
        where = getattr(store, "path", "the store")
        print(f"warning: {missing} of {len(chosen)} evaluated images have no regions in {where}: skipped")
    unreadable, images = 0, None
    if first_stage is not None:     # the first stage reads the images: evaluate only those it can read
        skipped = SkipReport()
        decoded, images = decode_images(kept, first_stage[2], skipped, progress=False)
        if unreadable := len(kept) - len(decoded):      # drop their captions and regions too: rows stay aligned
            print(f"warning: {unreadable} of {len(kept)} evaluated images are unreadable: skipped "
                  f"({skipped.summary()})")
            kept = decoded
    caps = [(c, i) for i, r in enumerate(kept) for c in r.captions]
    ids, mask = tokenizer.encode([c for c, _ in caps], max_len)
    feats, boxes, rmask = _region_tensors(store, [r.image_id for r in kept])
    score = pair_scorer(model, ids, mask, feats, boxes, rmask, batch_size, bf16)
    t2i = torch.tensor([i for _, i in caps])
    if first_stage is None:
        res = cross_encoder_recall(score, t2i, n_images=len(kept), progress=progress)
    else:
        dual, dual_tok, _ = first_stage
        dual.eval()
        te = embed_texts(dual, dual_tok, [c for c, _ in caps], max_len)
        ie = embed_images(dual, images)
        weights = [fuse] if isinstance(fuse, (int, float)) else list(fuse)
        if len(weights) > 1:            # every weight reranks the same top k: score each pair once
            score = _memoized(score)
        res = cross_encoder_recall(score, t2i, k=k, text_emb=te, image_emb=ie, progress=progress, fuse=weights[0])
        for w in weights[1:]:
            res[f"fused_{w:g}"] = cross_encoder_recall(score, t2i, k=k, text_emb=te, image_emb=ie, progress=progress,
                                                       fuse=w)
        res["first_stage"] = recall_at_k(te @ ie.t(), t2i)          # the dual encoder alone, same queries
    res["skipped_no_regions"], res["skipped_unreadable"] = missing, unreadable
    return res

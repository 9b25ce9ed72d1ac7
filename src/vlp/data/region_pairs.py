"""(caption, regions) samples for single-stream models: a manifest's records joined with a RegionStore.

A sample is what `vlp.data.collate.PairCollator` takes: one caption of the image (drawn by (seed,
epoch, index)), the image's region features (K, F), their 5-d locations (ImageBERT's x1/W, y1/H,
x2/W, y2/H, area), the detector's class distribution (K, C) and its argmax as the hard label.
Records without regions in the store or without captions are skipped and counted. With `group_key`,
records with equal `meta[group_key]` (e.g. the two drawing styles of one emoji, "hex") form one group,
so they are never drawn as each other's negatives.

Hard negatives: `mine_neighbours` gives each record its nearest other records, either by TF-IDF
cosine over the captions (English words, Chinese characters; InterBERT's recipe, Lin et al. 2020,
leaving out neighbours at `max_sim` or above, likely the same content) or by a dual encoder's
text->image similarity (the candidates a first stage hands a reranker, as ALBEF/BLIP mine ITM
negatives from their contrastive similarity). Never the record's own group, never a record with an
identical caption. With `dataset.neighbours` set, a sample carries `hard`: as many neighbours as
`negatives`, each with its own caption and regions; the collator uses them for a share of its
negative rows.
"""
from __future__ import annotations

import re
from collections import Counter

import torch
from torch.utils.data import Dataset
from torchvision.ops import box_convert

from vlp.data.formats import Record, SkipReport
from vlp.data.regions import RegionStore
from vlp.encoders.regions import box_features


class RegionPairDataset(Dataset):
    def __init__(self, records: list[Record], store: RegionStore, seed: int = 0, report: SkipReport | None = None,
                 group_key: str = "", negatives: int = 1):
        self.report = report if report is not None else SkipReport()
        self.store, self.seed, self.negatives = store, seed, negatives
        self.records = []
        for r in records:
            if r.image_id not in store:
                self.report.add("no regions in the store", f"{r.image} (image id {r.image_id})")
            elif not r.captions:
                self.report.add("no caption", str(r.image))
            else:
                self.records.append(r)
        ids: dict = {}
        self.group_ids = [ids.setdefault(r.meta.get(group_key, n) if group_key else n, len(ids))
                       for n, r in enumerate(self.records)]
        self.neighbours: torch.Tensor | None = None          # (N, k) record indices, -1 = none (mine_neighbours)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, key: tuple[int, int]) -> dict:
        index, epoch = key
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch * 100_003 + index)
        sample = self._sample(index, epoch, gen)
        if self.neighbours is not None:
            pool = self.neighbours[index][self.neighbours[index] >= 0]
            if len(pool):
                picks = pool[torch.randperm(len(pool), generator=gen)[:self.negatives]].tolist()
                sample["hard"] = [self._sample(j, epoch, gen) for j in picks]
        return sample

    def _sample(self, index: int, epoch: int, gen: torch.Generator) -> dict:
        r = self.records[index]
        regions = self.store[r.image_id]
        boxes = box_features(box_convert(regions["boxes"], "xyxy", "xywh"), regions["image_w"], regions["image_h"])
        probs = regions["cls_prob"]                                             # (K, C), C = 0 without classes
        labels = probs.argmax(-1) if probs.shape[1] else torch.zeros(len(probs), dtype=torch.long)
        caption = r.captions[int(torch.randint(len(r.captions), (1,), generator=gen))]
        return {"text": caption, "feats": regions["features"], "boxes": boxes, "labels": labels,
                "probs": probs if probs.shape[1] else None, "group": self.group_ids[index], "epoch": epoch}


def mine_neighbours(records: list[Record], groups: list[int], source: str = "tfidf", k: int = 30,
                    max_sim: float = 0.5, progress: bool = True) -> torch.Tensor:
    """(N, k) long hard-negative candidates per record, most similar first, -1 where fewer qualify.
    source: "tfidf" (captions alike, below `max_sim`) or a dual-encoder checkpoint (run folder or step)
    whose text->image similarity ranks the other records' images for each record's mean caption."""
    same = _same_caption(records)
    if source == "tfidf":
        return tfidf_neighbours([" ".join(r.captions) for r in records], groups, k, max_sim, exclude=same)
    from vlp.data.pairs import decode_images
    from vlp.eval.retrieval import embed_images, embed_texts
    from vlp.train.checkpoint import load_checkpoint
    model, tok, cfg = load_checkpoint(source)
    model.eval()
    _, images = decode_images(records, cfg.model.image_size, SkipReport(), progress=progress)
    if len(images) != len(records):
        raise ValueError(f"hard negatives from {source}: {len(records) - len(images)} training images are unreadable")
    with torch.no_grad():
        img = embed_images(model, images)                                                  # (N, D)
        caps = embed_texts(model, tok, [c for r in records for c in r.captions], cfg.model.text_max_len)
        owner = torch.tensor([n for n, r in enumerate(records) for _ in r.captions])
        txt = torch.zeros(len(records), caps.shape[1]).index_add_(0, owner, caps)         # (N, D) mean caption
    return _top_others(lambda lo, hi: txt[lo:hi] @ img.T, groups, k, same)


def _same_caption(records: list[Record]) -> dict[int, list[int]]:
    """record -> the other records sharing one of its captions exactly (the same description: no negative)."""
    by_caption: dict[str, list[int]] = {}
    for n, r in enumerate(records):
        for c in set(r.captions):
            by_caption.setdefault(c, []).append(n)
    out: dict[int, set[int]] = {}
    for ns in by_caption.values():
        for n in ns if len(ns) > 1 else ():
            out.setdefault(n, set()).update(m for m in ns if m != n)
    return {n: sorted(ms) for n, ms in out.items()}


def _top_others(similarity, groups: list[int], k: int, exclude: dict[int, list[int]], max_sim: float = float("inf"),
                chunk: int = 1024) -> torch.Tensor:
    """similarity(lo, hi) -> (hi - lo, N) rows; the top k per row of other groups, not excluded, below max_sim."""
    group = torch.tensor(groups)
    n = len(groups)
    out = torch.full((n, min(k, n)), -1, dtype=torch.long)
    for lo in range(0, n, chunk):
        hi = min(lo + chunk, n)
        sim = similarity(lo, hi).float()
        sim[group[lo:hi, None] == group[None]] = float("-inf")
        sim[sim >= max_sim] = float("-inf")
        for row in range(lo, hi):
            if row in exclude:
                sim[row - lo, exclude[row]] = float("-inf")
        top, idx = sim.topk(out.shape[1], dim=1)
        out[lo:hi] = torch.where(top > float("-inf"), idx, -1)
    return out


def tfidf_neighbours(docs: list[str], groups: list[int], k: int, max_sim: float = 0.5,
                     chunk: int = 1024, exclude: dict[int, list[int]] | None = None) -> torch.Tensor:
    """(N, k) long: each document's k most TF-IDF-similar documents of other groups whose cosine is
    below `max_sim`, most similar first; -1 where fewer qualify. Terms: lower-cased ASCII words and
    single non-ASCII characters (a Chinese caption has no spaces to split on)."""
    bags = [Counter(re.findall(r"[a-z0-9]+|[^\x00-\x7f\s]", d.lower())) for d in docs]
    vocab = {w: i for i, w in enumerate(sorted({w for b in bags for w in b}))}
    n = len(docs)
    rows = torch.tensor([i for i, b in enumerate(bags) for _ in b], dtype=torch.long)
    cols = torch.tensor([vocab[w] for b in bags for w in b], dtype=torch.long)
    tf = torch.tensor([float(c) for b in bags for c in b.values()])
    df = torch.bincount(cols, minlength=len(vocab)).float()
    idf = torch.log((1 + n) / (1 + df)) + 1                       # smoothed idf
    vals = tf * idf[cols]
    norm = torch.zeros(n).index_add_(0, rows, vals ** 2).sqrt().clamp_min(1e-12)
    x = torch.sparse_coo_tensor(torch.stack([rows, cols]), vals / norm[rows], (n, len(vocab)),
                                check_invariants=True).coalesce()
    def similarity(lo: int, hi: int) -> torch.Tensor:                 # (c, N) cosines, no shared term -> none
        sim = torch.sparse.mm(x, x.index_select(0, torch.arange(lo, hi)).to_dense().T).T
        return sim.masked_fill(sim <= 0, float("-inf"))
    return _top_others(similarity, groups, k, exclude or {}, max_sim, chunk)

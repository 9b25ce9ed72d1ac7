"""Batch: the one structure the collator builds and the loop moves; models read only what they need."""
from __future__ import annotations

import zlib
from dataclasses import dataclass, fields

import torch
from torch import Tensor

from vlp.data.masking import IGNORE, mask_regions, mask_regions_overlap, mask_segments, mask_tokens
from vlp.data.transforms import normalize


@dataclass
class Batch:
    images: Tensor | None                 # (B, 3, H, W) float, normalised (None for region inputs)
    text_ids: Tensor                      # (B, L) long
    text_mask: Tensor                     # (B, L) bool
    group: Tensor                         # (B,) long: rows with one id are never each other's negatives
    images2: Tensor | None = None         # second image view
    text2_ids: Tensor | None = None       # second caption view
    text2_mask: Tensor | None = None
    tag_ids: Tensor | None = None         # tags as a textual view
    tag_mask: Tensor | None = None
    tag_group: Tensor | None = None       # (B,) long: rows with identical tag strings
    image_index: Tensor | None = None     # (B,) long: the dataset rows of `images` (and `images2`), for caches
    image2_index: Tensor | None = None
    # single-stream systems (ImageBERT): detector regions, masking targets, matching labels
    region_feats: Tensor | None = None    # (B, R, F) float, masked regions already zeroed
    region_boxes: Tensor | None = None    # (B, R, 5) float locations (encoders.regions.box_features)
    region_mask: Tensor | None = None     # (B, R) bool, True = real region
    region_orig: Tensor | None = None     # (B, R, F) the features before masking (MRFR targets)
    region_labels: Tensor | None = None   # (B, R) long detector class (MOC targets)
    region_probs: Tensor | None = None    # (B, R, C) detector class distribution (MOC's KL option)
    region_targets: Tensor | None = None  # (B, R) bool: masked regions with a loss (matched pairs only)
    mlm_labels: Tensor | None = None      # (B, L) long original ids at masked tokens, -100 elsewhere
    itm_label: Tensor | None = None       # (B,) float: 1 = matched pair, 0 = a sampled negative
    itm_rows: Tensor | None = None        # (B,) bool: the rows ITM scores (None: all; `PairCollator(clean_itm=True)`)

    def to(self, device) -> "Batch":
        return Batch(**{f.name: (v.to(device, non_blocking=True) if isinstance(v := getattr(self, f.name), Tensor)
                                 else v) for f in fields(self)})

    def __len__(self) -> int:
        return self.text_ids.shape[0]

    def pairs(self) -> int:
        """Matched image-text pairs in the batch (rows minus sampled negatives)."""
        if self.itm_label is None:
            return len(self)
        return int(self.itm_label.sum() if self.itm_rows is None else self.itm_label[self.itm_rows].sum())


class Collator:
    """List of samples (dicts from PairDataset) -> Batch. Tokenises here, in the loader."""

    def __init__(self, tokenizer, max_len: int, views: set[str]):
        self.tok, self.max_len, self.views = tokenizer, max_len, views

    def __call__(self, samples: list[dict]) -> Batch:
        ids, mask = self.tok.encode([s["text"] for s in samples], self.max_len)
        b = Batch(images=normalize(torch.stack([s["image"] for s in samples])), text_ids=ids, text_mask=mask,
                  group=torch.tensor([s["group"] for s in samples]),
                  image_index=torch.tensor([s["index"] for s in samples]))
        if "image2" in self.views:
            b.images2 = normalize(torch.stack([s["image2"] for s in samples]))
            b.image2_index = torch.tensor([s["index2"] for s in samples])
        if "text2" in self.views:
            b.text2_ids, b.text2_mask = self.tok.encode([s["text2"] for s in samples], self.max_len)
        if "tags" in self.views:
            b.tag_ids, b.tag_mask = self.tok.encode([s["tags"] for s in samples], self.max_len)
            b.tag_group = torch.tensor([s["tag_group"] for s in samples])
        return b


class PairCollator:
    """Samples of (caption, regions) -> a Batch of matched pairs and sampled negatives for a
    single-stream model (ImageBERT, Qi et al. 2020, "Pre-training tasks" and "Fine-tuning tasks").

    A sample is a dict: "text" str, "feats" (K, F), "boxes" (K, 5) locations, "labels" (K,) long,
    optional "probs" (K, C), "group" int (samples of one group are never each other's negatives).
    Each matched pair is followed by `negatives` rows, alternately its caption with another group's
    regions and its regions with another group's caption (the paper's random image per caption and
    random caption per image), so rows come as [match, negatives...] per sample: the layout the
    retrieval fine-tuning losses read. With `mask=True` (pretraining) every row is masked
    (`vlp.data.masking`) and the masked-position targets are kept on the matched rows only.
    With `clean_itm=True` as well, those rows stay unmasked for ITM (`Batch.itm_rows`) and a masked copy of
    each matched pair follows them all, for the masked tasks alone (UNITER's split of the tasks: ITM never
    sees a caption whose object word is masked or a scene whose object is zeroed); 1.5x the rows.
    With `hard` > 0, each negative row is, with that probability, drawn from the sample's "hard"
    neighbours (`RegionPairDataset(hard_pool=...)`, captions alike by TF-IDF) instead of the batch.

    InterBERT's options (Lin et al. 2020): `text_masking` "tokens" (BERT's 15% of tokens, the default),
    "segments" (MSM: anchor words at 10%, each with its next 0-2 words, `masking.mask_segments`) or
    "one_segment" (one segment per caption, the released code); `region_masking` "independent" (each region
    alone, the default) or "overlap" (regions overlapping an anchor by IoU >= 0.4 masked with it,
    `masking.mask_regions_overlap`); `four_way` (with negatives=3): the rows of each sample are exactly
    [match, a random caption, a random image, a hard image] (the released code's retrieval fine-tuning),
    the hard image from the sample's first "hard" neighbour (a random image when it has none).
    """

    def __init__(self, tokenizer, max_len: int, negatives: int = 1, mask: bool = True, seed: int = 0,
                 hard: float = 0.0, clean_itm: bool = False, text_masking: str = "tokens",
                 region_masking: str = "independent", four_way: bool = False):
        if text_masking not in ("tokens", "segments", "one_segment"):
            raise ValueError(f"text_masking must be tokens, segments or one_segment, got {text_masking!r}")
        if region_masking not in ("independent", "overlap"):
            raise ValueError(f"region_masking must be independent or overlap, got {region_masking!r}")
        if four_way and negatives != 3:
            raise ValueError(f"four_way rows are [match, random caption, random image, hard image]: negatives = 3, "
                             f"got {negatives}")
        self.tok, self.max_len, self.negatives, self.mask, self.seed = tokenizer, max_len, negatives, mask, seed
        self.hard, self.clean_itm = hard, clean_itm and mask
        self.text_masking, self.region_masking, self.four_way = text_masking, region_masking, four_way
        self.continuation = tokenizer.continuation_ids() if mask and text_masking != "tokens" else None

    @staticmethod
    def _other(i: int, groups: list[int], gen: torch.Generator) -> int:
        """A random sample index of a group other than sample i's."""
        choices = [j for j, g in enumerate(groups) if g != groups[i]]
        if not choices:
            raise ValueError("a batch needs samples of at least two groups to draw negatives from")
        return choices[int(torch.randint(len(choices), (1,), generator=gen))]

    def __call__(self, samples: list[dict]) -> Batch:
        groups = [s["group"] for s in samples]
        # random only by (seed, the batch's samples): a resumed run draws the same negatives and masks
        key = zlib.crc32(repr([(s["group"], s.get("epoch", 0), s["text"]) for s in samples]).encode())
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + key)
        pool = list(samples)                              # the batch, then the hard neighbours drawn on
        rows = []                                         # (caption sample, regions sample, matched)
        for i in range(len(samples)):
            rows.append((i, i, True))
            if self.four_way:                             # random caption, random image, hard image
                hard = list(samples[i].get("hard") or [])
                rows += [(self._other(i, groups, gen), i, False), (i, self._other(i, groups, gen), False)]
                if hard:
                    pool.append(hard[0])
                rows.append((i, len(pool) - 1 if hard else self._other(i, groups, gen), False))
                continue
            hard = list(samples[i].get("hard") or []) if self.hard > 0 else []
            for k in range(self.negatives):
                if hard and float(torch.rand((), generator=gen)) < self.hard:
                    pool.append(hard.pop(0))
                    j = len(pool) - 1
                else:
                    j = self._other(i, groups, gen)
                rows.append((j, i, False) if k % 2 == 0 else (i, j, False))
        n_clean = len(rows)
        if self.clean_itm:                                # the masked copies of the matched pairs, last
            rows += [(i, i, True) for i in range(len(samples))]
        ids, mask = self.tok.encode([pool[t]["text"] for t, _, _ in rows], self.max_len)
        regs = [pool[r] for _, r, _ in rows]
        K = max(len(s["feats"]) for s in regs)

        def pad(key: str, fill=0) -> Tensor:              # (N, K, ...) zero-padded region tensors
            return torch.stack([torch.cat([s[key], s[key].new_full((K - len(s[key]), *s[key].shape[1:]), fill)])
                                for s in regs])
        region_mask = torch.arange(K)[None] < torch.tensor([len(s["feats"]) for s in regs])[:, None]
        matched = torch.tensor([m for _, _, m in rows])
        b = Batch(images=None, text_ids=ids, text_mask=mask, group=torch.tensor([pool[r]["group"] for _, r, _ in rows]),
                  region_feats=pad("feats"), region_boxes=pad("boxes"), region_mask=region_mask,
                  region_labels=pad("labels"), itm_label=matched.float())
        if all(s.get("probs") is not None for s in regs):
            b.region_probs = pad("probs")
        if self.mask:
            # joint (the default): every row masked alike, so ITM cannot tell a pair by its masks; clean_itm: only
            # the copies are masked and ITM never sees them
            at = slice(n_clean, None) if self.clean_itm else slice(None)
            special = sorted({self.tok.pad_id, self.tok.unk_id, self.tok.cls_id, self.tok.sep_id, self.tok.mask_id})
            b.text_ids, b.mlm_labels = ids.clone(), torch.full_like(ids, IGNORE)
            common = dict(mask_id=self.tok.mask_id, vocab_size=self.tok.vocab_size, special_ids=special,
                          rows=matched[at], gen=gen)
            if self.text_masking == "tokens":
                b.text_ids[at], b.mlm_labels[at] = mask_tokens(ids[at], mask[at], **common)
            else:                                         # whole words: a "##" piece goes with its word
                starts = ~self.continuation[ids[at]]
                b.text_ids[at], b.mlm_labels[at] = mask_segments(ids[at], mask[at], word_start=starts,
                                                                 one_span=self.text_masking == "one_segment", **common)
            b.region_orig, feats = b.region_feats, b.region_feats.clone()
            b.region_targets = torch.zeros_like(region_mask)
            if self.region_masking == "independent":
                feats[at], b.region_targets[at] = mask_regions(b.region_feats[at], region_mask[at], rows=matched[at],
                                                               gen=gen)
            else:                                         # the 5-d locations' x1, y1, x2, y2 (IoU is scale-free)
                feats[at], b.region_targets[at] = mask_regions_overlap(
                    b.region_feats[at], b.region_boxes[at, :, :4], region_mask[at], rows=matched[at], gen=gen)
            b.region_feats = feats
            if self.clean_itm:
                b.itm_rows = torch.arange(len(rows)) < n_clean
        return b


def views_for(objectives: dict[str, float]) -> set[str]:
    """Which optional views the active objectives need (image_text also uses them when present)."""
    active = {name for name, w in objectives.items() if w > 0}
    views = set()
    if "image_image" in active:
        views.add("image2")
    if "text_text" in active:
        views.add("text2")
    if "image_tags" in active:
        views.add("tags")
    return views

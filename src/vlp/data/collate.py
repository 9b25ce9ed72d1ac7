"""Batch: the one structure the collator builds and the loop moves; models read only what they need."""
from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from torch import Tensor

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

    def to(self, device) -> "Batch":
        return Batch(**{f.name: (v.to(device, non_blocking=True) if isinstance(v := getattr(self, f.name), Tensor)
                                 else v) for f in fields(self)})

    def __len__(self) -> int:
        return self.text_ids.shape[0]


class Collator:
    """List of samples (dicts from PairDataset) -> Batch. Tokenises here, in the loader."""

    def __init__(self, tokenizer, max_len: int, views: set[str]):
        self.tok, self.max_len, self.views = tokenizer, max_len, views

    def __call__(self, samples: list[dict]) -> Batch:
        ids, mask = self.tok.encode([s["text"] for s in samples], self.max_len)
        b = Batch(images=normalize(torch.stack([s["image"] for s in samples])), text_ids=ids, text_mask=mask,
                  group=torch.tensor([s["group"] for s in samples]))
        if "image2" in self.views:
            b.images2 = normalize(torch.stack([s["image2"] for s in samples]))
        if "text2" in self.views:
            b.text2_ids, b.text2_mask = self.tok.encode([s["text2"] for s in samples], self.max_len)
        if "tags" in self.views:
            b.tag_ids, b.tag_mask = self.tok.encode([s["tags"] for s in samples], self.max_len)
            b.tag_group = torch.tensor([s["tag_group"] for s in samples])
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

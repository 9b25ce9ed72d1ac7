"""(caption, regions) samples for single-stream models: a manifest's records joined with a RegionStore.

A sample is what `vlp.data.collate.PairCollator` takes: one caption of the image (drawn by (seed,
epoch, index)), the image's region features (K, F), their 5-d locations (ImageBERT's x1/W, y1/H,
x2/W, y2/H, area), the detector's class distribution (K, C) and its argmax as the hard label.
Records without regions in the store or without captions are skipped and counted. With `group_key`,
records with equal `meta[group_key]` (e.g. the two drawing styles of one emoji, "hex") form one group,
so they are never drawn as each other's negatives.
"""
from __future__ import annotations

import torch
from torch.utils.data import Dataset
from torchvision.ops import box_convert

from vlp.data.formats import Record, SkipReport
from vlp.data.regions import RegionStore
from vlp.encoders.regions import box_features


class RegionPairDataset(Dataset):
    def __init__(self, records: list[Record], store: RegionStore, seed: int = 0, report: SkipReport | None = None,
                 group_key: str = ""):
        self.report = report if report is not None else SkipReport()
        self.store, self.seed = store, seed
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

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, key: tuple[int, int]) -> dict:
        index, epoch = key
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch * 100_003 + index)
        r = self.records[index]
        regions = self.store[r.image_id]
        boxes = box_features(box_convert(regions["boxes"], "xyxy", "xywh"), regions["image_w"], regions["image_h"])
        probs = regions["cls_prob"]                                             # (K, C), C = 0 without classes
        labels = probs.argmax(-1) if probs.shape[1] else torch.zeros(len(probs), dtype=torch.long)
        caption = r.captions[int(torch.randint(len(r.captions), (1,), generator=gen))]
        return {"text": caption, "feats": regions["features"], "boxes": boxes, "labels": labels,
                "probs": probs if probs.shape[1] else None, "group": self.group_ids[index], "epoch": epoch}

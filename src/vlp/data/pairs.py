"""Training pairs: records grouped into samples, images cached in RAM, resumable deterministic batches.

A *group* is the unit of sampling: records that show the same thing (the two drawing styles of one
emoji, via `group_key="hex"`) or, by default, one record. A sample draws two image views and two
caption views from its group, so the multi-view objectives get their pairs without extra passes.
All randomness is a function of (seed, epoch, index): a run resumed at step N sees exactly the
batches an uninterrupted run would.
"""
from __future__ import annotations

import zlib

import torch
from torch import Tensor
from torch.utils.data import Dataset
from tqdm import tqdm

from vlp.data.formats import BadImageError, Record, SkipReport, load_image
from vlp.data.transforms import random_resized_crop, to_uint8


def decode_images(records: list[Record], size: int, report: SkipReport, progress: bool = True
                  ) -> tuple[list[Record], Tensor]:
    """Decode every image once -> (kept records, (N, 3, size, size) uint8). Unreadable images are skipped and counted."""
    kept, images = [], []
    for r in tqdm(records, desc="decode images", disable=not progress, leave=False):
        try:
            images.append(to_uint8(load_image(r), size))
            kept.append(r)
        except BadImageError as e:
            report.add("unreadable image", str(e))
    if not images:
        raise ValueError(f"no readable images among {len(records)} records")
    return kept, torch.stack(images)


class PairDataset(Dataset):
    """Samples by group. __getitem__((index, epoch)) -> dict with image, image2, text, text2, tags, group."""

    def __init__(self, records: list[Record], image_size: int, group_key: str = "", augment: str = "crop",
                 crop_scale: float = 0.8, seed: int = 0, report: SkipReport | None = None, progress: bool = True):
        self.report = report if report is not None else SkipReport()
        self.records, self.images = decode_images(records, image_size, self.report, progress)
        keys = [r.meta.get(group_key, r.image_id) if group_key else r.image_id for r in self.records]
        index: dict[str, list[int]] = {}
        for i, k in enumerate(keys):
            index.setdefault(str(k), []).append(i)
        self.groups = list(index.values())
        self.augment, self.crop_scale, self.seed = augment, crop_scale, seed

    def __len__(self) -> int:
        return len(self.groups)

    def clusters(self, key: str) -> list[int]:
        """A cluster id per group from the record field `key` (e.g. "base": the skin-tone variants of
        one emoji), for `ResumableBatches(clusters=...)`. Groups without the field are clusters of one."""
        ids: dict[str, int] = {}
        out = []
        for g, members in enumerate(self.groups):
            value = self.records[members[0]].meta.get(key)
            out.append(ids.setdefault(str(value) if value is not None else f"\0{g}", len(ids)))
        return out

    def _view(self, i: int, gen: torch.Generator) -> Tensor:
        img = self.images[i]
        return random_resized_crop(img, self.crop_scale, gen) if self.augment == "crop" else img

    def __getitem__(self, key: tuple[int, int]) -> dict:
        g, epoch = key
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch * 100_003 + g)
        members = self.groups[g]
        order = torch.randperm(len(members), generator=gen).tolist()
        first, second = members[order[0]], members[order[-1]]        # the same record when the group has one
        caps = [(c, lang) for i in members for c, lang in zip(self.records[i].captions, self.records[i].langs)]
        caps = list(dict.fromkeys(caps))
        c1 = caps[int(torch.randint(len(caps), (1,), generator=gen))]
        others = [c for c in caps if c[1] != c1[1]] or [c for c in caps if c != c1] or [c1]
        c2 = others[int(torch.randint(len(others), (1,), generator=gen))]
        tags = " ; ".join(self.records[first].tags)
        return {"image": self._view(first, gen), "image2": self._view(second, gen), "text": c1[0], "text2": c2[0],
                "tags": tags, "tag_group": zlib.crc32(tags.encode()), "group": g, "index": first, "index2": second}


class ResumableBatches:
    """Index batches for the local rank, starting at micro-step `start`, forever.

    The global batch (`batch_size`) is a slice of a per-epoch permutation seeded by (seed, epoch);
    rank r takes rows [r*b, (r+1)*b) of it with b = batch_size / world. The tail of each epoch is
    dropped so every rank's batch has the same size. With `clusters` (an id per sample) the
    permutation shuffles whole clusters and keeps each cluster's samples next to each other, so
    similar samples (the skin-tone variants of one emoji) land in one batch as hard negatives;
    `cluster_size` k > 0 keeps at most k of a cluster together (random chunks), so a batch still
    holds many distinct clusters.
    """

    def __init__(self, n: int, batch_size: int, seed: int, start: int = 0, rank: int = 0, world: int = 1,
                 clusters: list[int] | None = None, cluster_size: int = 0):
        if batch_size % world:
            raise ValueError(f"train.batch_size={batch_size} must be divisible by the number of processes ({world})")
        if n < batch_size:
            raise ValueError(f"the dataset has {n} samples, fewer than train.batch_size={batch_size}")
        self.n, self.bs, self.seed, self.start, self.rank, self.world = n, batch_size, seed, start, rank, world
        self.per_epoch = n // batch_size
        self.clusters = torch.as_tensor(clusters) if clusters is not None else None
        if cluster_size < 0:
            raise ValueError(f"cluster_size must be >= 0 (0 = whole clusters), got {cluster_size}")
        self.cluster_size = cluster_size
        if self.clusters is not None and len(self.clusters) != n:
            raise ValueError(f"clusters has {len(self.clusters)} ids for {n} samples")

    def permutation(self, epoch: int) -> Tensor:
        """(n,) sample order of one epoch."""
        gen = torch.Generator().manual_seed(self.seed + 7919 * epoch)
        perm = torch.randperm(self.n, generator=gen)
        if self.clusters is None:
            return perm
        clusters = self.clusters
        shuffled_in = torch.empty(self.n, dtype=torch.long)
        shuffled_in[perm] = torch.arange(self.n)                                # (n,) random tie-break
        if self.cluster_size:       # cut each cluster, in random order, into chunks of at most cluster_size
            order = torch.argsort(clusters * self.n + shuffled_in)              # cluster by cluster
            sorted_ids = clusters[order]
            pos = torch.arange(self.n) - torch.searchsorted(sorted_ids, sorted_ids)   # place within its cluster
            chunk = torch.empty(self.n, dtype=torch.long)
            chunk[order] = sorted_ids * self.n + pos // self.cluster_size
            clusters = torch.unique(chunk, return_inverse=True)[1]
        c = int(clusters.max()) + 1
        cluster_rank = torch.randperm(c, generator=gen)[clusters]               # (n,) shuffled cluster order
        return torch.argsort(cluster_rank * self.n + shuffled_in)

    def __iter__(self):
        step, perm, perm_epoch = self.start, None, -1
        local = self.bs // self.world
        while True:
            epoch, k = divmod(step, self.per_epoch)
            if epoch != perm_epoch:
                perm, perm_epoch = self.permutation(epoch), epoch
            rows = perm[k * self.bs + self.rank * local: k * self.bs + (self.rank + 1) * local]
            yield [(int(i), epoch) for i in rows]
            step += 1

"""ERNIE-ViL 2.0's dual encoder (Shan et al. 2022, Sec. 3.1): two towers, L2-normalised embeddings.

The text tower is our BERT (`TextEncoder`), mean-pooled over real tokens (as the MiniLM checkpoint was
trained) and projected; the image tower is a ViT (`PatchEncoder`, [CLS] token) or a torchvision CNN
trunk (mean over the feature map), projected. Retrieval is a dot product of the two embeddings, so a
collection is embedded once and searched with an index.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vlp.encoders.joint import JointTrunk
from vlp.layers import Tokens, length_groups


class DualOutput(NamedTuple):
    image: Tensor | None            # (B, D) L2-normalised, first image view
    text: Tensor | None             # (B, D) first caption view
    image2: Tensor | None = None    # second image view (other style / augmentation)
    text2: Tensor | None = None     # second caption view (other language / caption)
    tags: Tensor | None = None      # tag sequence as a textual view
    logit_scale: Tensor | None = None


def mean_pool(t: Tokens) -> Tensor:
    m = t.mask.unsqueeze(-1).to(t.x.dtype)                          # (B, N, 1)
    return (t.x * m).sum(1) / m.sum(1).clamp_min(1.0)               # (B, D)


class DualEncoder(nn.Module):
    def __init__(self, text: nn.Module, image: nn.Module, embed_dim: int, image_pool: str = "mean",
                 logit_scale_init: float = math.log(1 / 0.07), logit_scale_max: float = 100.0,
                 text_head: str = "linear"):
        super().__init__()
        self.text, self.image = text, image
        self.image_pool = image_pool                                 # "cls" (ViT) | "mean" (CNN)
        if text_head not in ("linear", "mlp"):
            raise ValueError(f"unknown text_head {text_head!r}; valid: linear, mlp")
        self.text_proj = (nn.Linear(text.width, embed_dim, bias=False) if text_head == "linear" else
                          nn.Sequential(nn.Linear(text.width, text.width), nn.GELU(),
                                        nn.Linear(text.width, embed_dim, bias=False)))
        self.image_norm = nn.LayerNorm(image.width)
        self.image_proj = nn.Linear(image.width, embed_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(float(logit_scale_init)))
        self.max_log_scale = math.log(logit_scale_max)
        self._text_cache: dict[bytes, Tensor] = {}     # token ids -> pooled features of a locked tower (`cache_text`)

    def train(self, mode: bool = True) -> "DualEncoder":
        """A locked text tower stays in inference mode (no dropout), as in LiT: its output for a
        caption is then a fixed function of the tokens, whatever the training mode."""
        super().train(mode)
        if self.text.freezing.locked:
            self.text.eval()
        return self

    def cache_text(self, ids: Tensor, mask: Tensor, chunk: int = 256, limit: int = 500_000) -> int:
        """Precompute the pooled features of captions a locked tower cannot change (those made only
        of the checkpoint's own tokens), as LiT does; training then looks them up instead of running
        the tower. ids, mask: (N, L) as the collator makes them. Returns how many were cached.

        Each caption is computed once, in fixed chunks of similar length (each trimmed to its longest),
        so an interrupted and resumed run sees the same features as an uninterrupted one. Call it under
        the training's autocast. At most `limit` captions are cached (about 0.4 GB in bfloat16 at width 384); the rest run the tower.
        """
        if not self.text.freezing.locked:
            return 0
        self.text.eval()                                  # a locked tower never drops out (see `train`)
        frozen = torch.nonzero(~self._live(ids) & mask.any(1)).squeeze(1)[:limit]
        lengths, host = mask.sum(1).tolist(), ids.cpu()
        frozen = frozen[torch.argsort(mask[frozen].sum(1).cpu(), stable=True)]    # chunks of similar length: less padding
        cache = {}
        with torch.no_grad():
            for sel in frozen.split(chunk):
                n = max(lengths[i] for i in sel.tolist())
                pooled = mean_pool(self.text(ids[sel, :n], mask[sel, :n]))            # (c, W)
                for i, row in zip(sel.tolist(), pooled):
                    cache[host[i, :lengths[i]].numpy().tobytes()] = row
        self._text_cache = cache
        return len(cache)

    def _live(self, ids: Tensor) -> Tensor:
        """(B,) bool: captions whose features a locked tower's training can change (they hold trainable
        new vocabulary rows). None of them when the new rows are frozen too."""
        if self.text.freezing.new_rows_only:
            return (ids >= self.text.freezing.pretrained_vocab).any(1)
        return torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)

    def encode_text(self, ids: Tensor, mask: Tensor) -> Tensor:
        """ids, mask: (B, L) -> (B, D) unit vectors."""
        return F.normalize(self.text_proj(self._pooled_text(ids, mask)), dim=-1)

    def _pooled_text(self, ids: Tensor, mask: Tensor) -> Tensor:
        """ids, mask: (B, L) -> (B, W) mean-pooled text features.

        A locked tower whose only trainable weights are new vocabulary rows (`freeze_text`) cannot
        change the output for a caption made of the checkpoint's own tokens: such captions (e.g. the
        English ones) are looked up in the `cache_text` features or, when missing, run without
        autograd (about a third of the cost); only the others backpropagate.
        """
        if not (torch.is_grad_enabled() and self.text.freezing.locked):
            return mean_pool(self.text(ids, mask))
        live = self._live(ids)                                                 # (B,)
        if not live.any() and self.text.embeddings.word.weight.requires_grad:
            return mean_pool(self.text(ids, mask))   # keep the trainable rows in the graph (DDP expects their grad)
        lengths, host, cache = mask.sum(1).tolist(), ids.cpu(), self._text_cache
        cached = [None if live[i] else cache.get(host[i, :n].numpy().tobytes()) for i, n in enumerate(lengths)]
        hit = torch.tensor([c is not None for c in cached], dtype=torch.bool)
        rows = [torch.nonzero(hit).squeeze(1), torch.nonzero(~live & ~hit).squeeze(1), torch.nonzero(live).squeeze(1)]
        parts = [torch.stack([cached[i] for i in rows[0].tolist()]) if len(rows[0])
                 else ids.new_zeros(0, self.text.width, dtype=torch.float)]
        for sel, grad in zip(rows[1:], (False, True)):
            with torch.set_grad_enabled(grad):
                parts.append(self._run_by_length(ids, mask, sel) if len(sel)
                             else ids.new_zeros(0, self.text.width, dtype=torch.float))
        out = torch.cat([p.to(parts[-1].dtype) for p in parts])                # (B, W), rows in `rows` order
        return out[torch.argsort(torch.cat(rows))]

    def _run_by_length(self, ids: Tensor, mask: Tensor, sel: Tensor, buckets: int = 4, min_rows: int = 16) -> Tensor:
        """Mean-pooled features of rows `sel` (n,) -> (n, W), in that order. The rows run in up to
        `buckets` groups of similar length, each trimmed to its own longest row: a locked tower in
        inference mode treats rows independently, and the emoji's Chinese names (8.5 tokens on average,
        batches padded to 19) then cost about half the padded products."""
        lengths = mask[sel].sum(1)                                             # (n,)
        chunks, back = length_groups(lengths, buckets, min_rows)
        pooled = []
        for chunk in chunks:
            rows, n = sel[chunk], int(lengths[chunk].max())
            pooled.append(mean_pool(self.text(ids[rows, :n], mask[rows, :n])))   # (c, W)
        return torch.cat(pooled)[back]                                         # back to the order of `sel`

    def encode_image(self, images: Tensor, index: Tensor | None = None) -> Tensor:
        """images: (B, 3, H, W) normalised floats -> (B, D) unit vectors. index (B,): the training images' rows,
        for a tower with precomputed locked features (`JointTrunk`)."""
        t = self.image(images) if index is None else self.image(images, index)
        pooled = t.x[:, 0] if self.image_pool == "cls" else mean_pool(t)    # (B, C)
        return F.normalize(self.image_proj(self.image_norm(pooled)), dim=-1)

    def scale(self) -> Tensor:
        return self.logit_scale.clamp(max=self.max_log_scale).exp()

    def forward(self, batch) -> DualOutput:
        """Encode every view the batch carries; both image views go through the tower in one pass."""
        images = batch.images if batch.images2 is None else torch.cat([batch.images, batch.images2])
        index = None                                                 # rows of a precomputed locked-feature cache
        if isinstance(self.image, JointTrunk) and self.image.cache is not None and batch.image_index is not None:
            index = batch.image_index if batch.images2 is None else torch.cat([batch.image_index, batch.image2_index])
        img = self.encode_image(images, index)                       # (B or 2B, D)
        img1, img2 = (img, None) if batch.images2 is None else img.chunk(2)
        texts = [(batch.text_ids, batch.text_mask)]
        for ids, mask in ((batch.text2_ids, batch.text2_mask), (batch.tag_ids, batch.tag_mask)):
            if ids is not None:
                texts.append((ids, mask))
        txt = self._encode_texts(texts)
        it = iter(txt)
        t1 = next(it)
        t2 = next(it) if batch.text2_ids is not None else None
        tags = next(it) if batch.tag_ids is not None else None
        return DualOutput(img1, t1, img2, t2, tags, self.scale())

    def _encode_texts(self, texts: list[tuple[Tensor, Tensor]]) -> list[Tensor]:
        """Several (B, L_i) text views in one tower pass: pad to a common length, split back."""
        L = max(ids.shape[1] for ids, _ in texts)
        ids = torch.cat([F.pad(i, (0, L - i.shape[1])) for i, _ in texts])      # (V*B, L)
        mask = torch.cat([F.pad(m, (0, L - m.shape[1])) for _, m in texts])     # (V*B, L)
        emb = self.encode_text(ids, mask)                                        # (V*B, D)
        return list(emb.split([i.shape[0] for i, _ in texts]))

"""InterBERT's hybrid model (Lin et al. 2020, the model): single-stream interaction, then two-stream extraction.

    [global; regions] + [CLS] text [SEP]
        -> shared layers over both (the interaction module: every token attends to both modalities)
        -> text part: text-only layers      image part: image-only layers   (the extraction module)

Image embedding: LayerNorm(Linear(feature) + Linear(box5)) (+ BERT's segment 1 and one shared
position, as ImageBERT's `RegionEmbedder`: regions have no order), with a global token first whose
feature is the mean of the image's real regions and whose box is the whole image. The mean is taken
over the features the model is given, i.e. after MRM zeroed the masked ones: a mean over the
originals would hand back a masked region (K x mean - the others). Text: BERT's embeddings, segment 0.

Layers. The text tower is one BERT (e.g. the packaged 6-layer MiniLM). Its bottom `N - extract_layers`
blocks are the shared layers and its top `extract_layers` blocks the text-only layers, so the text
stream is exactly the checkpoint's BERT and a caption alone runs through it as BERT would (`encode_text`).
The paper splits a 12-layer BERT-base this way (6 shared, 6 text-only); for MiniLM the default is
4 shared + 2 text-only (`model.extract_layers = 2`). The image-only layers start as copies of the same top
blocks rather than fresh: their input is the shared layers' output, which lives in BERT's space, and a
pretrained post-LN block maps it sensibly from step 1, where a random one would first scramble the image
stream that ITM and MRM read (a fresh stack would also need its own warm-up on our short budgets).
They are not text parameters: they train at the full lr, not `text_lr_scale`. `extract_layers = 0`
shares every layer (the paper's ablation "without the extraction module": a single-stream model whose
pooled image is the global token's state); `extract_layers = N` shares none (two towers joined only by ITM).

Heads, applied only where a loss needs them:
- MSM / MLM: BERT's prediction transform and the decoder tied to the word embeddings, at the labelled
  masked tokens of the text stream (the masking decides MSM vs token MLM; the head is the same).
- MRM: a transform and the detector's classes, at the masked regions of the image stream.
- ITM: element-wise product of the pooled text (the text stream's [CLS]) and the pooled image (the
  image stream's global token) -> dropout -> linear -> one logit. The paper's linear(2) with a
  softmax over {match, no match} is the same family of functions: softmax(z)[1] = sigmoid(z1 - z0),
  so one logit with binary cross-entropy (ImageBERT's ITM objective, reused) loses nothing and lets the
  retrieval losses and `eval/rerank.py` read `itm_logit` as they do for ImageBERT.

Single-modal use (the point of the extraction module): `encode_text` runs a caption alone through the
shared and text-only layers, `encode_image` regions alone through the shared and image-only layers; each
returns the pooled vector L2-normalised, the dual-encoder embeddings. Nothing in MSM, MRM or ITM aligns
these two spaces: they are what the pretrained streams give, reported beside ITM (`vlp evaluate`).

    model = InterBERT(load_bert("minilm dir"), feature_dim=512, n_classes=64, extract_layers=2)
    out = model(batch)                               # Batch with text_ids/mask, region_feats/boxes/mask
    t, v = model.encode_text(ids, mask), model.encode_image(feats, boxes, region_mask)   # (B, D) unit vectors
"""
from __future__ import annotations

import copy
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vlp.data.masking import IGNORE
from vlp.encoders.regions import RegionEmbedder
from vlp.layers import check_mask, init_weights, length_groups

WHOLE_IMAGE = (0.0, 0.0, 1.0, 1.0, 1.0)     # the global token's 5-d location: x1/W, y1/H, x2/W, y2/H, area


class HybridOutput(NamedTuple):
    text_cls: Tensor                     # (B, D) pooled text: the text stream's [CLS]
    image_cls: Tensor                    # (B, D) pooled image: the image stream's global token
    itm_logit: Tensor                    # (B,) matched-pair logit
    mlm_logits: Tensor | None = None     # (M, V) at the labelled masked tokens, row-major
    mrm_logits: Tensor | None = None     # (K, C) at the target regions, row-major


def _transform(width: int) -> nn.Sequential:
    """BERT's prediction-head transform: dense -> GELU -> LayerNorm."""
    return nn.Sequential(nn.Linear(width, width), nn.GELU(), nn.LayerNorm(width, eps=1e-12))


class InterBERT(nn.Module):
    def __init__(self, text: nn.Module, feature_dim: int, n_classes: int, extract_layers: int = 2):
        """text: a `TextEncoder` (BERT embeddings + transformer) whose blocks become the shared and text-only layers."""
        super().__init__()
        blocks = text.transformer.blocks
        if not 0 <= extract_layers <= len(blocks):
            raise ValueError(f"model.extract_layers = {extract_layers}: the text tower has {len(blocks)} layers "
                             f"(0 = all shared, {len(blocks)} = none shared)")
        self.text, self.shared = text, len(blocks) - extract_layers
        width, vocab = text.width, text.embeddings.word.num_embeddings
        self.image_blocks = nn.ModuleList(copy.deepcopy(b) for b in blocks[self.shared:])   # image-only layers
        for p in self.image_blocks.parameters():      # trainable even where the text tower's copies are frozen
            p.requires_grad_(True)
        self.regions = RegionEmbedder(feature_dim, text.embeddings)
        self.mlm_transform, self.mlm_bias = _transform(width), nn.Parameter(torch.zeros(vocab))
        self.mrm = nn.Sequential(_transform(width), nn.Linear(width, n_classes))
        self.itm_drop, self.itm = nn.Dropout(text.cfg.transformer.dropout), nn.Linear(width, 1)
        for head in (self.mlm_transform, self.mrm, self.itm):
            head.apply(init_weights)

    @property
    def shared_blocks(self) -> nn.ModuleList:
        return self.text.transformer.blocks[:self.shared]

    @property
    def text_blocks(self) -> nn.ModuleList:
        return self.text.transformer.blocks[self.shared:]

    def embed_image(self, feats: Tensor, boxes: Tensor, region_mask: Tensor) -> tuple[Tensor, Tensor]:
        """feats (B, R, F), boxes (B, R, 5), region_mask (B, R) -> image tokens (B, 1+R, D) with the global
        token first, and their mask (B, 1+R) (the global token is always real)."""
        m = region_mask[..., None].to(feats.dtype)                                   # (B, R, 1)
        mean = (feats * m).sum(1) / m.sum(1).clamp_min(1.0)                          # (B, F) mean of real regions
        whole = boxes.new_tensor(WHOLE_IMAGE).expand(len(boxes), 1, 5)               # (B, 1, 5)
        mask = torch.cat([region_mask.new_ones(len(region_mask), 1), region_mask], 1)    # (B, 1+R)
        x = self.regions(torch.cat([mean[:, None], feats], 1), torch.cat([whole, boxes], 1), mask).x
        return x, mask

    @staticmethod
    def _run(blocks, x: Tensor, mask: Tensor) -> Tensor:
        for block in blocks:
            x = block(x, mask)
        return x

    def encode(self, ids: Tensor, mask: Tensor, feats: Tensor, boxes: Tensor, region_mask: Tensor,
               buckets: int = 4, min_rows: int = 16) -> tuple[Tensor, Tensor]:
        """ids, mask (B, L); feats (B, R, F), boxes (B, R, 5), region_mask (B, R) -> text states (B, L, D)
        after the text-only layers (zero at padding) and image states (B, 1+R, D) after the image-only
        layers, the global token first. Rows run in groups of similar caption length, each trimmed to its
        longest caption, as ImageBERT's `encode` (equal to one padded pass at real tokens)."""
        t = self.text.embeddings(ids)                                                # (B, L, D), segment 0
        v, vmask = self.embed_image(feats, boxes, region_mask)                       # (B, 1+R, D), segment 1
        lengths, (L, R1) = mask.sum(1), (ids.shape[1], v.shape[1])
        groups, back = length_groups(lengths, buckets, min_rows)
        texts, images = [], []
        for rows in groups:
            n = int(lengths[rows].max())
            x, xm = torch.cat([v[rows], t[rows, :n]], 1), torch.cat([vmask[rows], mask[rows, :n]], 1)  # (b, 1+R+n, D)
            check_mask(x, xm)
            x = self._run(self.shared_blocks, x, xm)                                 # interaction
            img = self._run(self.image_blocks, x[:, :R1], vmask[rows])               # extraction: (b, 1+R, D)
            txt = self._run(self.text_blocks, x[:, R1:], mask[rows, :n])             # (b, n, D)
            texts.append(F.pad(txt * mask[rows, :n, None], (0, 0, 0, L - n)))        # (b, L, D)
            images.append(img)
        return torch.cat(texts)[back], torch.cat(images)[back]                      # rows back in batch order

    def _itm(self, text_cls: Tensor, image_cls: Tensor) -> Tensor:
        return self.itm(self.itm_drop(text_cls * image_cls)).squeeze(-1)            # (B,)

    def forward(self, batch) -> HybridOutput:
        text, image = self.encode(batch.text_ids, batch.text_mask, batch.region_feats, batch.region_boxes,
                                  batch.region_mask)
        out = {"text_cls": text[:, 0], "image_cls": image[:, 0], "itm_logit": self._itm(text[:, 0], image[:, 0])}
        if batch.mlm_labels is not None:
            h = self.mlm_transform(text[batch.mlm_labels != IGNORE])                # (M, D)
            out["mlm_logits"] = F.linear(h, self.text.embeddings.word.weight, self.mlm_bias)   # (M, V)
        if batch.region_targets is not None:
            out["mrm_logits"] = self.mrm(image[:, 1:][batch.region_targets])        # (K, C), the global token left out
        return HybridOutput(**out)

    def match_scores(self, ids: Tensor, mask: Tensor, feats: Tensor, boxes: Tensor, region_mask: Tensor,
                     bf16: bool = False) -> Tensor:
        """ITM logits (B,) of unmasked (text, regions) pairs: the cross-encoder's retrieval score
        (`eval/rerank.py`). bf16: the layers under bf16 autocast, the ITM head in float32."""
        with torch.autocast(ids.device.type, dtype=torch.bfloat16, enabled=bf16):
            text, image = self.encode(ids, mask, feats, boxes, region_mask)
        return self._itm(text[:, 0].float(), image[:, 0].float())

    def encode_text(self, ids: Tensor, mask: Tensor, normalize: bool = True) -> Tensor:
        """A caption alone through the shared and text-only layers (= the text tower, BERT): ids, mask (B, L)
        -> pooled [CLS] (B, D), L2-normalised unless `normalize` is False."""
        x = self.text(ids, mask).x[:, 0]                                             # (B, D)
        return F.normalize(x, dim=-1) if normalize else x

    def encode_image(self, feats: Tensor, boxes: Tensor, region_mask: Tensor, normalize: bool = True) -> Tensor:
        """Regions alone through the shared and image-only layers: feats (B, R, F), boxes (B, R, 5), region_mask
        (B, R) -> pooled global token (B, D), L2-normalised unless `normalize` is False."""
        v, vmask = self.embed_image(feats, boxes, region_mask)                       # (B, 1+R, D)
        x = self._run(self.image_blocks, self._run(self.shared_blocks, v, vmask), vmask)[:, 0]
        return F.normalize(x, dim=-1) if normalize else x

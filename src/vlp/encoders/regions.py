"""Detector regions as transformer tokens (ImageBERT, Qi et al. 2020, "Embedding modeling": image embedding).

A region (RoI) is a feature vector, a box and the detector's class distribution. Its embedding is
LayerNorm(object + location + segment + position): the feature and the 5-d location
(x1/W, y1/H, x2/W, y2/H, box area / image area) are each projected to the hidden size, and every
region gets the same segment id and one shared sequence position, since regions have no order.
The segment and position tables are the text embeddings' own (BERT's), so both streams live in one space.

    embed = RegionEmbedder(feature_dim=512, text_embeddings=bert.embeddings)
    tokens = embed(feats, boxes, mask)     # (B, R, 512), (B, R, 5), (B, R) -> Tokens x (B, R, D)
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from vlp.layers import BertEmbeddings, Tokens, init_weights


def box_features(boxes: Tensor, width: float | Tensor, height: float | Tensor) -> Tensor:
    """boxes (..., 4) as x, y, w, h in pixels -> the 5-d location (..., 5): x1/W, y1/H, x2/W, y2/H, area."""
    x, y, w, h = boxes.unbind(-1)
    return torch.stack([x / width, y / height, (x + w) / width, (y + h) / height, w * h / (width * height)], -1)


class RegionEmbedder(nn.Module):
    def __init__(self, feature_dim: int, text_embeddings: BertEmbeddings, segment: int = 1, position: int = 0):
        super().__init__()
        width = text_embeddings.word.embedding_dim
        self.object = nn.Linear(feature_dim, width)
        self.location = nn.Linear(5, width)
        self.norm = nn.LayerNorm(width, eps=text_embeddings.norm.eps)
        self.drop = nn.Dropout(text_embeddings.drop.p)
        self.apply(init_weights)
        self.text_embeddings = [text_embeddings]    # a list: the tables belong to (and are saved by) the text side
        self.segment, self.position = segment, position

    def forward(self, feats: Tensor, boxes: Tensor, mask: Tensor) -> Tokens:
        """feats (B, R, F), boxes (B, R, 5) locations from `box_features`, mask (B, R) bool -> Tokens (B, R, D)."""
        emb = self.text_embeddings[0]
        shared = emb.token_type.weight[self.segment] + emb.position.weight[self.position]      # (D,)
        x = self.object(feats) + self.location(boxes) + shared                                 # (B, R, D)
        return Tokens(self.drop(self.norm(x)), mask)

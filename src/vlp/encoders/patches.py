"""A ViT image encoder on the shared transformer (pre-LN): patches -> tokens, token 0 = [CLS].

    enc = PatchEncoder(image_size=64, patch_size=8, width=256, layers=4, heads=4)
    out = enc(images)        # images (B, 3, 64, 64) normalised float -> Tokens x (B, 1 + 64, 256)
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from vlp.layers import Tokens, Transformer, TransformerConfig


class PatchEncoder(nn.Module):
    """Conv patch embedding + learned [CLS] and positions + pre-LN transformer + final LayerNorm."""

    def __init__(self, image_size: int, patch_size: int, width: int, layers: int, heads: int,
                 dropout: float = 0.0):
        super().__init__()
        if image_size % patch_size:
            raise ValueError(f"PatchEncoder: image_size {image_size} is not a multiple of patch_size {patch_size}")
        self.image_size, self.patch_size = image_size, patch_size
        n_patches = (image_size // patch_size) ** 2
        self.patch = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size)
        self.cls = nn.Parameter(torch.zeros(1, 1, width))
        self.pos = nn.Parameter(torch.zeros(1, 1 + n_patches, width))
        nn.init.normal_(self.cls, std=0.02)
        nn.init.normal_(self.pos, std=0.02)
        self.drop = nn.Dropout(dropout)
        cfg = TransformerConfig(width=width, layers=layers, heads=heads, mlp_ratio=4.0, dropout=dropout,
                                attn_dropout=dropout, eps=1e-6, pre_ln=True, act="gelu")
        self.transformer = Transformer(cfg)
        self.norm = nn.LayerNorm(width, eps=1e-6)

    @property
    def width(self) -> int:
        return self.norm.normalized_shape[0]

    def forward(self, images: Tensor) -> Tokens:
        """images (B, 3, H, W) with H = W = image_size -> Tokens x (B, 1 + N, D), N = (H / patch)^2."""
        if images.ndim != 4 or images.shape[1] != 3 or images.shape[2:] != (self.image_size, self.image_size):
            raise ValueError(f"PatchEncoder expects images (B, 3, {self.image_size}, {self.image_size}), "
                             f"got {tuple(images.shape)}")
        x = self.patch(images)                          # (B, D, H/p, W/p)
        x = x.flatten(2).transpose(1, 2)                # (B, D, N) -> (B, N, D)
        cls = self.cls.expand(x.shape[0], -1, -1)       # (1, 1, D) -> (B, 1, D)
        x = self.drop(torch.cat([cls, x], dim=1) + self.pos)   # (B, 1 + N, D)
        x = self.norm(self.transformer(x))
        mask = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)   # (B, 1 + N)
        return Tokens(x, mask)

"""A trained image trunk beside a locked pretrained one (LiT's locked tower, joined with a tower of our own).

    joint = JointTrunk(TorchvisionTrunk("resnet18"), TimmTrunk("tf_efficientnet_lite0", "imagenet", frozen_stages=-1),
                       locked_size=128)
    out = joint(images)       # images (B, 3, 64, 64) -> Tokens x (B, 1, 512 + 1280)

The trained trunk learns what the data needs (on emoji: drawing details, skin tones) from scratch; the
locked one brings ImageNet's features, which no step here could learn. Each is mean-pooled over its own
feature map and the two vectors are concatenated into one token. The locked trunk sees the images resized
to `locked_size` (ImageNet networks see objects at their training scale) and always runs in inference
mode without autograd. `precompute(images)` goes one step further, as LiT does for its locked tower:
the locked features of every training image, once, looked up by image index during training (the
trained trunk still sees the augmented crops; the locked one sees each image whole).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vlp.layers import Tokens


class JointTrunk(nn.Module):
    def __init__(self, trained: nn.Module, locked: nn.Module, locked_size: int = 0):
        super().__init__()
        self.trained, self.locked, self.locked_size = trained, locked, locked_size
        for p in self.locked.parameters():
            p.requires_grad_(False)
        self.width = trained.width + locked.width
        self.cache: Tensor | None = None            # (N, C_locked) locked features of the training images, by index

    def train(self, mode: bool = True) -> "JointTrunk":
        super().train(mode)
        self.locked.eval()                                 # BatchNorm statistics and dropout stay as loaded
        return self

    @torch.no_grad()
    def locked_features(self, images: Tensor) -> Tensor:
        """images (B, 3, H, W) normalised -> (B, C_locked) the locked trunk's pooled features."""
        size = self.locked_size or images.shape[-1]
        x = images if size == images.shape[-1] else F.interpolate(images, size=(size, size), mode="bilinear",
                                                                   align_corners=False)
        return self.locked(x).x.mean(1)

    def precompute(self, images: Tensor, normalize, chunk: int = 256) -> int:
        """images (N, 3, H, W) uint8, the training set by index; normalize: uint8 -> model input. Call under
        the training's autocast. -> N."""
        self.cache = torch.cat([self.locked_features(normalize(images[a:a + chunk]).to(self.cache_device()))
                                for a in range(0, len(images), chunk)])
        return len(self.cache)

    def cache_device(self) -> torch.device:
        return next(self.trained.parameters()).device

    def forward(self, images: Tensor, index: Tensor | None = None) -> Tokens:
        """images (B, 3, H, W) -> Tokens x (B, 1, C_trained + C_locked), mask all True. index (B,): the images'
        rows in the `precompute` cache (training), whose locked features are then looked up."""
        a = self.trained(images).x.mean(1)                                     # (B, C_trained)
        b = self.cache[index] if index is not None and self.cache is not None else self.locked_features(images)
        joint = torch.cat([a, b.to(a.dtype)], dim=-1)[:, None]                 # (B, 1, C_trained + C_locked)
        return Tokens(joint, torch.ones(joint.shape[:2], dtype=torch.bool, device=joint.device))

"""Image preprocessing and views. Images live as uint8 (3, S, S) tensors; the model sees normalised floats.

There are no flips and no colour jitter on purpose: on the emoji set left/right carries meaning
("left arrow") and hue carries the skin tone, which is exactly what the model must tell apart.
"""
from __future__ import annotations

import math

import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image
from torch import Tensor

MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)   # ImageNet statistics: torchvision trunks expect them
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


def to_uint8(img: Image.Image, size: int) -> Tensor:
    """PIL RGB -> (3, size, size) uint8: resize the shorter side to `size`, centre crop."""
    t = TF.pil_to_tensor(img.convert("RGB"))                                   # (3, H, W)
    t = TF.resize(t, size, antialias=True)
    return TF.center_crop(t, [size, size])


def normalize(images: Tensor) -> Tensor:
    """(B, 3, H, W) uint8 -> float, ImageNet-normalised."""
    return (images.float() / 255.0 - MEAN) / STD


def random_resized_crop(img: Tensor, min_scale: float, gen: torch.Generator,
                        ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> Tensor:
    """(3, S, S) uint8 -> (3, S, S): a crop of area fraction in [min_scale, 1], resized back. Pure in `gen`."""
    _, h, w = img.shape
    r = torch.rand(3, generator=gen).tolist()
    area = h * w * (min_scale + (1 - min_scale) * r[0])
    aspect = math.exp(math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * r[1])
    ch = min(h, round(math.sqrt(area / aspect)))
    cw = min(w, round(math.sqrt(area * aspect)))
    top = int((h - ch) * r[2])
    left = int((w - cw) * torch.rand(1, generator=gen).item())
    return TF.resized_crop(img, top, left, ch, cw, [h, w], antialias=True)

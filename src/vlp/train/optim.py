"""AdamW with parameter groups, and warmup + cosine decay."""
from __future__ import annotations

import math

import torch
from torch import nn


def no_decay(name: str, p: nn.Parameter) -> bool:
    """Norms, biases, embeddings and scalars carry no weight decay."""
    return p.ndim < 2 or "norm" in name.lower() or "embed" in name.lower() or name.endswith("token")


def build_optimizer(model: nn.Module, lr: float, weight_decay: float, text_lr_scale: float = 1.0
                    ) -> torch.optim.Optimizer:
    groups: dict[tuple[bool, bool], list] = {}
    new_rows = {id(p) for p in model.text.new_row_parameters()} if hasattr(model, "text") else set()
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        # pretrained text weights train at text_lr_scale; new vocabulary rows of a frozen tower at the full lr
        pretrained_text = name.startswith("text.") and id(p) not in new_rows
        groups.setdefault((no_decay(name, p), pretrained_text), []).append(p)
    param_groups = [{"params": ps, "weight_decay": 0.0 if nd else weight_decay,
                     "lr": lr * (text_lr_scale if txt else 1.0), "lr_scale": text_lr_scale if txt else 1.0}
                    for (nd, txt), ps in sorted(groups.items())]
    # fused AdamW is ~6x faster than the for-loop version on CPU (measured: docs/results.md)
    return torch.optim.AdamW(param_groups, lr=lr, betas=(0.9, 0.98), eps=1e-6, fused=True)


def lr_lambda(warmup: int, total: int, min_ratio: float = 0.0):
    """Linear warmup for `warmup` steps, then cosine from 1 to `min_ratio` at `total`."""
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        t = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * t))
    return f


def build_scheduler(opt: torch.optim.Optimizer, warmup: int, total: int, min_ratio: float = 0.0):
    return torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(warmup, total, min_ratio))

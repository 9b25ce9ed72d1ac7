"""Image tower throughput: timm EfficientNet-Lite0 (PyTorch and TF padding; with frozen BatchNorm; with
the stem and first 3 of 7 stages frozen) against torchvision ResNet-18.

Each tower alone (`TimmTrunk` / `TorchvisionTrunk`, default stems, random init: weights do not
change the speed), batch 64 of random images, channels-last, 2 threads. For each image size and
precision (float32, bf16 autocast) and each tower: a training step (forward, mean pool, a scalar
loss, backward, fused AdamW step) and inference (eval mode, no_grad). The towers take turns within
every round. GFLOP per image counts one forward (torch.utils.flop_counter: convolutions and matmuls). The machine
is shared and other jobs come and go within seconds: `*_images_per_s` is from the fastest round (the
least disturbed), `*_images_per_s_median` from the median one.

Prints one JSON line per (size, precision); writes results/image_towers.json.

    python benchmarks/image_towers.py [--sizes 64 96 128] [--batch 64] [--rounds 3]
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from vlp.encoders.cnn import TorchvisionTrunk
from vlp.encoders.pretrained import TimmTrunk
from vlp.layers import bf16_is_fast

RESULTS = Path(__file__).parent / "results" / "image_towers.json"
TOWERS = {
    "efficientnet_lite0": lambda: TimmTrunk("efficientnet_lite0"),
    "efficientnet_lite0+freeze_bn": lambda: TimmTrunk("efficientnet_lite0", freeze_bn=True),
    "efficientnet_lite0+frozen_stages=3": lambda: TimmTrunk("efficientnet_lite0", frozen_stages=3),
    "tf_efficientnet_lite0": lambda: TimmTrunk("tf_efficientnet_lite0"),
    "resnet18": lambda: TorchvisionTrunk("resnet18"),
}


def autocast(precision: str):
    return torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()


def train_step(tower: nn.Module, opt: torch.optim.Optimizer, images: torch.Tensor, precision: str) -> float:
    t = time.perf_counter()
    with autocast(precision):
        loss = tower(images).x.float().mean(1).pow(2).mean()
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return time.perf_counter() - t


def infer_step(tower: nn.Module, images: torch.Tensor, precision: str) -> float:
    t = time.perf_counter()
    with torch.no_grad(), autocast(precision):
        tower(images).x.mean(1)
    return time.perf_counter() - t


def gflop_per_image(tower: nn.Module, size: int) -> float:
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        tower(torch.randn(1, 3, size, size))
    return counter.get_total_flops() / 1e9


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", type=int, nargs="+", default=[64, 96, 128])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--precision", nargs="+", default=["fp32", "bf16"])
    args = ap.parse_args()
    torch.set_num_threads(2)
    torch.manual_seed(0)
    towers = {name: build().to(memory_format=torch.channels_last) for name, build in TOWERS.items()}
    opts = {name: torch.optim.AdamW([p for p in t.parameters() if p.requires_grad], lr=1e-4, fused=True)
            for name, t in towers.items()}
    rows = []
    for size in args.sizes:
        images = torch.randn(args.batch, 3, size, size).contiguous(memory_format=torch.channels_last)
        for precision in args.precision:
            times = {(n, kind): [] for n in towers for kind in ("train", "infer")}
            for name, tower in towers.items():                  # warm-up: oneDNN picks its kernels
                tower.train(); train_step(tower, opts[name], images, precision)
                tower.eval(); infer_step(tower, images, precision)
            for r in range(args.rounds):
                order = list(towers) if r % 2 == 0 else list(towers)[::-1]
                for name in order:
                    towers[name].train()
                    times[name, "train"].append(train_step(towers[name], opts[name], images, precision))
                    towers[name].eval()
                    times[name, "infer"].append(infer_step(towers[name], images, precision))
            row = {"benchmark": "image_towers", "size": size, "precision": precision, "batch": args.batch}
            for name, tower in towers.items():
                rate = {f"{kind}_images_per_s": round(args.batch / min(times[name, kind]), 1) for kind in ("train", "infer")}
                rate |= {f"{kind}_images_per_s_median": round(args.batch / statistics.median(times[name, kind]), 1)
                         for kind in ("train", "infer")}
                row[name] = {**rate,
                             "gflop_per_image": round(gflop_per_image(tower.eval(), size), 3),
                             "tokens": (size // 32) ** 2, "width": tower.width}
            row.update(rounds=args.rounds, threads=torch.get_num_threads(), torch=torch.__version__,
                       cpu=platform.processor() or platform.machine(), bf16_native=bf16_is_fast(),
                       load_avg_1min=round(os.getloadavg()[0], 2))
            print(json.dumps(row), flush=True)
            rows.append(row)
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text("".join(json.dumps(r) + "\n" for r in rows))


if __name__ == "__main__":
    main()

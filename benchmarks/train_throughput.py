"""Training throughput: our DualEncoder against OpenCLIP's CLIP at the same size, fp32 and bf16 autocast.

Both models: ViT image tower (64 px, patch 8, width 256, 4 layers, 4 heads) and a 4-layer width-256
text tower over 32 tokens, embedding 256, the same vocabulary size, batch 128, fused AdamW, and the
same loss function (`vlp.objectives.contrastive.symmetric_info_nce`, plain symmetric InfoNCE: every
row its own group). Inputs are random images and random token ids with caption lengths from 6 to 32.
The two models train alternately in one process (warm-up, then `--rounds` rounds; in each round
`--steps` steps of one model then of the other, the order flipping every round). The machine is shared
and its load swings within seconds, so the ratio reported is the median of the per-round ratios (each
from two runs back to back); pairs/s are the medians of each model's rounds.

It also measures this machine's matmul peak (large fp32 and bf16 matrix products, before and after
the timed rounds; the max of the ways and times tried), counts the FLOPs of one training step (`torch.utils.flop_counter.FlopCounterMode`:
matmuls, convolutions, attention; forward and backward) and reports the achieved GFLOP/s as a
fraction of the peak. Peak memory of a training step is measured in a fresh child process per model
and precision: the peak resident set (VmHWM in /proc/self/status, reset through /proc/self/clear_refs)
over two training steps, minus the resident set once the model, its optimizer and the batch exist
(so: activations, gradients and AdamW state). getrusage's max RSS cannot be used: Linux carries it
over from the parent across exec.

Prints one JSON object per precision; writes results/train_throughput.json.

    python benchmarks/train_throughput.py [--steps 10] [--rounds 5] [--batch 128] [--precision fp32 bf16]
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import open_clip
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from vlp.config import ModelConfig
from vlp.layers import bf16_is_fast
from vlp import systems
from vlp.objectives.contrastive import symmetric_info_nce

RESULTS = Path(__file__).parent / "results" / "train_throughput.json"
MODELS = ("ours", "peer")
PRECISIONS = ("fp32", "bf16")
# width, layers, heads of both towers; image size, patch; embedding; context length
SIZE = dict(width=256, layers=4, heads=4, image_size=64, patch_size=8, embed_dim=256, context=32)
VOCAB = 30522          # bert-base-uncased / MiniLM, the vocabulary our text tower starts from


def build(name: str, vocab: int) -> nn.Module:
    """Our DualEncoder (text tower from scratch) or OpenCLIP's CLIP at the same widths and depths."""
    s = SIZE
    if name == "ours":
        cfg = ModelConfig(arch="ernie-vil2", embed_dim=s["embed_dim"], text_init="", text_width=s["width"],
                          text_layers=s["layers"], text_heads=s["heads"], text_max_len=s["context"],
                          image_encoder="vit", image_size=s["image_size"], patch_size=s["patch_size"],
                          vit_width=s["width"], vit_layers=s["layers"], vit_heads=s["heads"])
        return systems.get(cfg.arch).build_model(cfg, vocab)
    vision = open_clip.CLIPVisionCfg(layers=s["layers"], width=s["width"], head_width=s["width"] // s["heads"],
                                     patch_size=s["patch_size"], image_size=s["image_size"])
    text = open_clip.CLIPTextCfg(context_length=s["context"], vocab_size=vocab, width=s["width"],
                                 heads=s["heads"], layers=s["layers"])
    return open_clip.CLIP(s["embed_dim"], vision_cfg=vision, text_cfg=text)


def make_batch(batch: int, vocab: int, seed: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """images (B, 3, H, W); ids (B, L) with 0 = padding and the last real token = vocab - 1 (OpenCLIP
    pools the position of the largest id, its end-of-text token); mask (B, L) bool, True = real."""
    g = torch.Generator().manual_seed(seed)
    L, size = SIZE["context"], SIZE["image_size"]
    images = torch.randn(batch, 3, size, size, generator=g)
    lengths = torch.randint(6, L + 1, (batch,), generator=g)
    mask = torch.arange(L)[None, :] < lengths[:, None]                      # (B, L)
    ids = torch.randint(1, vocab - 1, (batch, L), generator=g) * mask
    ids[torch.arange(batch), lengths - 1] = vocab - 1
    return images, ids, mask


def features(name: str, model: nn.Module, batch: tuple[Tensor, Tensor, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    """-> (image (B, D), text (B, D) unit vectors, logit scale) as each model's own training forward gives."""
    images, ids, mask = batch
    if name == "ours":
        return model.encode_image(images), model.encode_text(ids, mask), model.scale()
    return model(images, ids)


def make_step(name: str, model: nn.Module, batch, precision: str) -> Callable[[], float]:
    """One training step (forward, loss, backward, fused AdamW update) as a closure returning the loss."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1, fused=True)
    groups = torch.arange(batch[0].shape[0])            # every pair its own group: plain InfoNCE
    autocast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if precision == "bf16" else contextlib.nullcontext

    def step() -> float:
        with autocast():
            image, text, scale = features(name, model, batch)
            loss = symmetric_info_nce(image, text, groups, groups, scale)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss.item()
    return step


def _onednn_linear_flops(x_shape, w_shape, *args, out_shape=None, **kwargs) -> int:
    """oneDNN's linear (vlp.layers.linear in float32): x (M, K) @ w (N, K)^T = 2 M N K."""
    return 2 * math.prod(out_shape) * w_shape[-1]


def _sdpa_cpu_flops(q_shape, k_shape, v_shape, *args, out_shape=None, **kwargs) -> int:
    """CPU flash attention, forward: q k^T and p v, 2 N M (Dh + Dv) per batch and head."""
    *bh, n, d = q_shape
    return 2 * math.prod(bh) * n * k_shape[-2] * (d + v_shape[-1])


def _sdpa_cpu_backward_flops(grad_shape, q_shape, k_shape, v_shape, *args, out_shape=None, **kwargs) -> int:
    """Its backward: twice the forward (grads of both products), as FlopCounterMode counts other SDPAs."""
    return 2 * _sdpa_cpu_flops(q_shape, k_shape, v_shape)


FLOP_FORMULAS = {   # ops FlopCounterMode does not know (torch 2.14): oneDNN's linear, CPU flash attention
    torch.ops.mkldnn._linear_pointwise: _onednn_linear_flops,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_cpu_flops,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _sdpa_cpu_backward_flops,
}


def step_flops(name: str, model: nn.Module, batch, precision: str) -> int:
    """FLOPs of one forward + backward (matmuls, convolutions, attention), counted by FlopCounterMode
    with FLOP_FORMULAS added (OpenCLIP's attention and our float32 linear layers run on those ops)."""
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()
    groups = torch.arange(batch[0].shape[0])
    with FlopCounterMode(display=False, custom_mapping=FLOP_FORMULAS) as counter:
        with autocast:
            image, text, scale = features(name, model, batch)
            loss = symmetric_info_nce(image, text, groups, groups, scale)
        loss.backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def matmul_peak(precision: str, n: int = 2048, repeats: int = 5) -> dict[str, float]:
    """GFLOP/s of large square products (best of `repeats`) through torch.mm and F.linear, and for
    fp32 also oneDNN's linear (torch.ops.mkldnn._linear_pointwise), which beats MKL on some CPUs."""
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    ways = {"mm": lambda: torch.mm(a, b), "linear": lambda: F.linear(a, b)}
    if precision == "fp32" and torch.backends.mkldnn.is_available():
        ways["onednn_linear"] = lambda: torch.ops.mkldnn._linear_pointwise(a, b, None, "none", [], "")
    out = {}
    for way, f in ways.items():
        f()
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            f()
            best = min(best, time.perf_counter() - start)
        out[way] = round(2 * n**3 / best / 1e9, 1)
    return out


def proc_status_mb(key: str) -> float:
    """VmRSS (resident now) or VmHWM (peak resident) of this process in MB (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024                                 # reported in kB
    raise KeyError(key)


def peak_over_two_steps(step: Callable[[], object]) -> tuple[float, float]:
    """(resident MB before, peak resident MB during) two calls of `step`, in this process."""
    base = proc_status_mb("VmRSS")
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")                       # reset VmHWM to VmRSS
    step()
    step()
    return base, proc_status_mb("VmHWM")


def child_memory(name: str, precision: str, args: argparse.Namespace) -> dict:
    """In a fresh process: peak RSS over two training steps (the first allocates AdamW state) above
    the RSS once model, optimizer and batch exist."""
    torch.manual_seed(0)
    model = build(name, args.vocab).train()
    batch = make_batch(args.batch, args.vocab)
    base, peak = peak_over_two_steps(make_step(name, model, batch, precision))
    return {"peak_mb": round(peak - base, 1), "rss_mb": round(peak, 1)}


def peak_memory(name: str, precision: str) -> dict:
    cmd = [sys.executable, __file__, *sys.argv[1:], "--child", name, precision]
    child = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(child.stdout.strip().splitlines()[-1])


def measure(precision: str, models: dict[str, nn.Module], batch, args: argparse.Namespace) -> dict:
    """Alternate the models round by round; median pairs/s of each."""
    steps = {name: make_step(name, m, batch, precision) for name, m in models.items()}
    for name in MODELS:                         # warm-up: allocator, oneDNN primitive caches, AdamW state
        for _ in range(args.warmup):
            steps[name]()
    rates: dict[str, list[float]] = {name: [] for name in MODELS}
    ratios: list[float] = []
    losses: dict[str, float] = {}
    for r in range(args.rounds):
        for name in (MODELS if r % 2 == 0 else MODELS[::-1]):
            start = time.perf_counter()
            for _ in range(args.steps):
                losses[name] = steps[name]()
            rates[name].append(args.steps * args.batch / (time.perf_counter() - start))
        ratios.append(rates["ours"][-1] / rates["peer"][-1])
    return {name: statistics.median(r) for name, r in rates.items()} | {
        "ratio": statistics.median(ratios), "ratios": [round(x, 3) for x in ratios],
        "rounds": {name: [round(x, 1) for x in r] for name, r in rates.items()},
        "last_loss": {name: round(v, 4) for name, v in losses.items()}}


def environment() -> dict:
    """What a benchmark row records about where it ran."""
    return {"torch": torch.__version__, "threads": torch.get_num_threads(),
            "cpu": platform.processor() or platform.machine(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "bf16_native": bf16_is_fast(), "load_avg_1min": round(os.getloadavg()[0], 2)}


def default_precisions() -> list[str]:
    """fp32, and bf16 where the CPU runs it natively: elsewhere it is emulated several hundred times
    slower than fp32, which measures the emulation, not the models (pass --precision bf16 to do it anyway)."""
    return list(PRECISIONS) if bf16_is_fast() else ["fp32"]


def save(rows: list[dict], path: Path) -> None:
    """One JSON object per line, as the rows were printed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=10, help="timed steps per model per round")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per model before the rounds")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--vocab", type=int, default=VOCAB)
    p.add_argument("--precision", nargs="+", choices=PRECISIONS, default=default_precisions(),
                   help="default: fp32, and bf16 where this CPU has native bf16")
    p.add_argument("--out", type=Path, default=RESULTS, help="results file (JSON lines)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory child processes")
    p.add_argument("--child", nargs=2, metavar=("MODEL", "PRECISION"), help=argparse.SUPPRESS)
    args = p.parse_args()
    for n in ("steps", "rounds", "batch"):
        if getattr(args, n) < 1:
            p.error(f"--{n} must be >= 1")
    if args.child:
        print(json.dumps(child_memory(*args.child, args)))
        return

    torch.manual_seed(0)
    models = {name: build(name, args.vocab).train() for name in MODELS}
    batch = make_batch(args.batch, args.vocab)
    params = {name: sum(p.numel() for p in m.parameters()) for name, m in models.items()}
    results = []
    for precision in args.precision:
        before = matmul_peak(precision)
        flops = {name: step_flops(name, m, batch, precision) for name, m in models.items()}
        rate = measure(precision, models, batch, args)
        after = matmul_peak(precision)           # a load spike can hide the peak in one measurement
        peaks = {way: max(before[way], after[way]) for way in before}
        peak = max(peaks.values())
        gflops = {name: flops[name] * rate[name] / args.batch / 1e9 for name in MODELS}
        row = {
            "benchmark": "train_throughput", "precision": precision, "batch": args.batch,
            "ours_pairs_per_s": round(rate["ours"], 1), "peer_pairs_per_s": round(rate["peer"], 1),
            "ratio": round(rate["ratio"], 3), "ratio_of_medians": round(rate["ours"] / rate["peer"], 3),
            "peak_fraction": round(gflops["ours"] / peak, 3), "peer_peak_fraction": round(gflops["peer"] / peak, 3),
            "ours_gflops": round(gflops["ours"], 1), "peer_gflops": round(gflops["peer"], 1),
            "matmul_peak_gflops": peak, "matmul_peaks": peaks,
            "ours_step_gflop": round(flops["ours"] / 1e9, 2), "peer_step_gflop": round(flops["peer"] / 1e9, 2),
        }
        if not args.no_memory:
            mem = {name: peak_memory(name, precision) for name in MODELS}
            row |= {"ours_peak_mb": mem["ours"]["peak_mb"], "peer_peak_mb": mem["peer"]["peak_mb"],
                    "ours_max_rss_mb": mem["ours"]["rss_mb"], "peer_max_rss_mb": mem["peer"]["rss_mb"]}
        row |= {"steps": args.steps, "rounds": args.rounds, "round_ratios": rate["ratios"],
                "rounds_pairs_per_s": rate["rounds"], "last_loss": rate["last_loss"],
                "params": params, "peer": f"open_clip {open_clip.__version__}", **environment()}
        print(json.dumps(row), flush=True)
        results.append(row)
    save(results, args.out)


if __name__ == "__main__":
    main()

"""Recall@K on 5,000 images x 25,000 captions (dim 256): chunked embeddings path vs full score matrix.

Each method runs in its own child process so its peak memory is measured alone: the peak is the
growth of the process's max RSS (`resource.getrusage`) over the baseline taken after the embeddings
exist (tracemalloc cannot see torch allocations). Prints one JSON line, writes results/recall.json.

    python benchmarks/recall.py [--images 5000] [--captions 25000] [--dim 256] [--chunk 1024]
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

from vlp.metrics import recall_at_k, recall_at_k_from_embeddings

RESULTS = Path(__file__).parent / "results" / "recall.json"


def make_data(n_images: int, n_captions: int, dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random unit embeddings; caption c belongs to image c % n_images (5 per image at 5K x 25K)."""
    g = torch.Generator().manual_seed(0)
    image = torch.nn.functional.normalize(torch.randn(n_images, dim, generator=g), dim=1)
    text = torch.nn.functional.normalize(torch.randn(n_captions, dim, generator=g), dim=1)
    return text, image, torch.arange(n_captions) % n_images


def max_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def run_one(method: str, args: argparse.Namespace) -> dict:
    """Time one method (best of `repeats`) and its peak RSS growth; runs inside a child process."""
    text, image, t2i = make_data(args.images, args.captions, args.dim)
    base = max_rss_mb()
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        if method == "chunked":
            metrics = recall_at_k_from_embeddings(text, image, t2i, chunk=args.chunk)
        else:
            metrics = recall_at_k(text @ image.T, t2i)  # the (n_captions, n_images) matrix held whole
        times.append(time.perf_counter() - start)
    return {"seconds": min(times), "peak_rss_delta_mb": max_rss_mb() - base, "metrics": metrics}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=5000)
    p.add_argument("--captions", type=int, default=25000)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--chunk", type=int, default=1024)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--one", choices=["chunked", "full"], help=argparse.SUPPRESS)  # child process mode
    args = p.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one, args)))
        return
    runs = {}
    for method in ("chunked", "full"):
        child = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--one", method],
                               capture_output=True, text=True, check=True)
        runs[method] = json.loads(child.stdout.strip().splitlines()[-1])
    same = runs["chunked"].pop("metrics") == runs["full"]["metrics"]
    biggest = max(args.captions, args.images)
    result = {
        "benchmark": "recall", "n_images": args.images, "n_captions": args.captions, "dim": args.dim,
        "chunk": args.chunk, "threads": torch.get_num_threads(), "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "chunked_s": round(runs["chunked"]["seconds"], 3), "full_s": round(runs["full"]["seconds"], 3),
        "chunked_peak_rss_delta_mb": round(runs["chunked"]["peak_rss_delta_mb"], 1),
        "full_peak_rss_delta_mb": round(runs["full"]["peak_rss_delta_mb"], 1),
        # analytic size of the largest float32 block each path allocates
        "chunked_block_mb": round(min(args.chunk, biggest) * biggest * 4 / 2**20, 1),
        "full_matrix_mb": round(args.captions * args.images * 4 / 2**20, 1),
        "identical_metrics": same, "metrics": runs["full"]["metrics"],
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()

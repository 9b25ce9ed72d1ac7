"""Recall@K on 5,000 images x 25,000 captions (dim 256): chunked embeddings path vs full score matrix.

Each measurement runs in its own child process so its peak memory is measured alone: the peak is
the growth of the process's max RSS (`resource.getrusage`) over the baseline taken after the
embeddings exist (tracemalloc cannot see torch allocations). The two methods alternate over
`--rounds` rounds and the best time of each is kept, since the machine is shared and noisy.
Prints one JSON line, writes results/recall.json.

    python benchmarks/recall.py [--images 5000] [--captions 25000] [--dim 256] [--chunk 1024]
"""

from __future__ import annotations

import argparse
import json
import os
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
    """Random unit embeddings; caption c belongs to image c % n_images (5 per image at 5K x 25K) and is
    a noisy copy of it, so recalls are far from both 0 and 100 (the two methods must agree on them)."""
    g = torch.Generator().manual_seed(0)
    t2i = torch.arange(n_captions) % n_images
    image = torch.nn.functional.normalize(torch.randn(n_images, dim, generator=g), dim=1)
    noise = torch.randn(n_captions, dim, generator=g) * 5.0 / dim**0.5  # norm ~5 against unit signal
    return torch.nn.functional.normalize(image[t2i] + noise, dim=1), image, t2i


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
    p.add_argument("--repeats", type=int, default=3, help="timed calls per child process")
    p.add_argument("--rounds", type=int, default=2, help="child processes per method, alternating")
    p.add_argument("--one", choices=["chunked", "full"], help=argparse.SUPPRESS)  # child process mode
    args = p.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one, args)))
        return
    runs: dict[str, list[dict]] = {"chunked": [], "full": []}
    for _ in range(args.rounds):
        for method in runs:
            child = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--one", method],
                                   capture_output=True, text=True, check=True)
            runs[method].append(json.loads(child.stdout.strip().splitlines()[-1]))
    same = all(r["metrics"] == runs["full"][0]["metrics"] for rs in runs.values() for r in rs)
    best = {m: min(r["seconds"] for r in rs) for m, rs in runs.items()}
    peak = {m: max(r["peak_rss_delta_mb"] for r in rs) for m, rs in runs.items()}
    biggest = max(args.captions, args.images)
    result = {
        "benchmark": "recall", "n_images": args.images, "n_captions": args.captions, "dim": args.dim,
        "chunk": args.chunk, "threads": torch.get_num_threads(), "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "load_avg_1min": round(os.getloadavg()[0], 2),
        "chunked_s": round(best["chunked"], 3), "full_s": round(best["full"], 3),
        "chunked_peak_rss_delta_mb": round(peak["chunked"], 1), "full_peak_rss_delta_mb": round(peak["full"], 1),
        # analytic size of the largest float32 block each path allocates
        "chunked_block_mb": round(min(args.chunk, biggest) * biggest * 4 / 2**20, 1),
        "full_matrix_mb": round(args.captions * args.images * 4 / 2**20, 1),
        "identical_metrics": same, "metrics": runs["full"][0]["metrics"],
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()

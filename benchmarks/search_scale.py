"""Index build rate on real emoji images, and search latency vs collection size on synthetic embeddings.

1. Build rate: `build_index` on the first `--build-images` emoji records of data/emoji (decode, 64-px
   thumbnail, embed the image and its English + Chinese captions, write the folder), images/s.
2. Scale: 100,000 synthetic unit vectors (dim 256, the quickstart embedding size) drawn around 1,000
   random centres (`--spread`), so near neighbours exist as in real embeddings; prefixes of 1K, 10K and 100K. For
   each size and index kind (flat = exact, IVF, HNSW, built by `make_faiss_index` with the settings the
   index command uses): build seconds, single-query latency (p50/p95 over `--queries` queries, k=10),
   batched queries/s, and recall@10 of the approximate kinds against exact, at the default search
   setting (nprobe / efSearch) and at 4x that. Single queries run on one FAISS thread, as `vlp serve`
   runs them (one query is too small to split; on a shared machine two OpenMP threads per query wait
   on each other); builds and batches use all cores.
Prints the JSON and writes results/search_scale.json.

    python benchmarks/search_scale.py [--ckpt RUN] [--build-images 1000] [--queries 300] [--sizes 1000 10000 100000]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np
import torch

from search_load import emoji_manifest, quickstart_checkpoint
from vlp.search.index import KINDS, build_index, make_faiss_index, set_search_params

RESULTS = Path(__file__).parent / "results" / "search_scale.json"
SIZES = (1_000, 10_000, 100_000)
DIM, CENTRES, K = 256, 1_000, 10


def synthetic(n: int, n_queries: int, spread: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(n, DIM) collection and (n_queries, DIM) queries, unit vectors scattered around shared centres:
    centre + spread * N(0, 1) per coordinate, normalised; two points of one cluster have cosine about
    1 / (1 + spread^2). At spread 1 the clusters are so tight that at 100K every kind finds all 10
    neighbours; at 2 they blur (measured: IVF 0.98, HNSW 0.92 recall@10 at 100K), at 3 the vectors
    are close to uniform (IVF 0.51)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((CENTRES, DIM)).astype(np.float32)

    def draw(m: int) -> np.ndarray:
        x = centres[rng.integers(0, CENTRES, m)] + spread * rng.standard_normal((m, DIM)).astype(np.float32)
        return x / np.linalg.norm(x, axis=1, keepdims=True)
    return draw(n), draw(n_queries)


def measure(index: faiss.Index, queries: np.ndarray) -> tuple[dict, np.ndarray]:
    """Single-query latency percentiles, batched throughput -> (figures, (Q, K) ids of the batched run)."""
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)               # single queries: one thread, as `vlp serve` runs them
    lat = []
    for q in queries:
        t = time.perf_counter()
        index.search(q[None], K)
        lat.append((time.perf_counter() - t) * 1000)
    faiss.omp_set_num_threads(threads)         # a batch splits well over the cores
    t = time.perf_counter()
    _, ids = index.search(queries, K)
    batch_s = time.perf_counter() - t
    return {"p50_ms": round(float(np.percentile(lat, 50)), 3), "p95_ms": round(float(np.percentile(lat, 95)), 3),
            "batched_qps": round(len(queries) / batch_s, 1)}, ids


def recall_at_k(approx: np.ndarray, exact: np.ndarray) -> float:
    return float(np.mean([len(set(a) & set(e)) / K for a, e in zip(approx.tolist(), exact.tolist())]))


def scale(sizes: list[int], n_queries: int, spread: float) -> list[dict]:
    data, queries = synthetic(max(sizes), n_queries, spread)
    rows = []
    for n in sizes:
        exact_ids = None
        for kind in KINDS:
            t = time.perf_counter()
            index, params = make_faiss_index(data[:n], kind)
            build_s = time.perf_counter() - t
            extra = {"nlist": faiss.extract_index_ivf(index).nlist} if kind == "ivf" else {}
            wider = {name: min(4 * v, extra.get("nlist", 4 * v)) for name, v in params.items()}
            for setting in [params] + ([wider] if wider != params else []):    # default, then 4x wider
                set_search_params(index, setting)
                figures, ids = measure(index, queries)
                exact_ids = ids if kind == "flat" else exact_ids
                row = {"n": n, "kind": kind, "params": {**setting, **extra}, "default": setting == params,
                       "build_s": round(build_s, 2), **figures, "recall_at_10": round(recall_at_k(ids, exact_ids), 4)}
                rows.append(row)
                print(json.dumps(row), flush=True)
    return rows


def build_rate(ckpt: Path, n_images: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        manifest = emoji_manifest(Path(tmp), n_images)
        summary = build_index(ckpt, manifest, Path(tmp) / "index", batch_size=128, progress=False)
    return {k: summary[k] for k in ("images", "captions", "seconds", "images_per_s")} | {
        "batch_size": 128, "what": "decode + 64-px thumbnail + embed image and its captions + write the folder"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ckpt", default=None, help="run or step folder for the build rate (default runs/quickstart)")
    ap.add_argument("--build-images", type=int, default=1000)
    ap.add_argument("--queries", type=int, default=300)
    ap.add_argument("--sizes", type=int, nargs="+", default=list(SIZES))
    ap.add_argument("--spread", type=float, default=2.0, help="noise around the cluster centres (see synthetic)")
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args()
    torch.set_num_threads(2)
    ckpt, model_note = quickstart_checkpoint(args.ckpt)
    result = {"benchmark": "search_scale", "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
              "machine": f"{platform.machine()}, {torch.get_num_threads()} threads",
              "faiss": faiss.__version__, "checkpoint": str(ckpt), "model": model_note,
              "build": build_rate(ckpt, args.build_images)}
    print(json.dumps({"build": result["build"]}), flush=True)
    result["scale"] = {"dim": DIM, "centres": CENTRES, "spread": args.spread, "queries": args.queries, "k": K,
                       "faiss_threads": {"build": faiss.omp_get_max_threads(), "single_query": 1,
                                         "batched": faiss.omp_get_max_threads()},
                       "rows": scale(args.sizes, args.queries, args.spread)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()

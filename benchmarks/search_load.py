"""Load run of the search service on loopback: concurrent clients against a 10,000-image index.

The index: the 7,906 emoji images of data/emoji plus rotated-and-mirrored copies of the first 2,094
(captions copied) = 10,000 images, 20,000 captions, exact (flat) FAISS index, built with `build_index`
into `--cache` and reused by later runs. The server: `vlp.search.server.serve` (uvicorn) in a child
process on 127.0.0.1. Clients: threads with one httpx.Client each, for a bounded time and request
count. Phases: text->image with 1 client (unloaded latency), text->image with `--clients`, and
image upload with `--clients`. Per phase: requests/s, p50/p95/p99 latency, errors.
Model: runs/quickstart when it exists, else the quickstart preset's architecture after 2 training
steps (MiniLM text tower + ResNet-18 at 64 px: the same cost per query, not the same answers).
Prints the JSON and writes results/search_load.json.

    python benchmarks/search_load.py [--ckpt RUN] [--clients 8] [--seconds 20]
"""
from __future__ import annotations

import argparse
import json
import platform
import random
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

from vlp.search.index import build_index

ROOT = Path(__file__).parents[1]
EMOJI = ROOT / "data" / "emoji" / "dataset.json"
RESULTS = Path(__file__).parent / "results" / "search_load.json"


def quickstart_checkpoint(ckpt: str | None, cache: Path = Path("/tmp/vlp-bench")) -> tuple[Path, str]:
    """-> (checkpoint, what it is): the one given, runs/quickstart, or a 2-step run of the quickstart preset."""
    from vlp.train.checkpoint import resolve
    if ckpt:
        return resolve(ckpt), "given"
    if (ROOT / "runs" / "quickstart" / "checkpoints" / "latest").is_file():
        return resolve(ROOT / "runs" / "quickstart"), "quickstart (trained)"
    out = cache / "quickstart-arch"
    if not (out / "checkpoints" / "latest").is_file():
        subprocess.run([sys.executable, "-m", "vlp", "pretrain", "emoji-ernie-vil2", "--set", "train.steps=2",
                        "--set", "train.batch_size=16", "--set", "train.save_every=2", "--set", 'data.eval_split=""',
                        "--set", f'data.train="{EMOJI}"', "--out", str(out), "--overwrite"], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return resolve(out), "quickstart architecture after 2 steps (same cost per query as the trained model)"


def emoji_manifest(folder: Path, n: int) -> Path:
    """Karpathy JSON of n images: the emoji set, then rotated + mirrored copies (written once) up to n."""
    data = json.loads(EMOJI.read_text())
    base = data["images"]
    for im in base:
        im["filepath"] = str((EMOJI.parent / im["filepath"]).resolve())
    images = base[:n]
    (folder / "augmented").mkdir(parents=True, exist_ok=True)
    for i in range(max(0, n - len(base))):
        src = base[i % len(base)]
        dst = folder / "augmented" / f"{i:06d}.png"
        if not dst.is_file():
            with Image.open(Path(src["filepath"]) / src["filename"]) as im:
                im.transpose(Image.Transpose.ROTATE_90).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(dst)
        images.append({**src, "filename": dst.name, "filepath": str(dst.parent), "imgid": len(base) + i,
                       "style": f"{src.get('style', '')}+rot90-mirror"})
    path = folder / f"manifest_{n}.json"
    path.write_text(json.dumps({"images": images}, ensure_ascii=False))
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(index: Path, port: int) -> subprocess.Popen:
    code = f"from vlp.search.server import serve; serve({str(index)!r}, port={port}, log_level='warning')"
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {proc.stderr.read().decode()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/api/health", timeout=2).status_code == 200:
                return proc
        except httpx.TransportError:
            time.sleep(0.5)
    proc.kill()
    raise RuntimeError("server did not answer /api/health within 180 s")


def run_phase(base: str, make_request, clients: int, seconds: float, max_requests: int) -> dict:
    """`clients` threads call make_request(client, rng) until the time or request budget is spent."""
    latencies, errors, lock = [], [], threading.Lock()
    stop_at = time.monotonic() + seconds

    def worker(seed: int) -> None:
        rng = random.Random(seed)
        with httpx.Client(base_url=base, timeout=30) as client:
            while time.monotonic() < stop_at:
                with lock:
                    if len(latencies) + len(errors) >= max_requests:
                        return
                t = time.perf_counter()
                try:
                    status = make_request(client, rng).status_code
                except httpx.HTTPError as e:
                    status = type(e).__name__
                ms = (time.perf_counter() - t) * 1000
                with lock:
                    if status == 200:
                        latencies.append(ms)
                    else:
                        errors.append(str(status))

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(clients)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    wall = time.perf_counter() - t0
    lat = np.array(latencies or [float("nan")])
    return {"clients": clients, "seconds": round(wall, 1), "requests": len(latencies) + len(errors),
            "errors": len(errors), "error_examples": sorted(set(errors))[:5],
            "throughput_rps": round(len(latencies) / wall, 1), "mean_ms": round(float(lat.mean()), 1),
            **{f"p{p}_ms": round(float(np.percentile(lat, p)), 1) for p in (50, 95, 99)}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ckpt", default=None)
    ap.add_argument("--images", type=int, default=10_000)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=20)
    ap.add_argument("--max-requests", type=int, default=20_000)
    ap.add_argument("--cache", default="/tmp/vlp-bench", help="where the augmented images and the index live")
    args = ap.parse_args()
    cache = Path(args.cache)
    ckpt, model_note = quickstart_checkpoint(args.ckpt, cache)
    manifest = emoji_manifest(cache, args.images)
    summary = build_index(ckpt, manifest, cache / f"index_{args.images}", batch_size=128, progress=False)
    index = cache / f"index_{args.images}"
    meta = [json.loads(line) for line in (index / "metadata.jsonl").read_text(encoding="utf-8").splitlines()]
    queries = [c for m in meta for c in m["captions"]]
    uploads = [(Path(m["image"]).name, Path(m["image"]).read_bytes()) for m in meta[:: max(1, len(meta) // 200)]]

    def text(client: httpx.Client, rng: random.Random) -> httpx.Response:
        return client.get("/api/search", params={"q": rng.choice(queries), "k": 10})

    def image(client: httpx.Client, rng: random.Random) -> httpx.Response:
        name, data = rng.choice(uploads)
        return client.post("/api/search/image", params={"k": 10}, files={"file": (name, data, "image/png")})

    port = free_port()
    proc = start_server(index, port)
    base = f"http://127.0.0.1:{port}"
    try:
        run_phase(base, text, 1, 2, 20)                                              # warm-up
        phases = {"text_1_client": run_phase(base, text, 1, args.seconds / 2, args.max_requests),
                  f"text_{args.clients}_clients": run_phase(base, text, args.clients, args.seconds, args.max_requests),
                  f"image_{args.clients}_clients": run_phase(base, image, args.clients, args.seconds / 2,
                                                             args.max_requests)}
        for name, figures in phases.items():
            print(name, json.dumps(figures), flush=True)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    result = {"benchmark": "search_load", "machine": f"{platform.machine()}, loopback 127.0.0.1",
              "checkpoint": str(ckpt), "model": model_note, "index": {
                  "images": summary["images"], "captions": summary["captions"], "kind": summary["kind"],
                  "built_from": f"{len(json.loads(EMOJI.read_text())['images'])} emoji images + rotated/mirrored "
                                f"copies up to {args.images}",
                  "build_seconds": summary["seconds"], "build_images_per_s": summary.get("images_per_s"),
                  "reused": bool(summary.get("reused"))},
              "phases": phases}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=1, ensure_ascii=False))
    print(json.dumps(result, indent=1, ensure_ascii=False))


if __name__ == "__main__":
    main()

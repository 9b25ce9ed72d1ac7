"""Load run of the search service on loopback: concurrent clients against a 10,000-image index.

The index: the 7,906 emoji images of data/emoji (both styles) plus 2,094 variants of them (a crop, a
scale and a background colour, fixed by the variant's number; captions copied) = 10,000 distinct images,
20,000 captions, exact (flat) FAISS index, built with `build_index` into `--cache` and reused by later
runs with the same checkpoint folder. The server: `vlp.search.server.serve` (uvicorn) in a child process
on 127.0.0.1. Clients: threads with one httpx.Client each, for a bounded time and request count, asking
random English and Chinese captions. Phases: text->image with 1, 4 and 8 clients, then image upload
with 8. Per phase: requests/s, p50/p95/p99 latency, errors.
Prints the JSON and writes results/search_load.json.

    python benchmarks/search_load.py [--ckpt RUN] [--clients 1 4 8] [--seconds 20] [--cache /tmp/vlp-bench]
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
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


def quickstart_checkpoint(ckpt: str | None) -> tuple[Path, str]:
    """-> (step folder, what it is): the checkpoint given, else runs/quickstart, else a clear error."""
    from vlp.train.checkpoint import resolve
    path = Path(ckpt) if ckpt else ROOT / "runs" / "quickstart"
    if not path.exists():
        raise SystemExit(f"no checkpoint at {path}: run `vlp quickstart` first, or pass --ckpt RUN_OR_STEP_FOLDER")
    step = resolve(path).resolve()
    cfg = json.loads((step / "config.json").read_text())
    model = cfg.get("model", cfg)
    keys = ["arch", "image_encoder", "image_size", "embed_dim", "text_init"]
    if not model.get("text_init"):                    # a text tower from scratch: its size is in the config
        keys += ["text_layers", "text_width"]
    if model.get("image_encoder") == "vit":
        keys += ["vit_layers", "vit_width"]
    arch = {k: model[k] for k in keys if k in model}
    return step, f"{'quickstart' if not ckpt else 'given'}: {arch}"


def _variant(img: Image.Image, i: int) -> Image.Image:
    """Copy number i of an emoji image, different for every i: a crop (zoom and offset), a scale inside
    the frame and a background colour, all decided by i alone."""
    rng = random.Random(i)
    w, h = img.size
    rgba = img.convert("RGBA")
    zoom = rng.uniform(0.7, 1.0)                                  # crop a window of this fraction
    cw, ch = max(8, round(w * zoom)), max(8, round(h * zoom))
    x0, y0 = rng.randint(0, w - cw), rng.randint(0, h - ch)
    crop = rgba.crop((x0, y0, x0 + cw, y0 + ch))
    scale = rng.uniform(0.6, 1.0)                                 # then shrink it inside a frame of the old size
    sw, sh = max(4, round(w * scale)), max(4, round(h * scale))
    crop = crop.resize((sw, sh), Image.Resampling.BICUBIC)
    background = tuple(rng.randint(150, 255) for _ in range(3)) + (255,)
    canvas = Image.new("RGBA", (w, h), background)
    canvas.alpha_composite(crop, (rng.randint(0, w - sw), rng.randint(0, h - sh)))
    return canvas.convert("RGB")


def emoji_manifest(folder: Path, n: int) -> Path:
    """Karpathy JSON of n distinct images: the emoji set (both styles), then variants (crop, scale,
    background; see `_variant`) of the emoji images in order, written once into folder/variants/."""
    data = json.loads(EMOJI.read_text())
    base = data["images"]
    for im in base:
        im["filepath"] = str((EMOJI.parent / im["filepath"]).resolve())
    images = base[:n]
    (folder / "variants").mkdir(parents=True, exist_ok=True)
    for i in range(max(0, n - len(base))):
        src = base[i % len(base)]
        dst = folder / "variants" / f"{i:06d}.png"
        if not dst.is_file():
            with Image.open(Path(src["filepath"]) / src["filename"]) as im:
                tmp = dst.with_suffix(".tmp")
                _variant(im, i).save(tmp, format="PNG")
                tmp.replace(dst)
        images.append({**src, "filename": dst.name, "filepath": str(dst.parent), "imgid": len(base) + i,
                       "style": f"{src.get('style', '')}+variant"})
    path = folder / f"manifest_{n}.json"
    path.write_text(json.dumps({"images": images}, ensure_ascii=False))
    return path


def index_folder(cache: Path, ckpt: Path, n: int) -> Path:
    """One cached index per (checkpoint folder, size); retrained weights in the same folder are rebuilt."""
    return cache / f"index_{n}_{hashlib.sha1(str(ckpt).encode()).hexdigest()[:10]}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(index: Path, port: int, threads: int = 1) -> subprocess.Popen:
    code = f"from vlp.search.server import serve; serve({str(index)!r}, port={port}, threads={threads}, " \
           f"log_level='warning')"
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
    ap.add_argument("--ckpt", default=None, help="run or step folder (default runs/quickstart)")
    ap.add_argument("--images", type=int, default=10_000)
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 4, 8], help="text-search phases, one per count")
    ap.add_argument("--seconds", type=float, default=20, help="length of each text phase (image phase: half)")
    ap.add_argument("--max-requests", type=int, default=20_000, help="request budget of each phase")
    ap.add_argument("--cache", default="/tmp/vlp-bench", help="variant images and indexes live here; reused")
    ap.add_argument("--threads", type=int, default=1, help="the server's threads per request (vlp serve --threads)")
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args()
    cache = Path(args.cache)
    ckpt, model_note = quickstart_checkpoint(args.ckpt)
    manifest = emoji_manifest(cache, args.images)
    index = index_folder(cache, ckpt, args.images)
    summary = build_index(ckpt, manifest, index, batch_size=128, overwrite=True, progress=False)
    meta = [json.loads(line) for line in (index / "metadata.jsonl").read_text(encoding="utf-8").splitlines()]
    queries = sorted({c for m in meta for c in m["captions"]})               # English and Chinese captions
    uploads = [(Path(m["image"]).name, Path(m["image"]).read_bytes()) for m in meta[:: max(1, len(meta) // 200)]]

    def text(client: httpx.Client, rng: random.Random) -> httpx.Response:
        return client.get("/api/search", params={"q": rng.choice(queries), "k": 10})

    def image(client: httpx.Client, rng: random.Random) -> httpx.Response:
        name, data = rng.choice(uploads)
        return client.post("/api/search/image", params={"k": 10}, files={"file": (name, data, "image/png")})

    port = free_port()
    proc = start_server(index, port, args.threads)
    base = f"http://127.0.0.1:{port}"
    phases = {}
    try:
        run_phase(base, text, 1, 2, 50)                                              # warm-up
        for n in args.clients:
            phases[f"text_{n}_clients"] = run_phase(base, text, n, args.seconds, args.max_requests)
            print(f"text_{n}_clients", json.dumps(phases[f"text_{n}_clients"]), flush=True)
        n = max(args.clients)
        phases[f"image_{n}_clients"] = run_phase(base, image, n, args.seconds / 2, args.max_requests)
        print(f"image_{n}_clients", json.dumps(phases[f"image_{n}_clients"]), flush=True)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    result = {"benchmark": "search_load", "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
              "machine": f"{platform.machine()}, {os.cpu_count()} cores, loopback "
              "127.0.0.1; clients are threads of this process (one httpx.Client each), on the same cores",
              "checkpoint": str(ckpt), "model": model_note, "index": {
                  "folder": str(index), "images": summary["images"], "captions": summary["captions"],
                  "kind": summary["kind"],
                  "built_from": f"{len(json.loads(EMOJI.read_text())['images'])} emoji images + crop/scale/"
                                f"background variants up to {args.images}",
                  "build_seconds": summary["seconds"], "build_images_per_s": summary.get("images_per_s"),
                  "reused": bool(summary.get("reused"))},
              "queries": f"{len(queries)} distinct captions (English and Chinese), k=10; uploads: {len(uploads)} "
                         "indexed images, k=10",
              "server_threads_per_request": args.threads, "phases": phases}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1, ensure_ascii=False))
    print(json.dumps(result, indent=1, ensure_ascii=False))


if __name__ == "__main__":
    main()

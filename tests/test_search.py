"""The search index and service: folder contents vs a reference embedding, resume after an interruption,
approximate kinds vs exact, ordering vs a brute-force dot product, and a clear 4xx for every bad request."""
import io
import json
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from vlp import config
from vlp.data.formats import SkipReport, read_records
from vlp.data.pairs import decode_images
from vlp.eval.retrieval import embed_images, embed_texts
from vlp.search import index as index_mod
from vlp.search.index import SearchIndex, build_index
from vlp.search.server import FRAMING, MAX_K, MAX_QUERY_CHARS, MAX_UPLOAD_BYTES, create_app
from vlp.train.checkpoint import load_checkpoint
from vlp.train.loop import train

N_GOOD = 40
CHUNK = 16


# --- helpers (the browser test uses them too) ---------------------------------------------------------

def train_tiny(data: Path, out: Path) -> Path:
    """A real checkpoint in a few seconds: the tiny preset, 4 steps."""
    cfg = config.load(Path(__file__).parents[1] / "src/vlp/configs/tiny.toml",
                      [f'data.train="{data}"', f'train.out="{out}"', "train.steps=4", "train.batch_size=16",
                       "train.save_every=4", "train.warmup_steps=1", 'data.eval_split=""'])
    return train(cfg, progress=False)


def write_manifest(dataset_json: Path, folder: Path, n: int = N_GOOD) -> Path:
    """Karpathy JSON of the first n emoji images (absolute paths) plus one corrupt image file."""
    data = json.loads(dataset_json.read_text())
    images = data["images"][:n]
    for im in images:
        im["filepath"] = str((dataset_json.parent / im["filepath"]).resolve())
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    images.append({"filename": "broken.png", "filepath": str(folder), "imgid": 10_000, "split": "test",
                   "sentences": [{"raw": "a broken file", "lang": "en"}]})
    path = folder / "manifest.json"
    path.write_text(json.dumps({"images": images}, ensure_ascii=False))
    return path


@pytest.fixture(scope="session")
def ckpt(emoji_tiny, tmp_path_factory):
    return train_tiny(emoji_tiny, tmp_path_factory.mktemp("run") / "run")


@pytest.fixture(scope="session")
def manifest(emoji_tiny, tmp_path_factory):
    return write_manifest(emoji_tiny, tmp_path_factory.mktemp("manifest"))


@pytest.fixture(scope="session")
def built(ckpt, manifest, tmp_path_factory):
    out = tmp_path_factory.mktemp("index") / "idx"
    return out, build_index(ckpt, manifest, out, chunk_size=CHUNK, batch_size=8, progress=False)


@pytest.fixture(scope="session")
def client(built):
    return TestClient(create_app(built[0]))


@pytest.fixture(scope="session")
def model_tok(ckpt):
    model, tok, cfg = load_checkpoint(ckpt)
    return model, tok, cfg


def png_bytes(path: str) -> bytes:
    return Path(path).read_bytes()


# --- building ------------------------------------------------------------------------------------------

def test_index_folder_holds_reference_embeddings(built, manifest, model_tok):
    out, summary = built
    model, _, cfg = model_tok
    assert (summary["images"], summary["skipped"], summary["kind"]) == (N_GOOD, 1, "flat")
    for name in ("model.json", "images.faiss", "captions.faiss", "ids.json", "metadata.jsonl", "captions.jsonl",
                 "image_emb.npy", "text_emb.npy", "skipped.jsonl"):
        assert (out / name).is_file(), name
    assert not (out / "build").exists()
    skipped = [json.loads(line) for line in (out / "skipped.jsonl").read_text().splitlines()]
    assert [Path(s["image"]).name for s in skipped] == ["broken.png"]
    meta = [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]
    assert json.loads((out / "ids.json").read_text()) == [m["id"] for m in meta]
    assert all("hex" in m and "style" in m and m["captions"] for m in meta)
    for m in meta:
        with Image.open(out / "thumbs" / m["thumbnail"]) as im:
            assert max(im.size) <= 64
    # reference: the evaluation code path decodes and embeds the same records
    records, _ = read_records(manifest)
    kept, images = decode_images(records, cfg.model.image_size, SkipReport(), progress=False)
    assert [r.image_id for r in kept] == [m["id"] for m in meta]
    np.testing.assert_allclose(np.load(out / "image_emb.npy"), embed_images(model, images).numpy(), atol=1e-5)
    n_caps = sum(len(r.captions) for r in kept)
    assert summary["captions"] == n_caps == len(np.load(out / "text_emb.npy"))


def test_interrupted_build_resumes_where_it_stopped(built, ckpt, manifest, tmp_path, monkeypatch):
    out = tmp_path / "cut"
    real_save, saved = index_mod._save_npz, []

    def save_then_crash(path, **arrays):
        real_save(path, **arrays)
        saved.append(path)
        if len(saved) == 2:
            raise KeyboardInterrupt("simulated interruption")
    monkeypatch.setattr(index_mod, "_save_npz", save_then_crash)
    with pytest.raises(KeyboardInterrupt):
        build_index(ckpt, manifest, out, chunk_size=CHUNK, batch_size=8, progress=False)
    assert not (out / "model.json").exists() and len(list((out / "build").glob("chunk_*.npz"))) == 2
    with pytest.raises(FileNotFoundError, match="interrupted build"):
        SearchIndex.load(out)

    monkeypatch.setattr(index_mod, "_save_npz", real_save)
    real_embed, embedded = index_mod.embed_images, []
    monkeypatch.setattr(index_mod, "embed_images", lambda m, x, *a: embedded.append(len(x)) or real_embed(m, x, *a))
    summary = build_index(ckpt, manifest, out, chunk_size=CHUNK, batch_size=8, progress=False)
    total = N_GOOD + 1
    assert summary["resumed_chunks"] == 2 and summary["embedded_images"] == total - 2 * CHUNK
    assert sum(embedded) == total - 2 * CHUNK - 1          # the broken image is in the last chunk
    # the resumed folder equals the uninterrupted one: embeddings, ids, metadata, captions, skips, thumbnails
    for name in ("image_emb.npy", "text_emb.npy"):
        np.testing.assert_allclose(np.load(out / name), np.load(built[0] / name), atol=1e-6)
    for name in ("ids.json", "metadata.jsonl", "captions.jsonl", "skipped.jsonl"):
        assert (out / name).read_text() == (built[0] / name).read_text(), name
    thumbs = sorted(p.name for p in (built[0] / "thumbs").iterdir())
    assert sorted(p.name for p in (out / "thumbs").iterdir()) == thumbs and len(thumbs) == N_GOOD
    assert all((out / "thumbs" / t).read_bytes() == (built[0] / "thumbs" / t).read_bytes() for t in thumbs)
    assert not (out / "build").exists() and summary["images"] == N_GOOD and summary["skipped"] == 1
    a, b = SearchIndex.load(out), SearchIndex.load(built[0])
    for query in ("grinning face", "红心"):
        assert [(h["id"], round(h["score"], 5)) for h in a.search_text(query, 10)] == \
               [(h["id"], round(h["score"], 5)) for h in b.search_text(query, 10)]


def test_rerun_reuses_and_refuses_foreign_folders(built, ckpt, manifest, emoji_tiny, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(built[0], out)
    again = build_index(ckpt, manifest, out, chunk_size=CHUNK, progress=False)
    assert again["reused"] and again["embedded_images"] == 0
    with pytest.raises(ValueError, match="other data.*--overwrite"):
        build_index(ckpt, emoji_tiny, out, progress=False)
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("mine")
    with pytest.raises(ValueError, match="not empty"):
        build_index(ckpt, manifest, tmp_path / "notes", progress=False)


@pytest.mark.parametrize("kind", ["ivf", "hnsw"])
def test_approximate_kinds_match_exact_on_a_small_collection(built, ckpt, manifest, tmp_path, kind):
    out = tmp_path / kind
    shutil.copytree(built[0], out)
    summary = build_index(ckpt, manifest, out, kind=kind, progress=False)       # re-indexes stored embeddings
    assert summary["kind"] == kind
    idx = SearchIndex.load(out)
    emb = np.load(out / "image_emb.npy")
    for i in range(0, N_GOOD, 7):
        hits = idx._image_hits(emb[i:i + 1], 10)
        exact = np.argsort(-(emb @ emb[i]), kind="stable")[:10]
        assert hits[0]["row"] == i
        assert {h["row"] for h in hits} == set(exact.tolist())


def test_image_folder_without_captions(ckpt, emoji_tiny, tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    sources = sorted((emoji_tiny.parent / "images").rglob("*.png"))[:5]
    for i, src in enumerate(sources):
        shutil.copy(src, folder / f"{i}.png")
    (folder / "bad.jpg").write_bytes(b"\xff\xd8\xff truncated")
    (folder / "readme.txt").write_text("not an image, not counted")
    summary = build_index(ckpt, folder, tmp_path / "idx", progress=False)
    assert (summary["images"], summary["captions"], summary["skipped"]) == (5, 0, 1)
    idx = SearchIndex.load(tmp_path / "idx")
    assert len(idx.search_text("smiling face", 10)) == 5
    with Image.open(sources[0]) as im:
        found = idx.search_image(im.convert("RGB"), 3)
    assert found["captions"] == [] and found["images"][0]["id"] == "0.png"


def test_dataset_folder_means_its_manifest(emoji_tiny, tmp_path):
    """`--data data/emoji` indexes the captioned dataset.json, not the bare image files under it."""
    records, _ = index_mod.collection(emoji_tiny.parent)
    assert [r.image_id for r in records] == [r.image_id for r in read_records(emoji_tiny)[0]]
    assert all(r.captions for r in records)
    with pytest.raises(ValueError, match="folder without images"):
        index_mod.collection(tmp_path)


# --- the API -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("query", ["caption0", "caption_zh", "a blue fish in the sea", "红心"])
def test_text_search_ordering_matches_brute_force(client, built, model_tok, query):
    out, _ = built
    model, tok, cfg = model_tok
    meta = [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]
    query = {"caption0": meta[3]["captions"][0], "caption_zh": meta[5]["captions"][-1]}.get(query, query)
    k = 10
    res = client.get("/api/search", params={"q": query, "k": k})
    assert res.status_code == 200
    hits = res.json()["results"]
    q = embed_texts(model, tok, [query], cfg.model.text_max_len).numpy()[0]
    scores = np.load(out / "image_emb.npy") @ q                                    # (N,)
    best = np.argsort(-scores, kind="stable")[:k]
    assert [h["id"] for h in hits] == [meta[i]["id"] for i in best]
    np.testing.assert_allclose([h["score"] for h in hits], scores[best], atol=1e-5)
    assert all(a["score"] >= b["score"] for a, b in zip(hits, hits[1:]))


def test_results_carry_metadata_and_thumbnails(client):
    hits = client.get("/api/search", params={"q": "face", "k": 3}).json()["results"]
    assert len(hits) == 3
    for h in hits:
        assert {"id", "score", "thumbnail", "captions", "hex", "style"} <= h.keys() and "image" not in h
        thumb = client.get(h["thumbnail"])
        assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/png"
        Image.open(io.BytesIO(thumb.content)).verify()


def test_image_search_finds_the_image_itself(client, built):
    meta = [json.loads(line) for line in (built[0] / "metadata.jsonl").read_text().splitlines()]
    target = meta[11]
    res = client.post("/api/search/image", params={"k": 5},
                      files={"file": ("q.png", png_bytes(target["image"]), "image/png")})
    assert res.status_code == 200
    body = res.json()
    assert body["results"][0]["score"] > 0.999
    assert target["id"] in [h["id"] for h in body["results"] if h["score"] > 0.999]
    assert len(body["captions"]) == 5 and all({"text", "score", "id", "thumbnail"} <= c.keys() for c in body["captions"])


def test_concurrent_queries_equal_sequential_ones(built):
    """The server runs requests side by side on one SearchIndex: answers must not mix."""
    from concurrent.futures import ThreadPoolExecutor
    idx = SearchIndex.load(built[0])
    meta = [json.loads(line) for line in (built[0] / "metadata.jsonl").read_text().splitlines()]
    images = [Image.open(meta[i]["image"]).convert("RGB") for i in range(0, N_GOOD, 5)]
    jobs = [("text", c) for m in meta[:12] for c in m["captions"]] + [("image", im) for im in images]

    def run(job):
        kind, x = job
        hits = idx.search_text(x, 5) if kind == "text" else idx.search_image(x, 5)["images"]
        return [(h["id"], round(h["score"], 5)) for h in hits]
    sequential = [run(j) for j in jobs]
    with ThreadPoolExecutor(8) as pool:
        assert list(pool.map(run, jobs * 2)) == sequential * 2


def test_health_and_page(client):
    health = client.get("/api/health").json()
    assert health["status"] == "ok" and health["images"] == N_GOOD and health["kind"] == "flat"
    page = client.get("/")
    assert page.status_code == 200 and 'id="q"' in page.text and "/api/search" in page.text


BAD_GET = [
    ("/api/search", {"q": ""}, 400, "empty"),
    ("/api/search", {"q": "   "}, 400, "empty"),
    ("/api/search", {}, 400, "empty"),
    ("/api/search", {"q": "x" * (MAX_QUERY_CHARS + 1)}, 400, "limit"),
    ("/api/search", {"q": "cat", "k": 0}, 400, "k must be between"),
    ("/api/search", {"q": "cat", "k": MAX_K + 1}, 400, "k must be between"),
    ("/api/search", {"q": "cat", "k": -3}, 400, "k must be between"),
    ("/api/search", {"q": "cat", "k": "ten"}, 422, "k:"),
    ("/thumbs/..%2Fmodel.json", {}, 404, "no thumbnail"),
    ("/thumbs/%2e%2e/%2e%2e/etc/passwd", {}, 404, "no thumbnail"),
    ("/thumbs/..%5Cmodel.json", {}, 404, "no thumbnail"),
    ("/thumbs/999999.png", {}, 404, "no thumbnail"),
    ("/thumbs/%00.png", {}, 404, "no thumbnail"),
    ("/thumbs/000000.png%00", {}, 404, "no thumbnail"),
    ("/thumbs/%2Fetc%2Fpasswd", {}, 404, "no thumbnail"),
    ("/thumbs/thumbs/000000.png", {}, 404, "no thumbnail"),
    ("/api/search", {"q": "cat\x00dog"}, 200, None),
    ("/api/search", {"q": "🙂 ✨"}, 200, None),
    ("/api/search", {"q": "cat", "k": "1e3"}, 422, "k:"),
    ("/api/search", {"q": "cat", "k": "99999999999999999999999"}, 400, "k must be between"),
]


@pytest.mark.parametrize("url,params,status,message", BAD_GET, ids=[f"{u}-{p}"[:40] for u, p, _, _ in BAD_GET])
def test_bad_get_requests_get_a_clear_4xx(client, url, params, status, message):
    res = client.get(url, params=params)
    assert res.status_code == status, res.text
    if message is None:                                   # odd but valid input: searched as typed
        assert len(res.json()["results"]) == 10
    else:
        assert message in res.json()["detail"]


def _png(w: int, h: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), "white").save(buf, format="PNG")
    return buf.getvalue()


BAD_UPLOADS = [   # (name, request arguments made lazily, status, message)
    ("text", lambda: {"files": {"file": ("notes.txt", b"hello, not an image", "text/plain")}}, 415,
     "notes.txt is not an image"),
    ("empty", lambda: {"files": {"file": ("e.png", b"", "image/png")}}, 400, "e.png is empty"),
    ("truncated", lambda: {"files": {"file": ("t.png", _png(64, 64)[:60], "image/png")}}, 400,
     "t.png cannot be decoded"),
    ("too many pixels", lambda: {"files": {"file": ("w.png", _png(8000, 6000), "image/png")}}, 413, "pixels"),
    ("thin", lambda: {"files": {"file": ("thin.png", _png(2000, 20), "image/png")}}, 400, "sides"),
    ("oversized", lambda: {"files": {"file": ("big.png", b"\x89PNG" + bytes(MAX_UPLOAD_BYTES), "image/png")}},
     413, "upload limit"),
    ("no file", lambda: {}, 422, "file: Field required"),
    ("a field, not a file", lambda: {"data": {"file": "abc"}}, 422, "file:"),
    # malformed multipart bodies
    ("no boundary", lambda: {"content": b"--x\r\n", "headers": {"content-type": "multipart/form-data"}}, 400,
     "Missing boundary in multipart: send the image"),
    ("wrong boundary", lambda: {"content": b"--abc\r\nContent-Disposition: form-data; name=\"file\"; "
                                           b"filename=\"a.png\"\r\n\r\nxyz\r\n--abc--\r\n",
                                "headers": {"content-type": "multipart/form-data; boundary=zzz"}}, 400,
     "Invalid multipart data: send the image as multipart/form-data with the field `file`"),
    ("garbage body", lambda: {"content": bytes(range(256)) * 4,
                              "headers": {"content-type": "multipart/form-data; boundary=zzz"}}, 400,
     "Invalid multipart data"),
    ("cut off body", lambda: {"content": b"--zzz\r\nContent-Disposition: form-data; name=\"file\"; "
                                         b"filename=\"a.png\"\r\nContent-Type: image/png\r\n\r\n\x89PNG",
                              "headers": {"content-type": "multipart/form-data; boundary=zzz"}}, 422,
     "file: Field required"),
    ("no disposition", lambda: {"content": b"--zzz\r\nContent-Type: image/png\r\n\r\nabc\r\n--zzz--\r\n",
                                "headers": {"content-type": "multipart/form-data; boundary=zzz"}}, 400,
     "Content-Disposition"),
    ("too many fields", lambda: {"content": b"".join(b'--zzz\r\nContent-Disposition: form-data; name="f%d"\r\n\r\nv\r\n'
                                                     % i for i in range(1001)) + b"--zzz--\r\n",
                                 "headers": {"content-type": "multipart/form-data; boundary=zzz"}}, 400, "Too many fields"),
    ("json body", lambda: {"json": {"file": "a.png"}}, 422, "file:"),
    ("form field, not multipart", lambda: {"content": b"file=%zz",
                                           "headers": {"content-type": "application/x-www-form-urlencoded"}}, 422,
     "file: Value error, Expected UploadFile"),
]


@pytest.mark.parametrize("make,status,message", [b[1:] for b in BAD_UPLOADS], ids=[b[0] for b in BAD_UPLOADS])
def test_bad_uploads_get_a_clear_4xx(client, make, status, message):
    res = client.post("/api/search/image", **make())
    assert res.status_code == status and message in res.json()["detail"]


SMALL = 1000                          # the `small` app's upload limit
BODY_LIMIT = SMALL + FRAMING          # what its BodyLimit middleware enforces: the file plus multipart framing
MULTIPART = {"content-type": "multipart/form-data; boundary=zzz"}


def _multipart(payload: bytes) -> bytes:
    return (b'--zzz\r\nContent-Disposition: form-data; name="file"; filename="big.png"\r\n'
            b"Content-Type: image/png\r\n\r\n" + payload + b"\r\n--zzz--\r\n")


@pytest.fixture(scope="session")
def small(built):
    """The app built with a 1,000-byte upload limit (create_app's parameter: nothing patched after the fact)."""
    return TestClient(create_app(built[0], max_upload_bytes=SMALL))


def test_oversized_file_refused_even_when_the_body_size_passes(small):
    """The endpoint checks the file itself too: this body is under the middleware's limit."""
    res = small.post("/api/search/image", files={"file": ("big.png", _png(400, 400) + bytes(2000), "image/png")})
    assert res.status_code == 413 and "big.png is larger than the upload limit of 1,000 bytes" in res.json()["detail"]
    assert small.get("/api/health").json()["max_upload_bytes"] == SMALL


def test_body_over_the_limit_refused_by_its_content_length(small):
    body = _multipart(bytes(BODY_LIMIT))
    res = small.post("/api/search/image", content=body, headers=MULTIPART)
    assert res.request.headers["content-length"] == str(len(body))
    assert res.status_code == 413, res.text
    assert res.json()["detail"].startswith(f"request body of {len(body):,} bytes is larger than the limit of "
                                           f"{BODY_LIMIT:,} bytes (an image of at most {SMALL:,} bytes")
    at_limit = _multipart(bytes(BODY_LIMIT - len(_multipart(b""))))      # exactly the limit: past the middleware
    res = small.post("/api/search/image", content=at_limit, headers=MULTIPART)
    assert res.status_code == 413 and "big.png is larger than the upload limit of 1,000 bytes" in res.json()["detail"]


def test_chunked_body_over_the_limit_refused_while_it_arrives(small):
    """No Content-Length (a generator body goes out chunked): the middleware counts the bytes as they come."""
    body = _multipart(bytes(BODY_LIMIT))
    res = small.post("/api/search/image", content=(body[i:i + 4096] for i in range(0, len(body), 4096)),
                     headers=MULTIPART)
    assert "content-length" not in res.request.headers and res.request.headers["transfer-encoding"] == "chunked"
    assert res.status_code == 413, res.text
    assert res.json()["detail"].startswith(f"request body of more than {BODY_LIMIT:,} bytes is larger than the "
                                           f"limit of {BODY_LIMIT:,} bytes")


def test_chunked_body_is_cut_off_once_it_passes_the_limit(built):
    """At the ASGI level, chunk by chunk: the app stops reading right after the limit and answers 413."""
    import asyncio
    body = _multipart(bytes(3 * BODY_LIMIT))
    chunks = [body[i:i + 8192] for i in range(0, len(body), 8192)]
    read, sent = 0, []

    async def receive():
        nonlocal read
        if read == len(chunks):
            return {"type": "http.disconnect"}
        read += 1
        return {"type": "http.request", "body": chunks[read - 1], "more_body": read < len(chunks)}

    async def send(message):
        sent.append(message)
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": "/api/search/image", "raw_path": b"/api/search/image", "query_string": b"", "root_path": "",
             "headers": [(b"content-type", MULTIPART["content-type"].encode()), (b"transfer-encoding", b"chunked")],
             "server": ("testserver", 80), "client": ("testclient", 50000)}
    asyncio.run(create_app(built[0], max_upload_bytes=SMALL)(scope, receive, send))
    assert sent[0]["type"] == "http.response.start" and sent[0]["status"] == 413
    assert read == BODY_LIMIT // 8192 + 1 < len(chunks)              # the chunk that crossed the limit was the last
    detail = json.loads(b"".join(m.get("body", b"") for m in sent[1:]))["detail"]
    assert f"larger than the limit of {BODY_LIMIT:,} bytes" in detail


def test_chunked_upload_under_the_limit_is_searched(client, built):
    meta = json.loads((built[0] / "metadata.jsonl").read_text().splitlines()[0])
    body = _multipart(png_bytes(meta["image"]))
    res = client.post("/api/search/image", content=(body[i:i + 512] for i in range(0, len(body), 512)),
                      headers=MULTIPART)
    assert "content-length" not in res.request.headers
    assert res.status_code == 200 and meta["id"] in [h["id"] for h in res.json()["results"] if h["score"] > 0.999]


def test_upload_k_out_of_range(client, built):
    meta = json.loads((built[0] / "metadata.jsonl").read_text().splitlines()[0])
    res = client.post("/api/search/image", params={"k": 0}, files={"file": ("q.png", png_bytes(meta["image"]))})
    assert res.status_code == 400 and "k must be between" in res.json()["detail"]


def test_rerank_fails_clearly_until_a_cross_encoder_exists(built):
    with pytest.raises(ValueError, match="the search service does not rerank yet"):
        create_app(built[0], rerank="runs/some-cross-encoder")


def _vlp(*args: str, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "vlp", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, **kw)


def test_vlp_serve_answers_on_loopback_and_refuses_rerank(built):
    """The real command: `vlp serve INDEX --port P` answers the API; `--rerank` exits with a clear error."""
    out, _ = built
    refused = _vlp("serve", str(out), "--rerank", "runs/cross")
    _, err = refused.communicate(timeout=60)
    assert refused.returncode == 1 and "the search service does not rerank yet" in err

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = _vlp("serve", str(out), "--port", str(port))
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, proc.communicate()[1][-2000:]
            try:
                health = httpx.get(f"{base}/api/health", timeout=2)
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline, "vlp serve did not answer within 60 s"
                time.sleep(0.2)
        assert health.json()["images"] == N_GOOD
        hits = httpx.get(f"{base}/api/search", params={"q": "red heart", "k": 5}).json()["results"]
        assert len(hits) == 5 and httpx.get(base + hits[0]["thumbnail"]).status_code == 200
        assert httpx.get(f"{base}/api/search", params={"q": ""}).status_code == 400
        # a raw request path with dot segments, as a client that does not normalise it would send it
        with socket.create_connection(("127.0.0.1", port)) as s:
            s.sendall(b"GET /thumbs/../model.json HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            raw = b""
            while chunk := s.recv(65536):
                raw += chunk
        assert raw.split(b" ")[1] in (b"400", b"404") and b"fingerprint" not in raw
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_cli_commands_parse_and_run(built, ckpt, manifest, tmp_path, capsys):
    import argparse

    from vlp.search.cli import add_commands
    parser = argparse.ArgumentParser(prog="vlp")
    add_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["index", str(ckpt), "--data", str(manifest), "--out", str(tmp_path / "i"),
                              "--kind", "hnsw", "--chunk-size", "64"])
    args.fn(args)
    assert "vlp serve" in capsys.readouterr().out and (tmp_path / "i" / "model.json").is_file()
    args = parser.parse_args(["serve", str(built[0]), "--rerank", "x"])
    with pytest.raises(ValueError, match="cross-encoder"):
        args.fn(args)
    with pytest.raises(SystemExit):
        parser.parse_args(["index", str(ckpt), "--data", "d", "--out", "o", "--kind", "lsh"])

"""Index a collection with a trained dual encoder, and search it.

`build_index` embeds every image (and every caption, for image->text search) and writes a folder:

    model.json        the checkpoint (step folder) and the settings the index was built with; written
                      last, so a folder with it is complete
    images.faiss      FAISS index over the image embeddings (flat = exact inner product; ivf / hnsw)
    captions.faiss    the same over caption embeddings;  captions.jsonl: {row, text, lang} per caption
    image_emb.npy     (N, D) float32, row i = metadata line i;  text_emb.npy (T, D) likewise
    ids.json          image id per row;  metadata.jsonl: captions, tags, hex, style, ... per row
    thumbs/           one 64-px PNG per indexed image
    skipped.jsonl     every image that could not be read, with the reason
    build/            embeddings of finished chunks (records start-end) while building: an interrupted
                      build resumes there

`SearchIndex.load(folder)` reloads the model the index names and answers text and image queries.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import threading
import time
from pathlib import Path

import faiss
import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from vlp.data.formats import BadImageError, Record, SkipReport, load_image, read_records
from vlp.data.transforms import to_uint8
from vlp.eval.retrieval import embed_images, embed_texts
from vlp.search import KINDS

IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp", ".tif", ".tiff"}
THUMB_SIZE = 64
HNSW_M, HNSW_EF_BUILD, HNSW_EF_SEARCH = 32, 80, 64


# --- inputs --------------------------------------------------------------------------------------------

def image_dir_records(folder: str | Path) -> list[Record]:
    """Every image file under `folder` (recursively, sorted) as a record without captions."""
    folder = Path(folder)
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTS)
    return [Record(image=str(p.resolve()), captions=[], langs=[], image_id=p.relative_to(folder).as_posix())
            for p in files]


def collection(data: str | Path, image_root: str | Path | None = None, split: str | None = None
               ) -> tuple[list[Record], SkipReport]:
    """A manifest (any format `read_records` knows), a dataset folder holding `dataset.json` (as `vlp data
    emoji` writes), or a folder of images without captions."""
    p = Path(data)
    if p.is_dir() and (p / "dataset.json").is_file():
        return read_records(p / "dataset.json", image_root=image_root, split=split)
    if p.is_dir() and not any(p.glob("*.tar")):
        records = image_dir_records(p)
        if not records:
            raise ValueError(f"{p} is a folder without images ({', '.join(sorted(IMAGE_EXTS))}) or .tar shards")
        return records, SkipReport()
    return read_records(data, image_root=image_root, split=split)


def _fingerprint(records: list[Record], step_dir: Path, image_size: int) -> str:
    """Identifies what the chunks hold: the same records, weights and image size resume; others don't.
    The weights count by content: a run trained again into the same folder makes a new index."""
    with open(step_dir / "model.safetensors", "rb") as f:
        weights = hashlib.file_digest(f, "sha1").hexdigest()
    h = hashlib.sha1(f"{weights}|{image_size}".encode())
    for r in records:
        h.update(json.dumps([r.image, r.image_id, r.captions], ensure_ascii=False).encode())
    return h.hexdigest()


# --- FAISS ---------------------------------------------------------------------------------------------

def make_faiss_index(emb: np.ndarray, kind: str = "flat") -> tuple[faiss.Index, dict]:
    """(N, D) float32 unit vectors -> (filled index, search parameters). Inner product = cosine here."""
    n, d = emb.shape
    if kind == "flat":
        index, params = faiss.IndexFlatIP(d), {}
    elif kind == "ivf":
        nlist = max(1, min(round(4 * math.sqrt(n)), n // 39))        # >= 39 training points per list
        index = faiss.index_factory(d, f"IVF{nlist},Flat", faiss.METRIC_INNER_PRODUCT)
        index.train(emb)
        params = {"nprobe": min(nlist, max(16, nlist // 8))}
    elif kind == "hnsw":
        index = faiss.IndexHNSWFlat(d, HNSW_M, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = HNSW_EF_BUILD
        params = {"efSearch": HNSW_EF_SEARCH}
    else:
        raise ValueError(f"unknown index kind {kind!r}; choose one of {', '.join(KINDS)}")
    if n:
        index.add(emb)
    set_search_params(index, params)
    return index, params


def set_search_params(index: faiss.Index, params: dict) -> None:
    for name, value in params.items():
        faiss.ParameterSpace().set_index_parameter(index, name, value)


# --- building ------------------------------------------------------------------------------------------

def _save_npz(path: Path, **arrays) -> None:
    """Write atomically: a chunk file that exists is complete."""
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)
    os.replace(tmp, path)


def _thumbnail(img: Image.Image, path: Path) -> None:
    thumb = img.copy()
    thumb.thumbnail((THUMB_SIZE, THUMB_SIZE), Image.Resampling.LANCZOS)
    thumb.save(path, format="PNG")


def _embed_chunk(model, tokenizer, cfg, records: list[Record], start: int, out: Path, batch_size: int,
                 bar: tqdm) -> dict:
    """Decode, thumbnail and embed records [start, start + len(records)) -> the chunk's arrays."""
    rows, images, skipped = [], [], []
    for pos, r in enumerate(records, start):
        try:
            img = load_image(r)
            images.append(to_uint8(img, cfg.model.image_size))
            _thumbnail(img, out / "thumbs" / f"{pos:06d}.png")
            rows.append(pos)
        except BadImageError as e:
            skipped.append({"image": r.image, "id": r.image_id, "reason": e.reason})
        bar.update(1)
    d = cfg.model.embed_dim
    img_emb = embed_images(model, torch.stack(images), batch_size).numpy() if images else np.zeros((0, d))
    caps = [(pos, c) for pos in rows for c in records[pos - start].captions]
    txt_emb = embed_texts(model, tokenizer, [c for _, c in caps], cfg.model.text_max_len, batch_size).numpy() \
        if caps else np.zeros((0, d))
    return {"rows": np.array(rows, dtype=np.int64), "image_emb": img_emb.astype(np.float32),
            "text_owner": np.array([p for p, _ in caps], dtype=np.int64), "text_emb": txt_emb.astype(np.float32),
            "skipped": np.array(json.dumps(skipped, ensure_ascii=False))}


def _check_folder(out: Path, fingerprint: str, overwrite: bool) -> dict | None:
    """The finished build's model.json if `out` holds this very index (a partial build of it stays to be
    resumed). An index of other data or weights is replaced when `overwrite`, else refused."""
    state, done = out / "build" / "state.json", out / "model.json"
    if out.exists() and any(out.iterdir()) and not (done.is_file() or state.is_file()):
        raise ValueError(f"{out} is not empty and holds no index; choose another --out")
    for marker in (done, state):
        if marker.is_file() and json.loads(marker.read_text()).get("fingerprint") != fingerprint:
            if not overwrite:
                raise ValueError(f"{out} holds an index of other data or another checkpoint ({marker.name}); "
                                 f"choose another --out or pass --overwrite")
            shutil.rmtree(out)
            return None
    return json.loads(done.read_text()) if done.is_file() else None


def _write_faiss(out: Path, img_emb: np.ndarray, txt_emb: np.ndarray, kind: str) -> dict:
    """Write images.faiss and captions.faiss -> their search parameters."""
    images, img_params = make_faiss_index(img_emb, kind)
    captions, cap_params = make_faiss_index(txt_emb, kind if len(txt_emb) > 1 else "flat")
    faiss.write_index(images, str(out / "images.faiss"))
    faiss.write_index(captions, str(out / "captions.faiss"))
    return {"images": img_params, "captions": cap_params}


def _change_kind(out: Path, info: dict, kind: str) -> dict:
    """Rebuild only the FAISS indexes of a finished folder from its stored embeddings."""
    params = _write_faiss(out, np.load(out / "image_emb.npy"), np.load(out / "text_emb.npy"), kind)
    info = {**info, "kind": kind, "search_params": params}
    (out / "model.json").write_text(json.dumps(info, indent=1, ensure_ascii=False))
    return info


def build_index(ckpt: str | Path, data: str | Path, out: str | Path, kind: str = "flat", batch_size: int = 64,
                split: str | None = None, image_root: str | Path | None = None, chunk_size: int = 1024,
                overwrite: bool = False, progress: bool = True) -> dict:
    """Embed a collection (manifest or image folder) with a checkpoint and write the index folder.

    Chunks of `chunk_size` images are saved as they finish; running again with the same arguments
    after an interruption embeds only the missing chunks, and after a finished build reuses it (only
    the FAISS index is rebuilt when `kind` changed). `overwrite` replaces an index of other data or
    weights in `out`. -> summary dict (also in model.json).
    """
    from vlp.train.checkpoint import load_checkpoint, resolve
    if kind not in KINDS:
        raise ValueError(f"unknown index kind {kind!r}; choose one of {', '.join(KINDS)}")
    t0 = time.perf_counter()
    out, step_dir = Path(out), resolve(ckpt).resolve()
    records, report = collection(data, image_root, split)
    if not records:
        raise ValueError(f"no records to index in {data} (split={split!r}): {report.summary()}")
    model, tokenizer, cfg = load_checkpoint(step_dir)
    fingerprint = _fingerprint(records, step_dir, cfg.model.image_size)
    finished = _check_folder(out, fingerprint, overwrite)
    if finished is not None:
        info = finished if finished["kind"] == kind else _change_kind(out, finished, kind)
        return {**info, "reused": True, "embedded_images": 0}
    build = out / "build"
    (out / "thumbs").mkdir(parents=True, exist_ok=True)
    build.mkdir(exist_ok=True)
    (build / "state.json").write_text(json.dumps({"fingerprint": fingerprint}))
    starts = range(0, len(records), chunk_size)
    chunk_file = {s: build / f"chunk_{s:08d}-{min(s + chunk_size, len(records)):08d}.npz" for s in starts}
    todo = [s for s in starts if not chunk_file[s].is_file()]
    embedded = 0
    with tqdm(total=len(records), desc="index", unit="img", disable=not progress) as bar:
        bar.update(len(records) - sum(len(records[s:s + chunk_size]) for s in todo))
        t_embed = time.perf_counter()
        for s in todo:
            arrays = _embed_chunk(model, tokenizer, cfg, records[s:s + chunk_size], s, out, batch_size, bar)
            _save_npz(chunk_file[s], **arrays)
            embedded += len(records[s:s + chunk_size])
        t_embed = time.perf_counter() - t_embed
    chunks = [dict(np.load(chunk_file[s])) for s in starts]
    summary = _write_index(out, records, chunks, kind, cfg)
    summary.update(checkpoint=str(step_dir), data=str(data), split=split, fingerprint=fingerprint,
                   image_size=cfg.model.image_size, text_max_len=cfg.model.text_max_len,
                   embed_dim=cfg.model.embed_dim, resumed_chunks=len(starts) - len(todo),
                   embedded_images=embedded, seconds=round(time.perf_counter() - t0, 2),
                   images_per_s=round(embedded / t_embed, 1) if embedded and t_embed > 0 else None)
    if report.total():
        summary["manifest_skipped"] = report.summary()
    (out / "model.json").write_text(json.dumps(summary, indent=1, ensure_ascii=False))
    shutil.rmtree(build)
    return summary


def _write_index(out: Path, records: list[Record], chunks: list[dict], kind: str, cfg) -> dict:
    """Join the chunks in record order and write embeddings, FAISS indexes, ids and metadata."""
    rows = np.concatenate([c["rows"] for c in chunks])                          # (N,) record positions
    img_emb = np.concatenate([c["image_emb"] for c in chunks]).astype(np.float32)   # (N, D)
    owner = np.concatenate([c["text_owner"] for c in chunks])                  # (T,) record positions
    txt_emb = np.concatenate([c["text_emb"] for c in chunks]).astype(np.float32)    # (T, D)
    skipped = [s for c in chunks for s in json.loads(str(c["skipped"]))]
    if not len(rows):
        raise ValueError(f"none of the {len(records)} images could be read, e.g. {skipped[0]}")
    row_of = {int(p): i for i, p in enumerate(rows)}
    np.save(out / "image_emb.npy", img_emb)
    np.save(out / "text_emb.npy", txt_emb)
    params = _write_faiss(out, img_emb, txt_emb, kind)
    with open(out / "metadata.jsonl", "w", encoding="utf-8") as f:
        for p in rows:
            r = records[p]
            row = {**r.meta, "id": r.image_id, "image": r.image, "thumbnail": f"{p:06d}.png",
                   "captions": r.captions, "langs": r.langs, "tags": r.tags, "split": r.split}
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    cap_iter = ((int(p), c, lg) for p in rows for c, lg in zip(records[p].captions, records[p].langs))
    with open(out / "captions.jsonl", "w", encoding="utf-8") as f:
        for (p, text, lang), q in zip(cap_iter, owner):
            assert p == q, "caption order differs from the embedded order"
            f.write(json.dumps({"row": row_of[p], "text": text, "lang": lang}, ensure_ascii=False) + "\n")
    (out / "ids.json").write_text(json.dumps([records[p].image_id for p in rows], ensure_ascii=False))
    with open(out / "skipped.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps(s, ensure_ascii=False) + "\n" for s in skipped)
    return {"kind": kind, "images": len(rows), "captions": len(txt_emb), "skipped": len(skipped),
            "skipped_examples": skipped[:5], "search_params": params}


# --- searching -----------------------------------------------------------------------------------------

class SearchIndex:
    """A loaded index folder and its model. Thread-safe: requests run the model and FAISS side by side
    (both read-only here); only tokenising, which reconfigures the shared tokenizer, takes a lock."""

    def __init__(self, folder: Path, info: dict, model, tokenizer, meta: list[dict], captions: list[dict],
                 images_index: faiss.Index, captions_index: faiss.Index):
        self.folder, self.info, self.model, self.tokenizer = folder, info, model, tokenizer
        self.meta, self.captions = meta, captions
        self.images_index, self.captions_index = images_index, captions_index
        self._lock = threading.Lock()

    @classmethod
    def load(cls, folder: str | Path, ckpt: str | Path | None = None) -> SearchIndex:
        """Open an index folder; the model is the checkpoint model.json names, unless `ckpt` is given."""
        from vlp.train.checkpoint import load_checkpoint
        folder = Path(folder)
        if not (folder / "model.json").is_file():
            raise FileNotFoundError(f"{folder} is not a complete index folder (no model.json): build it with "
                                    f"`vlp index`, or run the same command again to finish an interrupted build")
        info = json.loads((folder / "model.json").read_text())
        source = Path(ckpt or info["checkpoint"])
        if not source.exists():
            raise FileNotFoundError(f"checkpoint {source} named in {folder / 'model.json'} does not exist")
        model, tokenizer, cfg = load_checkpoint(source)
        if cfg.model.embed_dim != info["embed_dim"]:
            raise ValueError(f"checkpoint {source} embeds in {cfg.model.embed_dim} dimensions but the index "
                             f"{folder} holds {info['embed_dim']}-dimensional vectors")
        meta = [json.loads(line) for line in (folder / "metadata.jsonl").read_text(encoding="utf-8").splitlines()]
        caps = [json.loads(line) for line in (folder / "captions.jsonl").read_text(encoding="utf-8").splitlines()]
        images = faiss.read_index(str(folder / "images.faiss"))
        captions = faiss.read_index(str(folder / "captions.faiss"))
        set_search_params(images, info["search_params"]["images"])
        set_search_params(captions, info["search_params"]["captions"])
        return cls(folder, info, model, tokenizer, meta, caps, images, captions)

    @torch.inference_mode()
    def embed_text(self, query: str) -> np.ndarray:
        """-> (1, D) float32 unit vector."""
        with self._lock:
            ids, mask = self.tokenizer.encode([query], self.info["text_max_len"])
        return self.model.encode_text(ids, mask).float().numpy()

    @torch.inference_mode()
    def embed_image(self, img: Image.Image) -> np.ndarray:
        """PIL RGB -> (1, D) float32 unit vector, preprocessed as at indexing time."""
        return embed_images(self.model, to_uint8(img, self.info["image_size"])[None]).numpy()

    def _image_hits(self, q: np.ndarray, k: int) -> list[dict]:
        scores, rows = self.images_index.search(q, min(k, self.images_index.ntotal))
        return [{**self.meta[r], "row": int(r), "score": float(s)} for s, r in zip(scores[0], rows[0]) if r >= 0]

    def _caption_hits(self, q: np.ndarray, k: int) -> list[dict]:
        if self.captions_index.ntotal == 0:
            return []
        scores, rows = self.captions_index.search(q, min(k, self.captions_index.ntotal))
        return [{**self.captions[r], "score": float(s), "id": self.meta[self.captions[r]["row"]]["id"],
                 "thumbnail": self.meta[self.captions[r]["row"]]["thumbnail"]}
                for s, r in zip(scores[0], rows[0]) if r >= 0]

    def search_text(self, query: str, k: int = 10) -> list[dict]:
        """Text -> the k best images, best first: metadata + row + score."""
        return self._image_hits(self.embed_text(query), k)

    def search_image(self, img: Image.Image, k: int = 10) -> dict:
        """Image -> {"images": k most similar images, "captions": k best-matching captions}, best first."""
        q = self.embed_image(img)
        return {"images": self._image_hits(q, k), "captions": self._caption_hits(q, k)}

"""The search service: a web page and a JSON API over one index folder.

    GET  /                         the search page (static/index.html; `/?q=...` searches on load)
    GET  /api/health               index size, kind and checkpoint
    GET  /api/search?q=...&k=10    text -> images, best first
    POST /api/search/image?k=10    multipart field `file`: image -> similar images + matching captions
    GET  /thumbs/NAME              a thumbnail, only from the index folder's thumbs/

User input is checked before it reaches the model: every bad request gets a 4xx whose `detail`
names what was wrong (empty or over-long query, k out of range, not an image, too large).
"""
from __future__ import annotations

import io
import re
import warnings
from pathlib import Path

from fastapi import FastAPI, File, HTTPException, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from PIL import Image
from starlette.exceptions import HTTPException as StarletteHTTPException

from vlp.data.formats import BadImageError, Record, load_image
from vlp.search import check_rerank
from vlp.search.index import SearchIndex

STATIC = Path(__file__).parent / "static"
MAX_QUERY_CHARS = 256
MAX_K = 100
MAX_UPLOAD_BYTES = 5 * 2**20           # 5 MiB: create_app's default upload limit
FRAMING = 2**16                        # request bytes allowed on top of the file: multipart boundaries and headers
MAX_PIXELS = 40_000_000                # width * height of an uploaded image
MAX_ASPECT = 20                        # longer side / shorter side: the centre crop would blow up otherwise
THUMB_NAME = re.compile(r"[0-9]{6}\.png")
HIDDEN = ("image", "row")              # server paths and internal rows stay private


def _check_query(q: str) -> str:
    query = " ".join(q.split())
    if not query:
        raise HTTPException(400, "query is empty: pass q=some words (English or Chinese)")
    if len(query) > MAX_QUERY_CHARS:
        raise HTTPException(400, f"query is {len(query)} characters long; the limit is {MAX_QUERY_CHARS}")
    return query


def _check_k(k: int) -> int:
    if not 1 <= k <= MAX_K:
        raise HTTPException(400, f"k must be between 1 and {MAX_K}, got {k}")
    return k


def _public(hit: dict) -> dict:
    """A hit as the API shows it: thumbnail as a URL, no server paths."""
    return {**{k: v for k, v in hit.items() if k not in HIDDEN}, "thumbnail": f"/thumbs/{hit['thumbnail']}"}


def _read_upload(file: UploadFile, limit: int = MAX_UPLOAD_BYTES) -> Image.Image:
    """The uploaded file as a PIL RGB image, or a 4xx naming the file and the problem."""
    name = file.filename or "upload"
    data = file.file.read(limit + 1)
    if len(data) > limit:
        raise HTTPException(413, f"{name} is larger than the upload limit of {limit:,} bytes")
    if not data:
        raise HTTPException(400, f"{name} is empty")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as probe:
                w, h = probe.size
    except Exception as e:        # Pillow's plugins raise many kinds on crafted files; all mean "not an image"
        raise HTTPException(415, f"{name} is not an image this server can read ({type(e).__name__})") from e
    if w * h > MAX_PIXELS:
        raise HTTPException(413, f"{name} is {w}x{h} pixels; the limit is {MAX_PIXELS:,} pixels")
    if max(w, h) > MAX_ASPECT * max(1, min(w, h)):
        raise HTTPException(400, f"{name} is {w}x{h} pixels: sides more than {MAX_ASPECT}:1 are not searchable")
    try:
        return load_image(Record(image=name, captions=[], langs=[], image_id=name, data=data))
    except BadImageError as e:
        raise HTTPException(400, f"{name} cannot be decoded: {e.reason}") from e
    except Exception as e:        # e.g. struct.error or EOFError from a damaged file that passed the probe
        raise HTTPException(400, f"{name} cannot be decoded: {type(e).__name__}: {e}") from e


def _from_parser(detail) -> bool:
    """Whether an HTTPException detail comes from Starlette's form parser rather than from this module."""
    return isinstance(detail, str) and any(w in detail for w in ("multipart", "Content-Disposition", "fields",
                                                                    "files", "Part exceeded"))


class BodyLimit:
    """ASGI middleware: refuse a request body over `limit` bytes by its Content-Length, or while it
    arrives when it has none (chunked), before the multipart parser spools it to disk. The 413 states
    `limit`, the bound enforced here, and `note` what it is made of."""

    def __init__(self, app, limit: int, note: str = ""):
        self.app, self.limit, self.note = app, limit, note

    def _too_large(self, size: str) -> HTTPException:
        return HTTPException(413, f"request body of {size} bytes is larger than the limit of {self.limit:,} bytes"
                                  + (f" ({self.note})" if self.note else ""))

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length", b"0").decode("latin-1")
        if not length.isdigit() or int(length) > self.limit:
            error = self._too_large(f"{int(length):,}") if length.isdigit() else \
                HTTPException(400, f"bad Content-Length header {length!r}")
            return await JSONResponse({"detail": error.detail}, error.status_code)(scope, receive, send)
        received = 0

        async def counted():
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.limit:                   # raised inside the endpoint: FastAPI answers it
                raise self._too_large(f"more than {self.limit:,}")
            return message
        await self.app(scope, counted, send)


def create_app(index: str | Path | SearchIndex, rerank: str | Path | None = None,
               max_upload_bytes: int = MAX_UPLOAD_BYTES) -> FastAPI:
    """The FastAPI app over an index folder (or an already loaded SearchIndex). An uploaded image may
    have `max_upload_bytes`; its request body that plus `FRAMING` (refused before it is parsed)."""
    check_rerank(rerank)
    idx = index if isinstance(index, SearchIndex) else SearchIndex.load(index)
    thumbs = (idx.folder / "thumbs").resolve()
    app = FastAPI(title="vlp search", docs_url="/api/docs", redoc_url=None)

    @app.exception_handler(RequestValidationError)
    async def clear_validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        parts = [f"{e['loc'][-1]}: {e['msg']}" + (f" (got {repr(e['input'])[:80]})" if e.get("input") is not None else "")
                 for e in exc.errors()]
        return JSONResponse({"detail": "; ".join(parts)}, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def explain_bad_multipart(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        """Starlette's multipart parser says "Invalid multipart data." and the like: say what to send."""
        detail = exc.detail
        if request.url.path == "/api/search/image" and exc.status_code == 400 and _from_parser(detail):
            detail = f"{detail.rstrip('.')}: send the image as multipart/form-data with the field `file`"
        return JSONResponse({"detail": detail}, status_code=exc.status_code, headers=exc.headers)

    app.add_middleware(BodyLimit, limit=max_upload_bytes + FRAMING,
                       note=f"an image of at most {max_upload_bytes:,} bytes plus {FRAMING:,} for multipart framing")

    @app.get("/", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(STATIC / "index.html", media_type="text/html")

    @app.get("/api/health")
    def health() -> dict:
        return {"status": "ok", "images": idx.images_index.ntotal, "captions": idx.captions_index.ntotal,
                "kind": idx.info["kind"], "checkpoint": idx.info["checkpoint"], "max_k": MAX_K,
                "max_query_chars": MAX_QUERY_CHARS, "max_upload_bytes": max_upload_bytes}

    @app.get("/api/search")
    def search_text(q: str = "", k: int = 10) -> dict:
        query, k = _check_query(q), _check_k(k)
        return {"query": query, "results": [_public(h) for h in idx.search_text(query, k)]}

    @app.post("/api/search/image")
    def search_image(file: UploadFile = File(...), k: int = 10) -> dict:
        k = _check_k(k)
        found = idx.search_image(_read_upload(file, max_upload_bytes), k)
        return {"results": [_public(h) for h in found["images"]],
                "captions": [_public(c) for c in found["captions"]]}

    @app.get("/thumbs/{name:path}", include_in_schema=False)
    def thumbnail(name: str) -> FileResponse:
        # the name is checked before it touches the file system: six digits + .png, nothing else
        path = thumbs / name if THUMB_NAME.fullmatch(name) else None
        if path is None or path.resolve().parent != thumbs or not path.is_file():
            raise HTTPException(404, f"no thumbnail named {name[:80]!r} in this index")
        return FileResponse(path, media_type="image/png", headers={"Cache-Control": "max-age=86400"})

    return app


def serve(index: str | Path, host: str = "127.0.0.1", port: int = 8000, rerank: str | Path | None = None,
          threads: int = 1, log_level: str = "info") -> None:
    """Load the index and serve it with uvicorn until interrupted.

    `threads`: PyTorch and FAISS threads per request. Requests already run side by side (uvicorn's
    thread pool), and one query is too small to split: on a busy machine two OpenMP threads per
    query wait on each other (measured: p50 0.9 ms with 1 thread, 224 ms with 2, text query on 2
    loaded cores)."""
    import faiss
    import torch
    import uvicorn
    if threads < 1:
        raise ValueError(f"threads must be at least 1, got {threads}")
    torch.set_num_threads(threads)
    faiss.omp_set_num_threads(threads)
    app = create_app(index, rerank)
    print(f"serving {index} on http://{host}:{port}/  (JSON API under /api, Ctrl-C stops)")
    uvicorn.run(app, host=host, port=port, log_level=log_level)

"""Image-text manifests in the formats users bring -> one `Record` per image, plus a `SkipReport`.

Formats: Karpathy split JSON (`dataset_coco.json`), COCO captions JSON (`captions_val2014.json`),
CSV / TSV / JSONL manifests with `filepath` + `caption` columns (as OpenCLIP reads them), and
WebDataset tar shards as img2dataset writes them (one `.tar`, a `{00000..00009}` brace pattern, or a
folder of `.tar` files). Bad input never crashes deep inside a loader and is never dropped silently:
it is skipped and counted in the report, with a few examples that name the file and line.
"""
from __future__ import annotations

import csv
import io
import json
import os
import tarfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

SUPPORTED = ("Karpathy split JSON, COCO captions JSON, CSV/TSV/JSONL manifests (filepath + caption columns), "
             "WebDataset .tar shards (one file, a {00000..00009} brace pattern, or a folder of .tar files)")
IMAGE_KEYS = ("filepath", "image", "image_path", "file_name", "filename")   # first one present is used
CAPTION_KEYS = ("caption", "title", "text")                                 # "title" is OpenCLIP's default
SHARD_IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
KARPATHY_KEYS = {"filename", "filepath", "split", "imgid", "sentences", "sentids", "tags"}
MAX_EXAMPLES = 5


@dataclass
class Record:
    """One image with all its captions, whatever file format it came from."""
    image: str                 # absolute path of the image file, or for WebDataset "shard.tar#KEY"
    captions: list[str]
    langs: list[str]           # language per caption ("en", "zh", ... or "" when unknown)
    image_id: str
    split: str = ""            # train | val | test | restval | "" (unknown)
    tags: list[str] = field(default_factory=list)
    meta: dict = field(default_factory=dict)
    data: bytes | None = None  # image bytes when the image lives inside a shard


@dataclass
class SkipReport:
    """What was skipped and why: a count per reason and up to 5 examples each."""
    counts: Counter = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)

    def add(self, reason: str, example: str) -> None:
        self.counts[reason] += 1
        shown = self.examples.setdefault(reason, [])
        if len(shown) < MAX_EXAMPLES:
            shown.append(example)

    def total(self) -> int:
        return sum(self.counts.values())

    def merge(self, other: SkipReport) -> None:
        for reason, n in other.counts.items():
            self.counts[reason] += n
            shown = self.examples.setdefault(reason, [])
            shown.extend(other.examples.get(reason, [])[:MAX_EXAMPLES - len(shown)])

    def summary(self) -> str:
        """One line per reason, most frequent first."""
        if not self.counts:
            return "nothing skipped"
        return "\n".join(f"{reason}: {n} (e.g. {'; '.join(self.examples.get(reason, []))})"
                         for reason, n in self.counts.most_common())


class BadImageError(Exception):
    """An image that cannot be decoded; loaders catch it to skip and count."""

    def __init__(self, image: str, reason: str):
        super().__init__(f"cannot read image {image}: {reason}")
        self.image, self.reason = image, reason


def load_image(record: Record) -> Image.Image:
    """Decode a record's image as RGB (transparent pixels composited on white) or raise BadImageError."""
    source = io.BytesIO(record.data) if record.data is not None else record.image
    try:
        with Image.open(source) as img:
            img.load()
            if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info:
                rgba = img.convert("RGBA")
                white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
                return Image.alpha_composite(white, rgba).convert("RGB")
            return img.convert("RGB")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise BadImageError(record.image, f"{type(e).__name__}: {e}") from e


def _check_image(record: Record) -> str | None:
    """Why the image is unreadable (open + verify, then a cheap reduced decode), or None if it is fine."""
    def source():
        return io.BytesIO(record.data) if record.data is not None else record.image
    try:
        with Image.open(source()) as img:
            img.verify()
        with Image.open(source()) as img:     # verify() leaves the image unusable: reopen to decode
            img.draft("RGB", (64, 64))        # JPEG: decode at reduced scale, still catches truncation
            img.load()
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        return f"{type(e).__name__}: {e}"
    return None


# --- public entry point ------------------------------------------------------------------------------

def read_records(path: str | Path, image_root: str | Path | None = None, split: str | None = None,
                 lang: str | None = None, check_images: bool = False) -> tuple[list[Record], SkipReport]:
    """Read any supported manifest -> (records, skip report).

    image_root: folder relative image paths resolve against (default: the manifest's folder; Karpathy
    JSON resolves `filepath/filename` under it). split: keep only records of exactly that split
    (Karpathy "restval" is its own split: pass it explicitly; a COCO captions file holds one split, so
    its records take the split asked for). lang: keep only captions of that language.
    check_images: also open and verify every image (slower); failures are skipped and counted.
    """
    kind, files = _detect(path)
    root = Path(image_root) if image_root else files[0].parent      # shards hold their images: root unused
    report = SkipReport()
    if kind == "webdataset":
        records = _read_shards(files, report)
    elif kind in ("csv", "tsv"):
        records = _read_table(files[0], "\t" if kind == "tsv" else _sniff_separator(files[0]), root, report)
    elif kind == "jsonl":
        records = _read_jsonl(files[0], root, report)
    else:
        records = _read_json(files[0], root, split, report)
    return _select(records, split, lang, check_images, report), report


def _detect(path: str | Path) -> tuple[str, list[Path]]:
    """(format, files): by brace pattern, folder, extension, then content."""
    text = str(path)
    if "{" in text and "}" in text and not Path(text).exists():       # brace pattern: shards/{00000..00009}.tar
        import webdataset as wds
        shards = [Path(u) for u in wds.SimpleShardList(text).urls]
        missing = [str(s) for s in shards if not s.is_file()]
        if missing:
            raise FileNotFoundError(f"{len(missing)} of {len(shards)} shards of {text} do not exist, e.g. {missing[0]}")
        return "webdataset", shards
    p = Path(path)
    if p.is_dir():
        shards = sorted(p.glob("*.tar"))
        if not shards:
            raise ValueError(f"{p} is a folder without .tar shards; supported formats: {SUPPORTED}")
        return "webdataset", shards
    if not p.is_file():
        raise FileNotFoundError(f"manifest {p} does not exist (supported formats: {SUPPORTED})")
    by_ext = {".tar": "webdataset", ".json": "json", ".jsonl": "jsonl", ".ndjson": "jsonl", ".csv": "csv",
              ".tsv": "tsv"}
    if p.suffix.lower() in by_ext:
        return by_ext[p.suffix.lower()], [p]
    if tarfile.is_tarfile(p):
        return "webdataset", [p]
    with open(p, encoding="utf-8", errors="replace") as f:
        head = f.readline()
    if head.lstrip().startswith(("{", "[")):
        try:
            json.loads(p.read_text(encoding="utf-8", errors="replace"))
            return "json", [p]
        except json.JSONDecodeError:
            return "jsonl", [p]
    columns = {c.strip().strip('"') for c in head.replace("\t", ",").split(",")}
    if columns & set(IMAGE_KEYS) and columns & set(CAPTION_KEYS):
        return ("tsv" if "\t" in head else "csv"), [p]
    raise ValueError(f"{p}: unknown manifest format; supported formats: {SUPPORTED}")


def _select(records: list[Record], split: str | None, lang: str | None, check_images: bool,
            report: SkipReport) -> list[Record]:
    """Apply the split / language filters; drop (and count) records without captions or a readable image."""
    kept = []
    for r in records:
        if split is not None and r.split != split:
            if not r.split:
                report.add(f"record without a split (split={split!r} asked)", r.image_id)
            continue
        if not r.captions:
            report.add("no captions", f"{r.image_id} ({r.image})")
            continue
        if lang is not None:
            for lg in r.langs:
                if not lg:
                    report.add(f"caption without a language (lang={lang!r} asked)", r.image_id)
            pairs = [(c, lg) for c, lg in zip(r.captions, r.langs) if lg == lang]
            if not pairs:
                continue
            r.captions, r.langs = [c for c, _ in pairs], [lg for _, lg in pairs]
        if r.data is None and not Path(r.image).exists():
            report.add("missing image file", r.image)
        elif check_images and (why := _check_image(r)) is not None:
            report.add("corrupt image", f"{r.image}: {why}")
        else:
            kept.append(r)
    return kept


# --- readers ------------------------------------------------------------------------------------------

def _caption(text: object, where: str, report: SkipReport) -> str | None:
    """The caption stripped, or None (counted) when it is missing, not text, or blank."""
    if not isinstance(text, str) or not text.strip():
        report.add("empty caption", where)
        return None
    return text.strip()


def _resolve(root: Path, *parts: str) -> str:
    return os.path.abspath(Path(root, *[p for p in parts if p]))


def _read_json(path: Path, root: Path, split: str | None, report: SkipReport) -> list[Record]:
    """Karpathy split JSON, COCO captions JSON, or a JSON list of manifest rows."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data":          # one JSON object per line under a .json name: read it as JSONL
            return _read_jsonl(path, root, report)
        raise ValueError(f"{path}: not valid JSON (line {e.lineno}: {e.msg}); supported formats: {SUPPORTED}") from e
    if isinstance(data, list):
        for i in [i for i, row in enumerate(data) if not isinstance(row, dict)]:
            report.add("malformed row", f"{path} item {i + 1}: not a JSON object")
        rows = [(i + 1, r) for i, r in enumerate(data) if isinstance(r, dict)]
        return _merge_rows(rows, f"{path} item", root, report)
    images = data.get("images") if isinstance(data, dict) else None
    if isinstance(images, list) and "annotations" in data:
        return _read_coco(data, path, root, split or "", report)
    looks_karpathy = not images or any(isinstance(im, dict) and "sentences" in im for im in images[:100])
    if isinstance(images, list) and looks_karpathy:
        return _read_karpathy(images, path, root, report)
    raise ValueError(f"{path}: JSON but neither Karpathy (images[].sentences) nor COCO captions (images + "
                     f"annotations); supported formats: {SUPPORTED}")


def _read_karpathy(images: list, path: Path, root: Path, report: SkipReport) -> list[Record]:
    records = []
    for i, im in enumerate(images):
        where = f"{path}: images[{i}]"
        if not isinstance(im, dict) or not isinstance(im.get("filename"), str) \
                or not isinstance(im.get("sentences"), list):
            report.add("malformed entry", f"{where} (needs filename and sentences)")
            continue
        captions, langs = [], []
        for j, s in enumerate(im["sentences"]):
            s = s if isinstance(s, dict) else {}
            raw = s.get("raw", " ".join(s.get("tokens") or []))
            if (text := _caption(raw, f"{where}.sentences[{j}]", report)) is not None:
                captions.append(text)
                langs.append(str(s.get("lang", "")))
        tags = im.get("tags", [])
        records.append(Record(
            image=_resolve(root, im.get("filepath", ""), im["filename"]), captions=captions, langs=langs,
            image_id=str(im.get("imgid", im["filename"])), split=str(im.get("split", "")),
            tags=[str(t) for t in tags] if isinstance(tags, list) else [str(tags)],
            meta={k: v for k, v in im.items() if k not in KARPATHY_KEYS}))
    return records


def _read_coco(data: dict, path: Path, root: Path, split: str, report: SkipReport) -> list[Record]:
    by_id: dict[str, Record] = {}
    for i, im in enumerate(data["images"]):
        if not isinstance(im, dict) or "id" not in im or not isinstance(im.get("file_name"), str):
            report.add("malformed entry", f"{path}: images[{i}] (needs id and file_name)")
            continue
        meta = {k: v for k, v in im.items() if k not in ("id", "file_name")}
        by_id[str(im["id"])] = Record(image=_resolve(root, im["file_name"]), captions=[], langs=[],
                                      image_id=str(im["id"]), split=split, meta=meta)
    for i, ann in enumerate(data["annotations"]):
        where = f"{path}: annotations[{i}]"
        record = by_id.get(str(ann.get("image_id"))) if isinstance(ann, dict) else None
        if record is None:
            report.add("caption for an unknown image_id", where)
        elif (text := _caption(ann.get("caption"), where, report)) is not None:
            record.captions.append(text)
            record.langs.append("")
    return list(by_id.values())


def _sniff_separator(path: Path) -> str:
    """OpenCLIP writes tab-separated .csv files by default: use a tab when the header has one."""
    with open(path, encoding="utf-8", errors="replace") as f:
        return "\t" if "\t" in f.readline() else ","


def _read_table(path: Path, sep: str, root: Path, report: SkipReport) -> list[Record]:
    with open(path, newline="", encoding="utf-8", errors="replace") as f:
        reader = csv.DictReader(f, delimiter=sep)
        header = reader.fieldnames or []
        if not set(header) & set(IMAGE_KEYS) or not set(header) & set(CAPTION_KEYS):
            raise ValueError(f"{path}: columns {header} need an image column (one of {IMAGE_KEYS}) and a "
                             f"caption column (one of {CAPTION_KEYS})")
        rows = []
        while True:
            try:
                row = next(reader)
            except StopIteration:
                break
            except csv.Error as e:
                report.add("malformed row", f"{path}:{reader.line_num}: {e}")
                continue
            if None in row or None in row.values():
                report.add("malformed row", f"{path}:{reader.line_num}: expected {len(header)} fields")
            else:
                rows.append((reader.line_num, row))
    return _merge_rows(rows, str(path), root, report)


def _read_jsonl(path: Path, root: Path, report: SkipReport) -> list[Record]:
    rows = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                report.add("malformed line", f"{path}:{n}: {e.msg}")
                continue
            if isinstance(row, dict):
                rows.append((n, row))
            else:
                report.add("malformed line", f"{path}:{n}: not a JSON object")
    return _merge_rows(rows, str(path), root, report)


def _merge_rows(rows: list[tuple[int, dict]], where: str, root: Path, report: SkipReport) -> list[Record]:
    """Manifest rows (line number, fields) -> one record per image, captions in row order."""
    by_key: dict[str, Record] = {}
    for n, row in rows:
        image = next((row[k] for k in IMAGE_KEYS if row.get(k)), None)
        if not isinstance(image, str):
            report.add("row without an image path", f"{where}:{n}")
            continue
        caption = next((row[k] for k in CAPTION_KEYS if k in row), None)
        if (text := _caption(caption, f"{where}:{n}", report)) is None:
            continue
        path = _resolve(root, image)
        key = str(row.get("image_id") or path)
        split = str(row.get("split") or "")
        record = by_key.setdefault(key, Record(image=path, captions=[], langs=[], split=split, meta=_row_meta(row),
                                               image_id=str(row.get("image_id") or image)))
        if record.split != split:
            report.add("split differs from an earlier row of the same image", f"{where}:{n}")
            continue
        record.captions.append(text)
        record.langs.append(str(row.get("lang") or ""))
        tags = row.get("tags") or []
        for tag in (tags.split(";") if isinstance(tags, str) else tags):
            if str(tag).strip() and str(tag).strip() not in record.tags:
                record.tags.append(str(tag).strip())
    return list(by_key.values())


def _row_meta(row: dict) -> dict:
    known = set(IMAGE_KEYS) | set(CAPTION_KEYS) | {"image_id", "split", "lang", "tags"}
    return {k: v for k, v in row.items() if k not in known}


def _read_shards(shards: list[Path], report: SkipReport) -> list[Record]:
    """img2dataset shards: KEY.jpg|png|webp + KEY.txt (caption) + optional KEY.json (metadata)."""
    import webdataset as wds
    records, failed = [], set()
    for shard in shards:
        shard_name = os.path.abspath(shard)

        def on_error(e: Exception, shard_name: str = shard_name) -> bool:
            if shard_name not in failed:      # webdataset reports one broken tar at two levels: count it once
                failed.add(shard_name)
                report.add("unreadable shard", f"{shard_name}: {type(e).__name__}: {e.args[0] if e.args else e}")
            return True  # keep the samples read so far, go on with the next shard

        samples = wds.WebDataset([shard_name], shardshuffle=False, handler=on_error, nodesplitter=None,
                                 workersplitter=None, empty_check=False)
        for s in samples:
            name = f"{shard_name}#{s['__key__']}"
            ext = next((e for e in SHARD_IMAGE_EXTS if e in s), None)
            if ext is None:
                report.add("sample without an image", name)
                continue
            try:
                meta = json.loads(s["json"]) if "json" in s else {}
                meta = meta if isinstance(meta, dict) else {"json": meta}
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                report.add("malformed sample json", f"{name}: {e}")
                meta = {}
            caption = s["txt"].decode("utf-8", errors="replace") if "txt" in s else meta.pop("caption", None)
            meta.pop("caption", None)
            if (text := _caption(caption, name, report)) is None:
                continue
            records.append(Record(image=name, captions=[text], langs=[str(meta.pop("lang", ""))],
                                  image_id=s["__key__"], split=str(meta.pop("split", "")), meta=meta, data=s[ext]))
    return records

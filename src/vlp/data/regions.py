"""Region features on disk: a memory-mapped store, and the bottom-up-attention exchange formats.

ImageBERT (Qi et al. 2020, "Embedding modeling") reads per image up to K detector regions, each a feature vector,
a box and the detector's class distribution. Such features are usually precomputed once, in one of
the two formats of bottom-up attention (Anderson et al. 2018), both read and written here:

- **TSV** (`read_butd_tsv`, `write_butd_tsv`): one image per line, no header, tab-separated fields
  `image_id, image_w, image_h, num_boxes, boxes, features` and optionally `cls_prob`; the last
  ones are base64 of float32 arrays (num_boxes, 4), (num_boxes, F) and (num_boxes, C).
- **npz** (`read_butd_npz`, `write_butd_npz`): one `<image_id>.npz` per image with keys `x`
  (num_bbox, F), `bbox` (num_bbox, 4), `num_bbox`, `image_h`, `image_w`, optionally `cls_prob`;
  other keys (such as the pickled `info` some extractors add) are ignored.

**Boxes are x1, y1, x2, y2 in pixels of the image everywhere in this module**, as in both formats.
Convert at the edges with `torchvision.ops.box_convert`: COCO and scene boxes are x, y, w, h
(`box_convert(b, "xywh", "xyxy")`), and `vlp.encoders.regions.box_features` takes x, y, w, h
(`box_convert(b, "xyxy", "xywh")`).

The store (`RegionStore`) is a folder; each array is opened with `numpy.load(mmap_mode="r")`, so
opening reads only the ids and a lookup reads only its own rows:

    features.npy   (N, F) float16 or float32   all regions, image after image
    boxes.npy      (N, 4) float32              x1, y1, x2, y2 pixels
    cls_prob.npy   (N, C) float16              class distribution per region (C = 0 if the source had none)
    offsets.npy    (M, 4) int64                per image: first region row, region count, image_w, image_h
    index.json     the M image ids (offsets.npy order), class names, box format, free-form `info`

    RegionStore.write("feats/val", items)          # items: dicts as `read_butd_tsv` yields them
    store = RegionStore("feats/val")
    store["42"]      # {"features" (K, F) float32, "boxes" (K, 4), "cls_prob" (K, C) float32, "image_w", "image_h"}
    write_butd_tsv("val.tsv", store.items())       # and back to an exchange format
"""
from __future__ import annotations

import base64
import binascii
import json
import os
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from vlp.data.files import move_into_place

STORE_VERSION = 1
ARRAYS = ("features", "boxes", "cls_prob", "offsets")
BUTD_FIELDS = ("image_id", "image_w", "image_h", "num_boxes", "boxes", "features")   # + optional "cls_prob"
NPZ_KEYS = ("x", "bbox", "num_bbox", "image_h", "image_w")                          # + optional "cls_prob"


# --- the store --------------------------------------------------------------------------------------

class RegionStore:
    """A folder of region features, read by image id. Cheap to pickle (DataLoader workers reopen the maps)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        index = self.path / "index.json"
        if not index.is_file():
            raise FileNotFoundError(f"{self.path} is not a region store (no index.json; write one with "
                                    "RegionStore.write, store_from_tsv or store_from_npz_dir)")
        meta = json.loads(index.read_text(encoding="utf-8"))
        if meta.get("version") != STORE_VERSION or meta.get("box_format") != "xyxy":
            raise ValueError(f"{index}: store version {meta.get('version')} / box format {meta.get('box_format')}, "
                             f"expected version {STORE_VERSION} with xyxy boxes")
        self.class_names: list[str] = meta["class_names"]
        self.info: dict = meta.get("info", {})
        self._ids: list[str] = meta["ids"]
        self._row = {image_id: i for i, image_id in enumerate(self._ids)}
        self._maps: dict[str, np.ndarray] | None = None

    def _array(self, name: str) -> np.ndarray:
        if self._maps is None:
            self._maps = {a: np.load(self.path / f"{a}.npy", mmap_mode="r") for a in ARRAYS}
        return self._maps[name]

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_maps": None}

    @property
    def features(self) -> np.ndarray:
        """(N, F) memory map of every region's feature."""
        return self._array("features")

    @property
    def boxes(self) -> np.ndarray:
        """(N, 4) memory map of every region's x1, y1, x2, y2."""
        return self._array("boxes")

    @property
    def cls_prob(self) -> np.ndarray:
        """(N, C) memory map of every region's class distribution."""
        return self._array("cls_prob")

    def __len__(self) -> int:
        return len(self._ids)

    def __contains__(self, image_id) -> bool:
        return str(image_id) in self._row

    def ids(self) -> list[str]:
        return list(self._ids)

    def __getitem__(self, image_id) -> dict:
        """-> features (K, F) float32, boxes (K, 4) float32 xyxy, cls_prob (K, C) float32, image_w, image_h."""
        i = self._row.get(str(image_id))
        if i is None:
            raise KeyError(f"image {image_id!r} is not in the region store {self.path} ({len(self)} images)")
        offset, count, width, height = (int(v) for v in self._array("offsets")[i])
        rows = slice(offset, offset + count)
        return {name: torch.from_numpy(np.array(self._array(name)[rows], dtype=np.float32))
                for name in ("features", "boxes", "cls_prob")} | {"image_w": width, "image_h": height}

    def items(self) -> Iterator[dict]:
        """Every image as a dict with its `image_id`, in store order (what the format writers take)."""
        for image_id in self._ids:
            yield {"image_id": image_id, **self[image_id]}

    @staticmethod
    def write(path: str | Path, items: Iterable[dict], feature_dtype: str = "float16",
              class_names: list[str] | None = None, info: dict | None = None, overwrite: bool = False,
              progress: bool = False) -> RegionStore:
        """Write a store from dicts with image_id, image_w, image_h, features (K, F), boxes (K, 4) xyxy and
        optionally cls_prob (K, C) (numpy arrays or CPU tensors). Streams: memory holds one image at a time.
        Built in a temporary folder renamed into place, so a store that exists is complete."""
        path = Path(path)
        if path.exists() and not overwrite:
            raise FileExistsError(f"{path} already exists (pass overwrite=True to replace it)")
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        try:
            items = tqdm(items, desc=f"write {path.name}", unit="image", disable=not progress)
            _write_into(tmp, items, np.dtype(feature_dtype), class_names, info or {})
            move_into_place(tmp, path)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return RegionStore(path)


def _write_into(folder: Path, items: Iterable[dict], feature_dtype: np.dtype, class_names: list[str] | None,
                info: dict) -> None:
    """Append each image's arrays to raw files, then wrap them as .npy and write offsets and index."""
    dtypes = {"features": feature_dtype, "boxes": np.dtype(np.float32), "cls_prob": np.dtype(np.float16)}
    widths: dict[str, int] = {}
    ids, offsets, seen, total = [], [], set(), 0
    raw = {name: open(folder / f"{name}.raw", "wb") for name in dtypes}
    try:
        for item in items:
            image_id = str(item["image_id"])
            if image_id in seen:
                raise ValueError(f"image id {image_id!r} appears twice")
            seen.add(image_id)
            arrays = _item_arrays(item, widths)
            for name, array in arrays.items():
                raw[name].write(np.ascontiguousarray(array, dtype=dtypes[name]).tobytes())
            count = len(arrays["boxes"])
            ids.append(image_id)
            offsets.append((total, count, int(item["image_w"]), int(item["image_h"])))
            total += count
    finally:
        for f in raw.values():
            f.close()
    if not ids:
        raise ValueError("no images to write")
    if class_names is not None and widths["cls_prob"] not in (0, len(class_names)):
        raise ValueError(f"cls_prob has {widths['cls_prob']} classes but {len(class_names)} class names were given")
    for name, dtype in dtypes.items():
        _raw_to_npy(folder / f"{name}.raw", folder / f"{name}.npy", dtype, (total, widths[name]))
    np.save(folder / "offsets.npy", np.asarray(offsets, dtype=np.int64).reshape(-1, 4))
    index = {"version": STORE_VERSION, "box_format": "xyxy", "feature_dtype": feature_dtype.name,
             "images": len(ids), "regions": total, "feature_dim": widths["features"],
             "class_names": class_names or [], "info": info, "ids": ids}
    (folder / "index.json").write_text(json.dumps(index, ensure_ascii=False), encoding="utf-8")


def _item_arrays(item: dict, widths: dict[str, int]) -> dict[str, np.ndarray]:
    """One item's features (K, F), boxes (K, 4), cls_prob (K, C) (C = 0 when absent), checked against
    each other and against the widths of the first item (recorded in `widths`)."""
    where = f"image {item.get('image_id')!r}"
    boxes = np.asarray(item["boxes"], dtype=np.float32)
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise ValueError(f"{where}: boxes must be (K, 4), got {boxes.shape}")
    count = len(boxes)
    cls_prob = item.get("cls_prob")
    arrays = {"features": np.asarray(item["features"]), "boxes": boxes,
              "cls_prob": np.zeros((count, 0), np.float32) if cls_prob is None else np.asarray(cls_prob)}
    for name, array in arrays.items():
        if array.ndim != 2 or len(array) != count:
            raise ValueError(f"{where}: {name} must be ({count}, ...) like its boxes, got {array.shape}")
        if widths.setdefault(name, array.shape[1]) != array.shape[1]:
            raise ValueError(f"{where}: {name} has width {array.shape[1]}, earlier images {widths[name]}")
    return arrays


def _raw_to_npy(raw: Path, npy: Path, dtype: np.dtype, shape: tuple[int, int]) -> None:
    """Prefix a raw C-order array file with its .npy header (one sequential copy), then remove it."""
    header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": shape}
    with open(npy, "wb") as out, open(raw, "rb") as src:
        np.lib.format.write_array_header_1_0(out, header)
        shutil.copyfileobj(src, out, 1 << 24)
    raw.unlink()


# --- bottom-up-attention TSV ------------------------------------------------------------------------

def read_butd_tsv(path: str | Path) -> Iterator[dict]:
    """-> per line a dict: image_id (str), image_w, image_h (int), boxes (K, 4) float32 xyxy, features (K, F)
    float32, and cls_prob (K, C) float32 when the line has a 7th field. A bad line raises a ValueError
    naming the file, the line and the field."""
    with open(path, encoding="ascii", errors="replace") as f:
        for n, line in enumerate(f, 1):
            line = line.rstrip("\r\n")
            if line:
                yield _parse_tsv_line(line, f"{path}:{n}")


def _parse_tsv_line(line: str, where: str) -> dict:
    cols = line.split("\t")
    if len(cols) not in (len(BUTD_FIELDS), len(BUTD_FIELDS) + 1):
        raise ValueError(f"{where}: {len(cols)} tab-separated fields, expected {len(BUTD_FIELDS)} "
                         f"({', '.join(BUTD_FIELDS)}) or {len(BUTD_FIELDS) + 1} (+ cls_prob)")
    try:
        width, height, count = (int(float(c)) for c in cols[1:4])
    except ValueError:
        raise ValueError(f"{where}: image_w, image_h, num_boxes must be numbers, got {cols[1:4]}") from None
    if count < 0:
        raise ValueError(f"{where}: num_boxes is {count}")
    item = {"image_id": cols[0], "image_w": width, "image_h": height,
            "boxes": _decode(cols[4], count, 4, f"{where}: field 'boxes'"),
            "features": _decode(cols[5], count, None, f"{where}: field 'features'")}
    if len(cols) > len(BUTD_FIELDS):
        item["cls_prob"] = _decode(cols[6], count, None, f"{where}: field 'cls_prob'")
    return item


def _decode(text: str, rows: int, cols: int | None, where: str) -> np.ndarray:
    """base64 of float32 -> (rows, cols) array; cols=None infers it from the size."""
    try:
        buf = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as e:
        raise ValueError(f"{where}: not valid base64 ({e})") from None
    width = cols if cols is not None else (len(buf) // 4 // rows if rows else 0)
    if len(buf) != 4 * rows * width:
        raise ValueError(f"{where}: {len(buf)} bytes are not {rows} rows of float32" + (f" x {cols}" if cols else ""))
    return np.frombuffer(buf, dtype=np.float32).reshape(rows, width)


def write_butd_tsv(path: str | Path, items: Iterable[dict]) -> int:
    """Write items (dicts as `read_butd_tsv` yields, arrays or tensors) as a bottom-up-attention TSV,
    atomically; cls_prob is written as a 7th field when an item has one with C > 0. -> lines written."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    lines = 0
    try:
        with open(tmp, "w", encoding="ascii", newline="\n") as f:
            for item in items:
                fields = [str(item["image_id"]), str(int(item["image_w"])), str(int(item["image_h"])),
                          str(len(item["boxes"])), _encode(item["boxes"]), _encode(item["features"])]
                cls_prob = item.get("cls_prob")
                if cls_prob is not None and np.asarray(cls_prob).size:
                    fields.append(_encode(cls_prob))
                f.write("\t".join(fields) + "\n")
                lines += 1
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return lines


def _encode(array) -> str:
    return base64.b64encode(np.ascontiguousarray(array, dtype=np.float32).tobytes()).decode("ascii")


# --- bottom-up-attention npz ------------------------------------------------------------------------

def read_butd_npz(path: str | Path) -> dict:
    """One `<image_id>.npz` -> the dict `read_butd_tsv` yields (image_id = the file stem). A missing key or
    inconsistent shapes raise a ValueError naming the file and the key."""
    path = Path(path)
    try:
        npz = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: not a readable .npz ({e})") from None
    with npz:
        missing = [k for k in NPZ_KEYS if k not in npz.files]
        if missing:
            raise ValueError(f"{path}: missing key(s) {', '.join(missing)}; a bottom-up-attention .npz has "
                             f"{', '.join(NPZ_KEYS)} (+ optional cls_prob), this one has {', '.join(npz.files)}")
        count = int(npz["num_bbox"])
        item = {"image_id": path.stem, "image_w": int(npz["image_w"]), "image_h": int(npz["image_h"]),
                "boxes": npz["bbox"].astype(np.float32), "features": npz["x"].astype(np.float32)}
        if "cls_prob" in npz.files:
            item["cls_prob"] = npz["cls_prob"].astype(np.float32)
    for key, name in (("bbox", "boxes"), ("x", "features"), ("cls_prob", "cls_prob")):
        array = item.get(name)
        if array is not None and (array.ndim != 2 or len(array) != count or (key == "bbox" and array.shape[1] != 4)):
            raise ValueError(f"{path}: key {key!r} has shape {array.shape}, expected ({count}, "
                             f"{4 if key == 'bbox' else '...'}) for num_bbox={count}")
    return item


def read_npz_dir(folder: str | Path) -> Iterator[dict]:
    """Every `*.npz` of a folder, in name order, through `read_butd_npz`."""
    files = sorted(Path(folder).glob("*.npz"))
    if not files:
        raise FileNotFoundError(f"no .npz files in {folder}")
    for file in files:
        yield read_butd_npz(file)


def write_butd_npz(folder: str | Path, items: Iterable[dict]) -> int:
    """Write each item as `folder/<image_id>.npz` (compressed, keys as `read_butd_npz` reads, cls_prob when
    C > 0), each file atomically. -> files written."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    files = 0
    for item in items:
        image_id = str(item["image_id"])
        if not image_id or Path(image_id).name != image_id:
            raise ValueError(f"image id {image_id!r} cannot be a file name")
        arrays = {"x": np.asarray(item["features"], dtype=np.float32),
                  "bbox": np.asarray(item["boxes"], dtype=np.float32), "num_bbox": np.int64(len(item["boxes"])),
                  "image_h": np.int64(item["image_h"]), "image_w": np.int64(item["image_w"])}
        cls_prob = item.get("cls_prob")
        if cls_prob is not None and np.asarray(cls_prob).size:
            arrays["cls_prob"] = np.asarray(cls_prob, dtype=np.float32)
        tmp = folder / f".{image_id}.npz.tmp"
        with open(tmp, "wb") as f:
            np.savez_compressed(f, **arrays)
        os.replace(tmp, folder / f"{image_id}.npz")
        files += 1
    return files


# --- conversions ------------------------------------------------------------------------------------

def store_from_tsv(tsv: str | Path | list[str | Path], store_dir: str | Path, feature_dtype: str = "float16",
                   class_names: list[str] | None = None, overwrite: bool = False, progress: bool = True
                   ) -> RegionStore:
    """One or several bottom-up-attention TSV files (e.g. the split parts `*.tsv.0`, `*.tsv.1`) -> a store."""
    files = [tsv] if isinstance(tsv, (str, Path)) else list(tsv)
    items = (item for file in files for item in read_butd_tsv(file))
    return RegionStore.write(store_dir, items, feature_dtype, class_names, {"source": [str(f) for f in files]},
                             overwrite, progress)


def store_from_npz_dir(folder: str | Path, store_dir: str | Path, feature_dtype: str = "float16",
                       class_names: list[str] | None = None, overwrite: bool = False, progress: bool = True
                       ) -> RegionStore:
    """A folder of bottom-up-attention `.npz` files -> a store."""
    return RegionStore.write(store_dir, read_npz_dir(folder), feature_dtype, class_names,
                             {"source": str(folder)}, overwrite, progress)

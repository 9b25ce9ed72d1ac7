"""Multi-object scenes built from the emoji set: a small, fully labelled stand-in for COCO.

Each scene is a light canvas with 1-4 emoji pasted at random positions and sizes, all in one drawing
style and all from the scene's own split of the emoji set (test scenes use test emoji only), so
held-out scenes hold held-out objects. Ground truth per scene: tight boxes (x, y, w, h in pixels),
the emoji `hex` and a category id per object, and captions in English and Chinese that name the
objects with their counts ("two cat face emoji and a house" / "两个猫脸和一个房子") and one or two
spatial relations read off the box centres ("a house to the left of a dog face" /
"一个房子在一个狗脸的左边").

Output: `images/*.png`, a Karpathy-style `dataset.json` that `vlp.data.formats.read_records` reads,
COCO-instances files `instances_{train,val,test}.json`, and `counts.json`. Same inputs and seed ->
the same bytes; built in a temporary folder and renamed into place, like `vlp data emoji`.
"""
from __future__ import annotations

import hashlib
import json
import random
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from vlp.data.emoji import STYLES, sort_key, tokens_of
from vlp.data.files import build_folder, stored_counts, write_json

BUILDER_VERSION = 1                  # bump when the output changes for the same inputs
SPLITS = {"train": 0.7, "val": 0.1, "test": 0.2}   # share of the scenes per split
MAX_OBJECTS = 4
REPEAT_PROB = 0.35                   # chance that a further object repeats a kind already in the scene
SCALE = (0.22, 0.45)                 # side of a pasted emoji / side of the canvas
MAX_OVERLAP = 0.1                    # intersection / smaller box area, for any two boxes (so IoU <= 0.1 too)
PLACEMENT_TRIES = 50                 # per object; an object that never fits is left out
MAX_RELATIONS = 2                    # relational captions per scene and language
BACKGROUND = (228, 255)              # range of each background channel: white to light tints
WHITE = 235                          # source pixels with every channel >= WHITE count as background

NUMBERS_EN = {2: "two", 3: "three", 4: "four"}
NUMBERS_ZH = {1: "一个", 2: "两个", 3: "三个", 4: "四个"}
RELATIONS_EN = {"left": "to the left of", "right": "to the right of", "above": "above", "below": "below"}
RELATIONS_ZH = {"left": "左边", "right": "右边", "above": "上面", "below": "下面"}
OPPOSITE = {"left": "right", "right": "left", "above": "below", "below": "above"}


@dataclass(frozen=True)
class Emoji:
    """One emoji of the source set: its names (first en / zh sentence) and one PNG per style."""
    hex: str
    base: str
    split: str
    category_id: int
    en: str
    zh: str
    tag: str
    files: tuple[tuple[str, Path], ...]      # ((style, png path), ...)

    def file(self, style: str) -> Path:
        return dict(self.files)[style]


# --- the source emoji set ---------------------------------------------------------------------------

def load_emoji(emoji: str | Path) -> tuple[list[Emoji], str]:
    """(emoji in code-point order, fingerprint) from an emoji folder or its dataset.json.

    Category ids are 1-based positions in that order, so they are the same in every split and scene set.
    The fingerprint hashes dataset.json and the emoji build settings: a new emoji set means a new build.
    """
    path = Path(emoji)
    manifest = path if path.is_file() else path / "dataset.json"
    if not manifest.is_file():
        raise FileNotFoundError(f"no emoji dataset at {path} (no dataset.json): build it first with "
                                f"`vlp data emoji --out {path}`, or pass --emoji with its folder")
    raw = manifest.read_bytes()
    images = json.loads(raw)["images"]
    source = stored_counts(manifest.parent) or {}
    fingerprint = hashlib.sha256(raw + json.dumps(source.get("settings"), sort_keys=True).encode()).hexdigest()
    by_hex: dict[str, dict] = {}
    for im in images:
        first = by_hex.setdefault(im["hex"], {"im": im, "files": {}})
        first["files"][im["style"]] = manifest.parent / im["filepath"] / im["filename"]
    out = []
    for i, key in enumerate(sorted(by_hex, key=sort_key), 1):
        im, files = by_hex[key]["im"], by_hex[key]["files"]
        names: dict[str, str] = {}
        for sentence in im["sentences"]:
            names.setdefault(sentence["lang"], sentence["raw"])         # the first caption per language
        out.append(Emoji(hex=key, base=im["base"], split=im["split"], category_id=i, en=names["en"],
                         zh=names["zh"], tag=(im.get("tags") or ["emoji"])[0], files=tuple(sorted(files.items()))))
    return out, fingerprint[:16]


def pools(emoji: list[Emoji]) -> dict[tuple[str, str], list[list[Emoji]]]:
    """(split, style) -> groups of emoji sharing a base, so a scene samples base emoji uniformly and
    skin-tone variants do not crowd out everything else."""
    out: dict[tuple[str, str], dict[str, list[Emoji]]] = {}
    for e in emoji:
        for style, _ in e.files:
            out.setdefault((e.split, style), {}).setdefault(e.base, []).append(e)
    return {key: list(groups.values()) for key, groups in out.items()}


def split_sizes(n: int) -> dict[str, int]:
    """Scenes per split: val and test rounded from SPLITS, train takes the rest."""
    val, test = round(n * SPLITS["val"]), round(n * SPLITS["test"])
    return {"train": n - val - test, "val": val, "test": test}


def cutout(png: Path) -> Image.Image:
    """Emoji PNG (RGB on white) -> RGBA with the white surround transparent.

    Only near-white pixels connected to the border become transparent, so white parts inside the
    drawing (eyes, teeth) stay opaque. A drawing that is white all over stays fully opaque.
    """
    with Image.open(png) as img:
        rgb = img.convert("RGB")
    white = np.pad(np.asarray(rgb).min(axis=2) >= WHITE, 1, constant_values=True)
    outside = np.zeros_like(white)
    outside[0], outside[-1], outside[:, 0], outside[:, -1] = True, True, True, True
    while True:                                      # flood fill from the border, one pixel ring a step
        grown = outside.copy()
        grown[1:] |= outside[:-1]
        grown[:-1] |= outside[1:]
        grown[:, 1:] |= outside[:, :-1]
        grown[:, :-1] |= outside[:, 1:]
        grown &= white
        if (grown == outside).all():
            break
        outside = grown
    alpha = np.where(outside[1:-1, 1:-1], 0, 255).astype(np.uint8)
    if not alpha.any():
        alpha[:] = 255
    rgba = rgb.convert("RGBA")
    rgba.putalpha(Image.fromarray(alpha))
    return rgba


# --- geometry -----------------------------------------------------------------------------------------

def overlap(a: list[int], b: list[int]) -> float:
    """Intersection of two [x, y, w, h] boxes over the smaller one's area (>= their IoU)."""
    iw = min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0])
    ih = min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1])
    if iw <= 0 or ih <= 0:
        return 0.0
    return iw * ih / min(a[2] * a[3], b[2] * b[3])


def relation(a: list[int], b: list[int]) -> str:
    """Where box a is relative to box b: left / right / above / below, along the axis on which the
    centres differ most (horizontal on a tie). Image y grows downwards."""
    dx = (2 * a[0] + a[2]) - (2 * b[0] + b[2])      # twice the centre difference: integers only
    dy = (2 * a[1] + a[3]) - (2 * b[1] + b[3])
    if abs(dx) >= abs(dy):
        return "left" if dx < 0 else "right"
    return "above" if dy < 0 else "below"


def place(rng: random.Random, sprite: Image.Image, size: int, boxes: list[list[int]]
          ) -> tuple[Image.Image, tuple[int, int], list[int]] | None:
    """Scale and position one RGBA sprite on a size x size canvas -> (scaled sprite, paste x y, box).

    The box is the tight [x, y, w, h] box of the opaque pixels, inside the canvas, overlapping each
    of `boxes` by at most MAX_OVERLAP. None when PLACEMENT_TRIES random tries all fail.
    """
    for _ in range(PLACEMENT_TRIES):
        side = rng.randint(max(4, round(SCALE[0] * size)), max(4, round(SCALE[1] * size)))
        scaled = sprite.resize((side, side), Image.BILINEAR)
        x0, y0, x1, y1 = scaled.getchannel("A").getbbox() or (0, 0, side, side)
        x, y = rng.randint(-x0, size - x1), rng.randint(-y0, size - y1)
        box = [x + x0, y + y0, x1 - x0, y1 - y0]
        if all(overlap(box, other) <= MAX_OVERLAP for other in boxes):
            return scaled, (x, y), box
    return None


# --- captions -------------------------------------------------------------------------------------------

def phrase_en(name: str, count: int) -> str:
    """'a house', 'an apple', 'two cat face emoji' ('emoji' is its own plural; names are not nouns alone)."""
    if count == 1:
        vowel = name[:1].lower() in "aeiou" and not name.lower().startswith(("uni", "use", "one", "eu"))
        return f"{'an' if vowel else 'a'} {name}"
    return f"{NUMBERS_EN[count]} {name} emoji"


def phrase_zh(name: str, count: int) -> str:
    """'一个房子', '两个猫脸': the general measure word 个 for every object."""
    return f"{NUMBERS_ZH[count]}{name}"


def join_en(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def join_zh(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else "、".join(parts[:-1]) + "和" + parts[-1]


def group_relation(boxes_a: list[list[int]], boxes_b: list[list[int]]) -> str | None:
    """The relation every box of a has to every box of b, or None when they disagree."""
    found = {relation(a, b) for a in boxes_a for b in boxes_b}
    return found.pop() if len(found) == 1 else None


def captions(rng: random.Random, objects: list[tuple[Emoji, list[int]]]) -> list[tuple[str, str]]:
    """(lang, text) pairs: the listing caption in en and zh, then up to MAX_RELATIONS relations in both.

    The listing names each kind once with its count, kinds ordered by their leftmost box. A relation
    is stated between two kinds only when all their boxes agree on it; its direction is random.
    """
    boxes: dict[Emoji, list[list[int]]] = {}
    for e, box in sorted(objects, key=lambda o: (o[1][0] + o[1][2] / 2, o[0].hex)):
        boxes.setdefault(e, []).append(box)
    kinds = list(boxes)
    out = [("en", join_en([phrase_en(e.en, len(boxes[e])) for e in kinds])),
           ("zh", join_zh([phrase_zh(e.zh, len(boxes[e])) for e in kinds]))]
    pairs = [(a, b) for i, a in enumerate(kinds) for b in kinds[i + 1:] if group_relation(boxes[a], boxes[b])]
    for a, b in rng.sample(pairs, min(MAX_RELATIONS, len(pairs))):
        if rng.random() < 0.5:
            a, b = b, a
        rel = group_relation(boxes[a], boxes[b])
        out.append(("en", f"{phrase_en(a.en, len(boxes[a]))} {RELATIONS_EN[rel]} {phrase_en(b.en, len(boxes[b]))}"))
        out.append(("zh", f"{phrase_zh(a.zh, len(boxes[a]))}在{phrase_zh(b.zh, len(boxes[b]))}的{RELATIONS_ZH[rel]}"))
    return out


# --- one scene ------------------------------------------------------------------------------------------

def pick_kinds(rng: random.Random, groups: list[list[Emoji]]) -> list[Emoji]:
    """1..MAX_OBJECTS emoji for one scene: a base emoji uniformly, then one of its variants; each further
    object repeats an earlier kind with probability REPEAT_PROB (so scenes have counts to caption)."""
    kinds: list[Emoji] = []
    for _ in range(rng.randint(1, MAX_OBJECTS)):
        if kinds and rng.random() < REPEAT_PROB:
            kinds.append(rng.choice(kinds))
        else:
            kinds.append(rng.choice(rng.choice(groups)))
    return kinds


def make_scene(rng: random.Random, groups_by_style: dict[str, list[list[Emoji]]], size: int,
               sprites: dict[Path, Image.Image]) -> tuple[Image.Image, str, list[tuple[Emoji, list[int]]]]:
    """-> (RGB size x size canvas, style, [(emoji, [x, y, w, h])] in paste order). `sprites` caches cut-outs."""
    style = rng.choice(sorted(groups_by_style))
    canvas = Image.new("RGB", (size, size), tuple(rng.randint(*BACKGROUND) for _ in range(3)))
    objects: list[tuple[Emoji, list[int]]] = []
    for e in pick_kinds(rng, groups_by_style[style]):
        png = e.file(style)
        if png not in sprites:
            sprites[png] = cutout(png)
        placed = place(rng, sprites[png], size, [box for _, box in objects])
        if placed is not None:
            scaled, xy, box = placed
            canvas.paste(scaled, xy, scaled)        # the alpha channel is the mask
            objects.append((e, box))
    return canvas, style, objects


# --- the build ------------------------------------------------------------------------------------------

def build_scenes(out: str | Path, emoji: str | Path = "data/emoji", n: int = 3000, size: int = 128, seed: int = 0,
                 progress: bool = True) -> dict:
    """Build (or find already built) `n` scenes from the emoji set in `emoji` -> counts (also out/counts.json).

    Idempotent: a folder built with the same settings from the same emoji set is returned as is.
    Atomic: built in a temporary folder next to `out`, then renamed into place.
    """
    if n < 1 or size < 16:
        raise ValueError(f"need n >= 1 scenes and size >= 16 px (got n={n}, size={size})")
    source, fingerprint = load_emoji(emoji)
    out = Path(out)
    settings = {"n": n, "size": size, "seed": seed, "builder": BUILDER_VERSION, "emoji_fingerprint": fingerprint}
    t0 = time.perf_counter()
    counts, built = build_folder(out, settings, lambda tmp: _build_into(tmp, source, settings, progress),
                                 "a scene dataset")
    if built:
        print(summarize(counts, out, time.perf_counter() - t0))
    return counts


def _build_into(folder: Path, source: list[Emoji], settings: dict, progress: bool) -> dict:
    """Draw every scene into folder/images; write dataset.json, instances_<split>.json and counts.json."""
    available = pools(source)
    sizes = split_sizes(settings["n"])
    for split, k in sizes.items():
        if k and not any(key[0] == split for key in available):
            raise ValueError(f"the emoji set has no {split} emoji, so it cannot make {split} scenes")
    (folder / "images").mkdir()
    sprites: dict[Path, Image.Image] = {}
    images, sentid, objid = [], 0, 0
    bar = tqdm(total=settings["n"], desc="draw scenes", disable=not progress, unit="scene")
    for split, k in sizes.items():
        groups = {style: g for (s, style), g in available.items() if s == split}
        for i in range(k):
            rng = random.Random(f"{settings['seed']}:{split}:{i}")        # scene i is the same for any n
            canvas, style, objects = make_scene(rng, groups, settings["size"], sprites)
            name = f"{split}-{i:05d}.png"
            canvas.save(folder / "images" / name)
            sentences = []
            for lang, text in captions(rng, objects):
                sentences.append({"raw": text, "tokens": tokens_of(text, lang), "lang": lang, "sentid": sentid})
                sentid += 1
            images.append({"filename": name, "filepath": "images", "imgid": len(images), "split": split,
                           "style": style, "width": settings["size"], "height": settings["size"],
                           "objects": [{"id": objid + j, "hex": e.hex, "category_id": e.category_id, "box": box}
                                       for j, (e, box) in enumerate(objects)],
                           "sentences": sentences})
            objid += len(objects)
            bar.update()
    bar.close()
    write_json(folder / "dataset.json", {"dataset": "emoji-scenes", "images": images})
    for split in SPLITS:
        write_json(folder / f"instances_{split}.json", coco_instances(images, source, split))
    counts = _count(images, settings)
    write_json(folder / "counts.json", counts)
    return counts


def coco_instances(images: list[dict], source: list[Emoji], split: str) -> dict:
    """COCO-instances dict for one split: images, one annotation per object (bbox [x, y, w, h], area =
    box area, no segmentation), and as categories every emoji of that split (id, name, name_zh, hex)."""
    rows = [im for im in images if im["split"] == split]
    return {
        "info": {"description": f"vlp emoji scenes, {split} split"},
        "images": [{"id": im["imgid"], "file_name": f"{im['filepath']}/{im['filename']}", "width": im["width"],
                    "height": im["height"], "style": im["style"]} for im in rows],
        "annotations": [{"id": o["id"], "image_id": im["imgid"], "category_id": o["category_id"], "bbox": o["box"],
                         "area": o["box"][2] * o["box"][3], "iscrowd": 0} for im in rows for o in im["objects"]],
        "categories": [{"id": e.category_id, "name": e.en, "name_zh": e.zh, "hex": e.hex, "supercategory": e.tag}
                       for e in source if e.split == split]}


def _count(images: list[dict], settings: dict) -> dict:
    """Scenes and objects per split, scenes per object count and style, captions per language."""
    captions_per_lang = Counter(s["lang"] for im in images for s in im["sentences"])
    return {"scenes": {s: sum(im["split"] == s for im in images) for s in SPLITS},
            "objects": {s: sum(len(im["objects"]) for im in images if im["split"] == s) for s in SPLITS},
            "objects_per_scene": {str(k): sum(len(im["objects"]) == k for im in images)
                                  for k in range(1, MAX_OBJECTS + 1)},
            "categories_used": {s: len({o["hex"] for im in images if im["split"] == s for o in im["objects"]})
                                for s in SPLITS},
            "styles": {style: sum(im["style"] == style for im in images) for style in STYLES},
            "captions": dict(sorted(captions_per_lang.items())),
            "settings": settings}


def summarize(counts: dict, out: Path | str, seconds: float) -> str:
    """One readable line for the terminal."""
    return (f"emoji scenes in {out}: " + ", ".join(f"{k} {v}" for k, v in counts["scenes"].items())
            + f" scenes; {sum(counts['objects'].values())} objects; captions "
            + ", ".join(f"{k} {v}" for k, v in counts["captions"].items()) + f"; built in {seconds:.1f} s")

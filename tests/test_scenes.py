"""Emoji scenes on the tiny emoji set: split isolation, geometry, captions vs boxes, COCO file, determinism."""
from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from vlp.cli import main
from vlp.data import scenes as sc
from vlp.data.formats import read_records

N, SIZE = 60, 64
COUNT_EN = {1: "an?", 2: "two", 3: "three", 4: "four"}
COUNT_ZH = {1: "一个", 2: "两个", 3: "三个", 4: "四个"}
REL_EN = {"to the left of": "left", "to the right of": "right", "above": "above", "below": "below"}
REL_ZH = {"左边": "left", "右边": "right", "上面": "above", "下面": "below"}


@pytest.fixture(scope="module")
def built(emoji_tiny, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("scenes") / "scenes"
    return out, sc.build_scenes(out, emoji=emoji_tiny.parent, n=N, size=SIZE, progress=False)


@pytest.fixture(scope="module")
def names(emoji_tiny) -> dict[str, dict]:
    """hex -> {"split", "en", "zh"} from the source emoji set."""
    out = {}
    for im in json.loads(emoji_tiny.read_text(encoding="utf-8"))["images"]:
        first = {}
        for s in im["sentences"]:
            first.setdefault(s["lang"], s["raw"])
        out[im["hex"]] = {"split": im["split"], **first}
    return out


def scenes(out: Path) -> list[dict]:
    return json.loads((out / "dataset.json").read_text(encoding="utf-8"))["images"]


def centre(box: list[int]) -> tuple[float, float]:
    return box[0] + box[2] / 2, box[1] + box[3] / 2


def holds(rel: str, a: list[int], b: list[int]) -> bool:
    """Box a is `rel` of box b along the dominant axis of the centre difference."""
    (ax, ay), (bx, by) = centre(a), centre(b)
    dx, dy = ax - bx, ay - by
    horizontal = abs(dx) >= abs(dy)
    return {"left": horizontal and dx < 0, "right": horizontal and dx > 0,
            "above": not horizontal and dy < 0, "below": not horizontal and dy > 0}[rel]


def iou(a: list[int], b: list[int]) -> float:
    iw = max(0, min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0]))
    ih = max(0, min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1]))
    return iw * ih / (a[2] * a[3] + b[2] * b[3] - iw * ih)


def counted(scene: dict) -> Counter:
    return Counter(o["hex"] for o in scene["objects"])


def test_splits_and_files(built):
    out, counts = built
    rows = scenes(out)
    assert counts["scenes"] == {"train": 42, "val": 6, "test": 12} == Counter(r["split"] for r in rows)
    assert [r["imgid"] for r in rows] == list(range(N))
    assert sorted(p.name for p in (out / "images").iterdir()) == sorted(r["filename"] for r in rows)
    for r in rows[:5]:
        with Image.open(out / r["filepath"] / r["filename"]) as img:
            assert img.mode == "RGB" and img.size == (SIZE, SIZE)
    assert sum(counts["objects"].values()) == sum(len(r["objects"]) for r in rows)
    assert json.loads((out / "counts.json").read_text(encoding="utf-8")) == counts


def test_objects_come_from_the_scene_split_and_one_style(built, names):
    rows = scenes(built[0])
    for r in rows:
        assert 1 <= len(r["objects"]) <= sc.MAX_OBJECTS and r["style"] in ("openmoji", "twemoji")
        assert all(names[o["hex"]]["split"] == r["split"] for o in r["objects"])
    assert {r["style"] for r in rows} == {"openmoji", "twemoji"}
    assert any(max(counted(r).values()) > 1 for r in rows)            # some scenes repeat a kind


def test_boxes_inside_canvas_with_bounded_overlap(built):
    for r in scenes(built[0]):
        boxes = [o["box"] for o in r["objects"]]
        for x, y, w, h in boxes:
            assert w > 0 and h > 0 and x >= 0 and y >= 0 and x + w <= SIZE and y + h <= SIZE
        for i, a in enumerate(boxes):
            for b in boxes[i + 1:]:
                assert iou(a, b) <= 0.1 and sc.overlap(a, b) <= sc.MAX_OVERLAP


def test_listing_captions_give_each_kind_with_its_count(built, names):
    for r in scenes(built[0]):
        en, zh = r["sentences"][0], r["sentences"][1]
        assert (en["lang"], zh["lang"]) == ("en", "zh")
        for key, n in counted(r).items():
            plural = " emoji" if n > 1 else ""
            assert re.search(rf"(^|, | and ){COUNT_EN[n]} {re.escape(names[key]['en'] + plural)}(,| and |$)",
                             en["raw"]), (en["raw"], key, n)
            assert f"{COUNT_ZH[n]}{names[key]['zh']}" in zh["raw"]
        assert len(re.findall("个", zh["raw"])) >= len(counted(r))


def parse_relation(text: str, scene: dict, names: dict, lang: str) -> tuple[str, str, str]:
    """(subject hex, relation, object hex): the one reading of the caption that uses the scene's kinds."""
    found = []
    for a, na in counted(scene).items():
        for b, nb in counted(scene).items():
            if a == b:
                continue
            if lang == "en":
                pa = rf"{COUNT_EN[na]} {re.escape(names[a]['en'])}{' emoji' if na > 1 else ''}"
                pb = rf"{COUNT_EN[nb]} {re.escape(names[b]['en'])}{' emoji' if nb > 1 else ''}"
                rels = REL_EN
                m = re.fullmatch(rf"{pa} ({'|'.join(rels)}) {pb}", text)
            else:
                pa, pb = COUNT_ZH[na] + re.escape(names[a]["zh"]), COUNT_ZH[nb] + re.escape(names[b]["zh"])
                rels = REL_ZH
                m = re.fullmatch(rf"{pa}在{pb}的({'|'.join(rels)})", text)
            if m:
                found.append((a, rels[m.group(1)], b))
    assert len(found) == 1, (text, found)
    return found[0]


def test_relational_captions_match_the_boxes(built, names):
    seen = Counter()
    for r in scenes(built[0]):
        boxes = {}
        for o in r["objects"]:
            boxes.setdefault(o["hex"], []).append(o["box"])
        relational = r["sentences"][2:]
        assert len(relational) <= 2 * sc.MAX_RELATIONS
        assert [s["lang"] for s in relational] == ["en", "zh"] * (len(relational) // 2)
        for en, zh in zip(relational[::2], relational[1::2]):
            a, rel, b = parse_relation(en["raw"], r, names, "en")
            assert parse_relation(zh["raw"], r, names, "zh") == (a, rel, b)
            assert all(holds(rel, boxes_a, boxes_b) for boxes_a in boxes[a] for boxes_b in boxes[b])
            seen[rel] += 1
    assert len(seen) >= 3, seen                 # relations of several kinds were captioned


def test_reads_back_through_read_records(built):
    out, counts = built
    records, report = read_records(out / "dataset.json")
    assert report.total() == 0, report.summary()
    assert len(records) == N and all({"en", "zh"} <= set(r.langs) for r in records)
    assert set(records[0].meta) >= {"style", "objects"} and Path(records[0].image).is_file()
    test, _ = read_records(out / "dataset.json", split="test", lang="zh")
    assert len(test) == counts["scenes"]["test"] and all(set(t.langs) == {"zh"} for t in test)
    assert sum(len(r.captions) for r in records) == sum(counts["captions"].values())


def test_coco_instances_agree_with_dataset(built, names):
    out, _ = built
    rows = scenes(out)
    ann_ids = []
    for split in ("train", "val", "test"):
        coco = json.loads((out / f"instances_{split}.json").read_text(encoding="utf-8"))
        mine = [r for r in rows if r["split"] == split]
        assert [im["id"] for im in coco["images"]] == [r["imgid"] for r in mine]
        assert all(im["file_name"] == f"images/{r['filename']}" for im, r in zip(coco["images"], mine))
        categories = {c["id"]: c for c in coco["categories"]}
        expected = [(r["imgid"], o["category_id"], o["box"]) for r in mine for o in r["objects"]]
        assert [(a["image_id"], a["category_id"], a["bbox"]) for a in coco["annotations"]] == expected
        for a in coco["annotations"]:
            assert a["iscrowd"] == 0 and a["area"] == a["bbox"][2] * a["bbox"][3]
            cat = categories[a["category_id"]]
            assert names[cat["hex"]]["split"] == split and cat["name"] == names[cat["hex"]]["en"]
        ann_ids += [a["id"] for a in coco["annotations"]]
        hexes = {o["hex"]: o["category_id"] for r in mine for o in r["objects"]}
        assert all(categories[cid]["hex"] == key for key, cid in hexes.items())
    assert sorted(ann_ids) == list(range(len(ann_ids)))


def test_deterministic_idempotent_and_seed_dependent(built, emoji_tiny, tmp_path):
    out, counts = built
    stamp = (out / "dataset.json").stat().st_mtime_ns
    assert sc.build_scenes(out, emoji=emoji_tiny.parent, n=N, size=SIZE, progress=False) == counts
    assert (out / "dataset.json").stat().st_mtime_ns == stamp                 # nothing rebuilt
    again = tmp_path / "again"
    sc.build_scenes(again, emoji=emoji_tiny, n=N, size=SIZE, progress=False)
    files = sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file())
    assert all((out / f).read_bytes() == (again / f).read_bytes() for f in files)
    other = tmp_path / "other"
    sc.build_scenes(other, emoji=emoji_tiny, n=N, size=SIZE, seed=1, progress=False)
    assert (other / "dataset.json").read_bytes() != (out / "dataset.json").read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again", "other"]    # no temp folders left


def test_interrupted_build_leaves_no_half_dataset(emoji_tiny, tmp_path, monkeypatch):
    calls = []

    def failing_cutout(png):
        calls.append(png)
        if len(calls) > 3:
            raise KeyboardInterrupt
        return Image.new("RGBA", (8, 8), (0, 0, 0, 255))

    monkeypatch.setattr(sc, "cutout", failing_cutout)
    with pytest.raises(KeyboardInterrupt):
        sc.build_scenes(tmp_path / "scenes", emoji=emoji_tiny, n=N, size=SIZE, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_missing_emoji_folder_says_how_to_build_it(tmp_path, capsys):
    missing = tmp_path / "no-emoji"
    with pytest.raises(FileNotFoundError, match=r"no emoji dataset at .*vlp data emoji --out"):
        sc.build_scenes(tmp_path / "scenes", emoji=missing, n=5, progress=False)
    with pytest.raises(SystemExit, match="vlp data emoji --out"):
        main(["data", "emoji-scenes", "--out", str(tmp_path / "scenes"), "--emoji", str(missing)])
    assert not (tmp_path / "scenes").exists()


def test_relation_and_phrases():
    assert sc.relation([0, 0, 10, 10], [20, 5, 10, 10]) == "left"
    assert sc.relation([20, 5, 10, 10], [0, 0, 10, 10]) == "right"
    assert sc.relation([0, 0, 10, 10], [3, 30, 10, 10]) == "above"
    assert sc.relation([3, 30, 10, 10], [0, 0, 10, 10]) == "below"
    assert sc.phrase_en("apple", 1) == "an apple" and sc.phrase_en("unicorn", 1) == "a unicorn"
    assert sc.phrase_en("cat face", 3) == "three cat face emoji" and sc.phrase_zh("猫脸", 2) == "两个猫脸"
    assert sc.join_en(["a", "b", "c"]) == "a, b and c" and sc.join_zh(["甲", "乙", "丙"]) == "甲、乙和丙"
    assert sc.split_sizes(3000) == {"train": 2100, "val": 300, "test": 600}

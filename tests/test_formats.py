"""Every reader on a tiny fixture in its real format, and bad input -> counted skip or clear error."""
from __future__ import annotations

import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest

from vlp.data.formats import BadImageError, Record, SkipReport, load_image, read_records

FIX = Path(__file__).parent / "fixtures" / "formats"
EXPECTED = {  # image_id -> (file name, split, captions), as written by fixtures/formats/make_fixtures.py
    "1": ("red.jpg", "train", ["a red square", "a square painted red"]),
    "2": ("green.png", "val", ["a green square"]),
    "3": ("blue.png", "test", ["a blue square on a clear background", "half of it is see-through"]),
}


def by_id(records: list[Record]) -> dict[str, Record]:
    return {r.image_id: r for r in records}


@pytest.mark.parametrize("name", ["karpathy.json", "manifest.csv", "manifest.tsv", "manifest.jsonl"])
def test_manifests_with_splits_agree(name):
    records, report = read_records(FIX / name)
    assert report.total() == 0, report.summary()
    got = {r.image_id: (Path(r.image).name, r.split, r.captions) for r in records}
    assert got == EXPECTED
    for r in records:
        assert Path(r.image).is_absolute() and Path(r.image).exists()
        assert r.langs == [""] * len(r.captions)
        assert r.data is None


def test_karpathy_extra_fields_go_to_meta_and_split_filter_is_exact():
    records, _ = read_records(FIX / "karpathy.json", split="val")
    assert [r.image_id for r in records] == ["2"]
    assert records[0].meta == {"cocoid": 1002}
    assert read_records(FIX / "karpathy.json", split="restval")[0] == []


def test_coco_captions_group_per_image_and_take_the_asked_split():
    records, report = read_records(FIX / "captions_val2014.json", image_root=FIX / "images", split="val")
    assert report.total() == 0, report.summary()
    assert {r.image_id: (Path(r.image).name, r.split, r.captions) for r in records} == \
        {k: (f, "val", c) for k, (f, _, c) in EXPECTED.items()}
    assert records[0].meta["coco_url"].endswith("red.jpg")
    assert [r.split for r in read_records(FIX / "captions_val2014.json", image_root=FIX / "images")[0]] == [""] * 3


def test_coco_missing_images_without_root_are_counted():
    records, report = read_records(FIX / "captions_val2014.json")   # images live under images/, not next to it
    assert records == [] and report.counts["missing image file"] == 3


@pytest.mark.parametrize("spec", ["shards/00000.tar", "shards/{00000..00001}.tar", "shards"])
def test_webdataset_shards(spec):
    records, report = read_records(FIX / spec if "{" not in spec else f"{FIX}/{spec}")
    assert report.total() == 0, report.summary()
    n = 2 if spec.endswith("00000.tar") else 3
    assert [r.image_id for r in records] == [f"{i:09d}" for i in range(n)]
    for r, (name, split, caps) in zip(records, EXPECTED.values()):
        assert r.captions == caps[:1] and r.split == ""
        assert r.image.split("#")[0].endswith(".tar") and r.image.endswith("#" + r.image_id)
        assert r.data == (FIX / "images" / name).read_bytes()
        assert r.meta["url"].endswith(name) and "caption" not in r.meta


def test_load_image_same_pixels_from_file_and_shard_and_white_behind_transparency():
    files = by_id(read_records(FIX / "karpathy.json")[0])
    shard = read_records(FIX / "shards")[0]
    for r_file, r_shard in zip(files.values(), shard):
        a, b = load_image(r_file), load_image(r_shard)
        assert a.mode == "RGB" and a.size == (8, 8)
        assert np.array_equal(np.asarray(a), np.asarray(b))
    blue = np.asarray(load_image(files["3"]))
    assert tuple(blue[0, 0]) == (30, 40, 230) and tuple(blue[0, 7]) == (255, 255, 255)


def test_lang_filter_keeps_captions_of_one_language(tmp_path):
    shutil.copytree(FIX / "images", tmp_path / "images")
    rows = [{"filepath": "images/red.jpg", "caption": "red", "lang": "en"},
            {"filepath": "images/red.jpg", "caption": "红色", "lang": "zh"},
            {"filepath": "images/green.png", "caption": "绿色", "lang": "zh", "tags": "colour;green"},
            {"filepath": "images/blue.png", "caption": "blue"}]
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    records, report = read_records(tmp_path / "m.jsonl", lang="zh")
    assert [(r.captions, r.langs) for r in records] == [(["红色"], ["zh"]), (["绿色"], ["zh"])]
    assert records[1].tags == ["colour", "green"]
    assert report.counts == {"caption without a language (lang='zh' asked)": 1}
    everything, _ = read_records(tmp_path / "m.jsonl")
    assert [r.langs for r in everything] == [["en", "zh"], ["zh"], [""]]


# --- bad input ----------------------------------------------------------------------------------------

def bad_jsonl(tmp_path: Path) -> Path:
    shutil.copytree(FIX / "images", tmp_path / "images")
    (tmp_path / "images" / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg")
    png = (FIX / "images" / "green.png").read_bytes()
    (tmp_path / "images" / "truncated.png").write_bytes(png[: len(png) // 2])
    lines = [json.dumps({"filepath": "images/red.jpg", "caption": "a red square"}),
             json.dumps({"filepath": "images/red.jpg", "caption": "   "}),          # line 2: empty caption
             '{"filepath": "images/green.png", "caption": "a green',                 # line 3: malformed
             json.dumps({"filepath": "images/missing.jpg", "caption": "gone"}),
             json.dumps({"filepath": "images/blue.png", "caption": ""}),             # line 5: blue has none left
             json.dumps({"filepath": "images/corrupt.jpg", "caption": "broken"}),
             json.dumps({"filepath": "images/truncated.png", "caption": "half a file"}),
             json.dumps({"caption": "no image path"})]
    (tmp_path / "bad.jsonl").write_text("\n".join(lines) + "\n")
    return tmp_path / "bad.jsonl"


def test_bad_rows_are_skipped_and_counted_with_line_numbers(tmp_path):
    records, report = read_records(bad_jsonl(tmp_path))
    assert [r.image_id for r in records] == ["images/red.jpg", "images/corrupt.jpg", "images/truncated.png"]
    assert records[0].captions == ["a red square"]
    assert report.counts == {"empty caption": 2, "malformed line": 1, "missing image file": 1,
                             "row without an image path": 1}
    assert report.examples["malformed line"][0].startswith(f"{tmp_path / 'bad.jsonl'}:3:")
    assert report.examples["empty caption"] == [f"{tmp_path / 'bad.jsonl'}:2", f"{tmp_path / 'bad.jsonl'}:5"]
    assert report.examples["missing image file"] == [str(tmp_path / "images" / "missing.jpg")]
    assert "malformed line: 1" in report.summary()


def test_check_images_counts_corrupt_files(tmp_path):
    records, report = read_records(bad_jsonl(tmp_path), check_images=True)
    assert [r.image_id for r in records] == ["images/red.jpg"]
    assert report.counts["corrupt image"] == 2
    assert any("corrupt.jpg" in e for e in report.examples["corrupt image"])


def test_load_image_raises_bad_image_error_naming_the_file(tmp_path):
    records, _ = read_records(bad_jsonl(tmp_path))
    for r in records[1:]:
        with pytest.raises(BadImageError) as err:
            load_image(r)
        assert err.value.image == r.image and r.image in str(err.value)
    with pytest.raises(BadImageError):
        load_image(Record(image="x.tar#1", captions=["x"], langs=[""], image_id="1", data=b"not an image"))


def test_karpathy_bad_entries_and_all_empty_captions(tmp_path):
    data = json.loads((FIX / "karpathy.json").read_text())
    data["images"][1]["sentences"] = [{"raw": " ", "tokens": []}]
    data["images"].append({"split": "train", "sentences": []})                  # no filename
    (tmp_path / "images").symlink_to(FIX / "images")
    (tmp_path / "k.json").write_text(json.dumps(data))
    records, report = read_records(tmp_path / "k.json")
    assert [r.image_id for r in records] == ["1", "3"]
    assert report.counts == {"empty caption": 1, "no captions": 1, "malformed entry": 1}
    assert report.examples["malformed entry"][0].startswith(f"{tmp_path / 'k.json'}: images[3]")
    _, report = read_records(tmp_path / "k.json", lang="en")
    assert report.counts["no captions"] == 1                 # still counted when a language filter is on


def test_csv_malformed_rows_and_split_conflicts(tmp_path):
    (tmp_path / "images").symlink_to(FIX / "images")
    (tmp_path / "m.csv").write_text("filepath,caption,split\nimages/red.jpg,a red square,train\n"
                                    "images/red.jpg,red again,val\nimages/green.png\n"
                                    'images/blue.png,"a blue, square",test\n')
    records, report = read_records(tmp_path / "m.csv")
    assert [(r.image_id, r.captions, r.split) for r in records] == \
        [("images/red.jpg", ["a red square"], "train"), ("images/blue.png", ["a blue, square"], "test")]
    assert report.counts == {"split differs from an earlier row of the same image": 1, "malformed row": 1}
    assert report.examples["malformed row"][0].startswith(f"{tmp_path / 'm.csv'}:4")


def test_split_asked_of_a_file_without_splits_is_reported(tmp_path):
    (tmp_path / "images").symlink_to(FIX / "images")
    (tmp_path / "m.csv").write_text("filepath,title\nimages/red.jpg,a red square\n")
    records, report = read_records(tmp_path / "m.csv", split="train")
    assert records == [] and report.counts == {"record without a split (split='train' asked)": 1}
    assert read_records(tmp_path / "m.csv")[0][0].captions == ["a red square"]


def test_broken_shard_is_counted_not_fatal(tmp_path):
    shutil.copy(FIX / "shards" / "00001.tar", tmp_path / "00001.tar")
    (tmp_path / "00000.tar").write_bytes((FIX / "shards" / "00000.tar").read_bytes()[:700])
    records, report = read_records(tmp_path)
    assert [r.image_id for r in records] == ["000000002"]
    assert report.counts["unreadable shard"] == 1 and "00000.tar" in report.examples["unreadable shard"][0]


def test_shard_sample_without_image_or_caption(tmp_path):
    with tarfile.open(tmp_path / "s.tar", "w") as tar:
        for name in ["a.txt", "b.png", "c.jpg", "c.txt"]:
            path = tmp_path / name
            path.write_bytes(b"caption" if name.endswith("txt") else (FIX / "images" / "green.png").read_bytes())
            tar.add(path, arcname=name)
    records, report = read_records(tmp_path / "s.tar")
    assert [r.image_id for r in records] == ["c"]
    assert report.counts == {"sample without an image": 1, "empty caption": 1}


def test_unknown_or_missing_files_raise_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.json"):
        read_records(tmp_path / "nope.json")
    with pytest.raises(FileNotFoundError, match=r"8 of 10 shards of .*/shards/\{00000..00009\}.tar do not exist"):
        read_records(f"{FIX}/shards/{{00000..00009}}.tar")
    (tmp_path / "notes.xyz").write_text("hello world\n")
    with pytest.raises(ValueError, match=r"notes\.xyz.*Karpathy"):
        read_records(tmp_path / "notes.xyz")
    (tmp_path / "other.json").write_text('{"foo": 1}')
    with pytest.raises(ValueError, match=r"other\.json.*neither Karpathy"):
        read_records(tmp_path / "other.json")
    (tmp_path / "broken.json").write_text('{"images": [')
    with pytest.raises(ValueError, match=r"broken\.json: not valid JSON \(line 1"):
        read_records(tmp_path / "broken.json")
    (tmp_path / "cols.csv").write_text("path,text\na.jpg,hi\n")
    with pytest.raises(ValueError, match=r"cols\.csv: columns \['path', 'text'\]"):
        read_records(tmp_path / "cols.csv")
    with pytest.raises(ValueError, match="without .tar shards"):
        read_records(tmp_path)


def test_content_sniffing_without_extension(tmp_path):
    (tmp_path / "images").symlink_to(FIX / "images")
    shutil.copy(FIX / "karpathy.json", tmp_path / "dataset")
    shutil.copy(FIX / "manifest.jsonl", tmp_path / "rows")
    shutil.copy(FIX / "manifest.tsv", tmp_path / "table")
    shutil.copy(FIX / "shards" / "00000.tar", tmp_path / "shard")
    shutil.copy(FIX / "manifest.tsv", tmp_path / "openclip.csv")       # OpenCLIP's default: tabs in a .csv
    for name, n in [("dataset", 3), ("rows", 3), ("table", 3), ("shard", 2), ("openclip.csv", 3)]:
        assert len(read_records(tmp_path / name)[0]) == n, name


def test_skip_report_merge_and_example_cap():
    a, b = SkipReport(), SkipReport()
    for i in range(4):
        a.add("x", f"a{i}")
        b.add("x", f"b{i}")
    b.add("y", "b")
    a.merge(b)
    assert a.counts == {"x": 8, "y": 1} and a.total() == 9
    assert a.examples["x"] == ["a0", "a1", "a2", "a3", "b0"]
    assert a.summary().splitlines()[0].startswith("x: 8 (e.g. a0; a1")
    assert SkipReport().summary() == "nothing skipped"

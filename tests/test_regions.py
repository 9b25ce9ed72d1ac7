"""Region features: the store, the bottom-up-attention formats, RoIAlign extraction, the region classifier."""
import importlib.util
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vlp.data.formats import Record, SkipReport, read_records
from vlp.data.pairs import decode_images
from vlp.data.regions import (RegionStore, read_butd_npz, read_butd_tsv, read_npz_dir, store_from_npz_dir,
                              store_from_tsv, write_butd_npz, write_butd_tsv)
from vlp.data.transforms import normalize
from vlp.regions import RegionClassifier, extract_regions, extract_to_store, load_classifier, train_classifier
from vlp.regions.classifier import name_words

FIX = Path(__file__).parent / "fixtures" / "regions"


def _fixture_items() -> list[dict]:
    """What fixtures/regions/make_fixtures.py wrote, recomputed."""
    spec = importlib.util.spec_from_file_location("make_region_fixtures", FIX / "make_fixtures.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.fixture_items()


def _random_items(n: int = 4, dim: int = 6, classes: int = 3, seed: int = 0) -> list[dict]:
    gen = torch.Generator().manual_seed(seed)
    items = []
    for i in range(n):
        k = i + 1
        corner = torch.rand(k, 2, generator=gen) * 50
        items.append({"image_id": f"img{i}", "image_w": 100 + i, "image_h": 80 + i,
                      "features": torch.randn(k, dim, generator=gen),
                      "boxes": torch.cat([corner, corner + 10 + torch.rand(k, 2, generator=gen) * 40], 1),
                      "cls_prob": torch.rand(k, classes, generator=gen).softmax(-1)})
    return items


def _assert_items_equal(got: dict, want: dict, atol: float = 0.0) -> None:
    assert str(got["image_id"]) == str(want["image_id"])
    assert (got["image_w"], got["image_h"]) == (want["image_w"], want["image_h"])
    for name in ("features", "boxes", "cls_prob"):
        np.testing.assert_allclose(np.asarray(got[name]), np.asarray(want[name]), atol=atol, rtol=0)


# --- the store -----------------------------------------------------------------------------------------

def test_store_round_trip_is_memory_mapped(tmp_path):
    items = _random_items()
    store = RegionStore.write(tmp_path / "store", items, feature_dtype="float32", class_names=["a", "b", "c"])
    assert len(store) == 4 and store.ids() == ["img0", "img1", "img2", "img3"] and "img2" in store
    assert store.class_names == ["a", "b", "c"]
    assert isinstance(store.features, np.memmap) and store.features.shape == (10, 6)
    assert store.features.dtype == np.float32 and store.cls_prob.dtype == np.float16
    for item in items:
        got = store[item["image_id"]]
        assert got["features"].dtype == torch.float32 and got["boxes"].shape == (len(item["boxes"]), 4)
        assert torch.equal(got["features"], item["features"]) and torch.equal(got["boxes"], item["boxes"])
        torch.testing.assert_close(got["cls_prob"], item["cls_prob"], atol=1e-3, rtol=0)     # float16
    half = RegionStore.write(tmp_path / "half", items)
    assert half.features.dtype == np.float16
    torch.testing.assert_close(half["img3"]["features"], items[3]["features"], atol=4e-3, rtol=1e-3)
    with pytest.raises(KeyError, match="img9"):
        store["img9"]


def test_store_survives_pickling_and_reopens_its_maps(tmp_path):
    import pickle
    store = RegionStore.write(tmp_path / "store", _random_items())
    store["img0"]                                          # maps opened
    copy = pickle.loads(pickle.dumps(store))
    assert len(pickle.dumps(store)) < 2000                 # the arrays are not pickled
    assert torch.equal(copy["img1"]["features"], store["img1"]["features"])


def test_store_write_is_atomic(tmp_path):
    def failing():
        yield from _random_items()[:2]
        raise RuntimeError("extractor crashed")

    with pytest.raises(RuntimeError, match="crashed"):
        RegionStore.write(tmp_path / "store", failing())
    assert os.listdir(tmp_path) == []                      # no store, no temporary folder
    RegionStore.write(tmp_path / "store", _random_items(2))
    with pytest.raises(FileExistsError, match="overwrite"):
        RegionStore.write(tmp_path / "store", _random_items(3))
    with pytest.raises(ValueError, match="width"):         # a failed overwrite keeps the old store
        RegionStore.write(tmp_path / "store", _random_items(2) + [{**_random_items(3)[2], "image_id": "x",
                                                                   "features": torch.zeros(3, 5)}], overwrite=True)
    assert len(RegionStore(tmp_path / "store")) == 2 and sorted(os.listdir(tmp_path)) == ["store"]
    assert len(RegionStore.write(tmp_path / "store", _random_items(3), overwrite=True)) == 3


def test_store_rejects_inconsistent_items(tmp_path):
    item = _random_items(1)[0]
    with pytest.raises(ValueError, match="twice"):
        RegionStore.write(tmp_path / "a", [item, item])
    with pytest.raises(ValueError, match=r"boxes must be \(K, 4\)"):
        RegionStore.write(tmp_path / "b", [{**item, "boxes": torch.zeros(1, 5)}])
    with pytest.raises(ValueError, match="features must be"):
        RegionStore.write(tmp_path / "c", [{**item, "features": torch.zeros(2, 6)}])
    with pytest.raises(ValueError, match="class names"):
        RegionStore.write(tmp_path / "d", [item], class_names=["only one"])
    with pytest.raises(FileNotFoundError, match="not a region store"):
        RegionStore(tmp_path)


# --- bottom-up-attention formats -------------------------------------------------------------------------

def test_read_butd_tsv_fixture():
    got = list(read_butd_tsv(FIX / "butd.tsv"))
    want = _fixture_items()
    assert [g["image_id"] for g in got] == ["9", "25", "30"] and [len(g["boxes"]) for g in got] == [3, 5, 2]
    for g, w in zip(got, want):
        assert "cls_prob" not in g                         # the original 6-field layout
        _assert_items_equal({**g, "cls_prob": w["cls_prob"]}, w)
        assert g["features"].shape[1] == 8
        assert (g["boxes"][:, 2:] > g["boxes"][:, :2]).all() and (g["boxes"][:, 2] <= g["image_w"]).all()


def test_read_butd_npz_fixture():
    got = list(read_npz_dir(FIX / "npz"))                  # 9.npz also holds a pickled `info`: ignored
    want = {w["image_id"]: w for w in _fixture_items()}
    assert sorted(g["image_id"] for g in got) == ["25", "30", "9"]
    for g in got:
        _assert_items_equal(g, want[g["image_id"]])


def test_tsv_and_npz_round_trips_through_the_store(tmp_path):
    store = store_from_tsv(FIX / "butd.tsv", tmp_path / "from_tsv", feature_dtype="float32", progress=False)
    assert store.cls_prob.shape == (10, 0) and store.info["source"] == [str(FIX / "butd.tsv")]
    for w in _fixture_items():
        no_classes = np.zeros((len(w["boxes"]), 0))
        _assert_items_equal({"image_id": w["image_id"], **store[w["image_id"]]}, {**w, "cls_prob": no_classes})

    store = store_from_npz_dir(FIX / "npz", tmp_path / "from_npz", feature_dtype="float32", progress=False)
    assert write_butd_tsv(tmp_path / "out.tsv", store.items()) == 3
    assert write_butd_npz(tmp_path / "npz", store.items()) == 3
    back_tsv = {g["image_id"]: g for g in read_butd_tsv(tmp_path / "out.tsv")}     # 7 fields: with cls_prob
    back_npz = {g["image_id"]: g for g in read_npz_dir(tmp_path / "npz")}
    for w in _fixture_items():
        expected = {**w, "cls_prob": w["cls_prob"].astype(np.float16).astype(np.float32)}   # the store's float16
        _assert_items_equal(back_tsv[w["image_id"]], expected)
        _assert_items_equal(back_npz[w["image_id"]], expected)


def test_corrupt_tsv_line_names_file_line_and_field(tmp_path):
    lines = (FIX / "butd.tsv").read_text().splitlines()
    cols = lines[1].split("\t")
    bad = tmp_path / "bad.tsv"
    bad.write_text("\n".join([lines[0], "\t".join(cols[:3] + ["4"] + cols[4:]), lines[2]]) + "\n")
    reader = read_butd_tsv(bad)
    assert next(reader)["image_id"] == "9"                 # the good line before it is read
    with pytest.raises(ValueError, match=r"bad\.tsv:2: field 'boxes': 80 bytes are not 4 rows"):
        next(reader)
    for broken, message in ((cols[:5], "5 tab-separated fields"),
                            (cols[:4] + ["not base64!"] + cols[5:], "field 'boxes': not valid base64"),
                            (cols[:1] + ["wide"] + cols[2:], "must be numbers")):
        bad.write_text("\t".join(broken) + "\n")
        with pytest.raises(ValueError, match=rf"bad\.tsv:1: .*{message}"):
            list(read_butd_tsv(bad))


def test_bad_npz_names_file_and_key(tmp_path):
    w = _fixture_items()[0]
    np.savez(tmp_path / "7.npz", x=w["features"], num_bbox=3, image_h=480, image_w=640)
    with pytest.raises(ValueError, match=r"7\.npz: missing key\(s\) bbox"):
        read_butd_npz(tmp_path / "7.npz")
    np.savez(tmp_path / "8.npz", x=w["features"][:2], bbox=w["boxes"], num_bbox=3, image_h=480, image_w=640)
    with pytest.raises(ValueError, match=r"8\.npz: key 'x' has shape \(2, 8\)"):
        read_butd_npz(tmp_path / "8.npz")


# --- extraction ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def classifier():
    torch.manual_seed(0)
    model = RegionClassifier(["a", "b", "c"]).eval()
    for m in model.modules():                   # non-trivial BatchNorm statistics, so eval differs from identity
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    return model


def test_roi_align_extraction_equals_naive_crop_average(classifier):
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        fmap = classifier.trunk.feature_map(images)                          # (2, 512, 8, 8): 8 px per cell
    # boxes of 4 x 4 whole cells: with output_size 2 RoIAlign samples each cell centre once
    boxes = [torch.tensor([[8.0, 16.0, 40.0, 48.0]]), torch.tensor([[32.0, 32.0, 64.0, 64.0], [0.0, 8.0, 32.0, 40.0]])]
    cells = [[(0, 2, 1)], [(1, 4, 4), (1, 1, 0)]]                           # (image, first row, first column)
    out = extract_regions(classifier, images, boxes, output_size=2)
    for got, b, image_cells in zip(out, boxes, cells):
        naive = torch.stack([fmap[i, :, r:r + 4, c:c + 4].mean((1, 2)) for i, r, c in image_cells])   # (K, 512)
        torch.testing.assert_close(got["features"], naive, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got["cls_prob"], classifier.head(naive).softmax(-1), atol=1e-5, rtol=1e-5)
        assert torch.equal(got["boxes"], b)
    assert not classifier.training


def test_whole_image_box_gives_the_pooled_features(classifier):
    for size, tol in ((64, 1e-5), (32, None)):
        images = torch.randn(3, 3, size, size)
        whole = [torch.tensor([[0.0, 0.0, size, size]])] * 3
        got = torch.cat([o["features"] for o in extract_regions(classifier, images, whole)])
        with torch.no_grad():
            pooled = classifier.features(images)
        if tol:                                 # 8x8 map, default output 4: exactly the global average
            torch.testing.assert_close(got, pooled, atol=tol, rtol=tol)
        else:                                   # 4x4 map: bilinear samples, close to it
            assert torch.nn.functional.cosine_similarity(got, pooled).min() > 0.98


def test_train_save_load_and_extract_to_store(emoji_tiny, tmp_path):
    out = tmp_path / "classifier"
    trained = train_classifier(emoji_tiny, out, steps=20, batch_size=8, image_size=32, identity=True,
                               words=True, progress=False)
    info = trained.info
    assert info["steps"] == 20 and 0 <= info["val_accuracy"] <= 1 and 0 < info["val_chance"] <= 1
    assert info["feature_dim"] == 512 and len(info["identities"]) == trained.identity_head.out_features
    train_records, _ = read_records(emoji_tiny, split="train")
    assert info["words"] == name_words(train_records) == sorted(info["words"]) and "face" in info["words"]
    assert 0 <= info["val_word_top1"] <= 1
    assert len(info["words"]) == trained.word_head.out_features and not any("\u4e00" <= ch <= "\u9fff"
                                                                         for w in info["words"] for ch in w)
    model = load_classifier(out)
    assert model.info == info and model.class_names == info["class_names"] and not model.training
    records, _ = read_records(emoji_tiny, split="test")
    _, images = decode_images(records[:4], 32, SkipReport(), progress=False)
    with torch.no_grad():
        assert torch.equal(model(normalize(images)), trained(normalize(images)))
    with pytest.raises(FileExistsError, match="overwrite"):
        train_classifier(emoji_tiny, out, steps=1, progress=False)
    with pytest.raises(FileNotFoundError, match="no region classifier"):
        load_classifier(tmp_path)


    scenes = _paste_scenes(records[:6], tmp_path / "scenes")
    stats = extract_to_store(out, scenes, tmp_path / "store", max_regions=2, batch_size=2, progress=False)
    store = RegionStore(tmp_path / "store")
    assert stats["images"] == len(store) == 3 and stats["regions"] == 2 + 2 + 1 and stats["regions_per_s"] > 0
    assert store[scenes[2].image_id]["image_w"] == 48             # a batch of another size
    assert store.class_names == info["class_names"] and store.info["max_regions"] == 2
    item = store[scenes[0].image_id]
    assert item["features"].shape == (2, 512) and item["cls_prob"].shape == (2, len(info["class_names"]))
    assert torch.equal(item["boxes"], torch.tensor([[0.0, 0.0, 32.0, 32.0], [32.0, 16.0, 64.0, 48.0]]))
    torch.testing.assert_close(item["cls_prob"].sum(-1), torch.ones(2), atol=2e-3, rtol=0)

    whole = extract_to_store(out, scenes, tmp_path / "whole", whole_image=True, progress=False)
    assert whole["regions"] == 3 and RegionStore(tmp_path / "whole").info["whole_image"]
    assert torch.equal(RegionStore(tmp_path / "whole")[scenes[2].image_id]["boxes"], torch.tensor([[0.0, 0.0, 48.0, 48.0]]))


def test_classifier_training_resumes_exactly(emoji_tiny, tmp_path, monkeypatch):
    import vlp.regions.classifier as clf_lib
    from vlp.cli import main
    kw = dict(steps=6, batch_size=4, image_size=32, words=True, save_every=3, progress=False)
    whole = train_classifier(emoji_tiny, tmp_path / "whole", **kw)
    assert not (tmp_path / "whole" / clf_lib.PROGRESS).exists()
    save = clf_lib._save_progress

    def save_then_stop(out_dir, state):        # the run dies right after its step-3 save
        save(out_dir, state)
        raise KeyboardInterrupt
    monkeypatch.setattr(clf_lib, "_save_progress", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        train_classifier(emoji_tiny, tmp_path / "cut", **kw)
    monkeypatch.setattr(clf_lib, "_save_progress", save)
    with pytest.raises(FileExistsError, match="interrupted classifier run \\(step 3 of 6\\).*--resume"):
        train_classifier(emoji_tiny, tmp_path / "cut", **kw)
    with pytest.raises(SystemExit, match="error: .*interrupted classifier run"):      # the CLI: a clear error
        main(["regions", "train", "--data", str(emoji_tiny), "--out", str(tmp_path / "cut"), "--steps", "6"])
    with pytest.raises(ValueError, match="lr was 0.002, now 0.001"):
        train_classifier(emoji_tiny, tmp_path / "cut", resume=True, **{**kw, "lr": 1e-3})
    resumed = train_classifier(emoji_tiny, tmp_path / "cut", resume=True, **kw)
    assert not (tmp_path / "cut" / clf_lib.PROGRESS).exists()
    want = whole.state_dict()
    for name, value in resumed.state_dict().items():
        assert torch.equal(value, want[name]), name
    assert resumed.info["val_accuracy"] == whole.info["val_accuracy"]


def test_crop_encoder_appends_the_dual_embedding_of_each_box(emoji_tiny, tmp_path):
    """`--crop-encoder`: the last D columns of every region feature are sqrt(D) x the dual encoder's
    embedding of that box's crop, computed here one crop at a time (PIL crop, antialiased resize)."""
    import torchvision.transforms.v2.functional as TF

    from test_train import tiny_cfg
    from vlp.regions.classifier import save_classifier
    from vlp.train import loop
    from vlp.train.checkpoint import load_checkpoint
    torch.manual_seed(0)
    save_classifier(RegionClassifier(["a", "b"], stem="half"), {"class_names": ["a", "b"], "trunk": "resnet18",
                                                                "stem": "half", "identities": [], "words": []},
                    tmp_path / "clf")
    dual = loop.train(tiny_cfg(emoji_tiny, tmp_path / "de", **{"train.steps": 2}), progress=False)
    records, _ = read_records(emoji_tiny, split="test")
    scenes = _paste_scenes(records[:6], tmp_path / "scenes")
    plain = extract_to_store(tmp_path / "clf", scenes, tmp_path / "plain", bf16=False, progress=False)
    stats = extract_to_store(tmp_path / "clf", scenes, tmp_path / "crops", bf16=False, crop_encoder=dual,
                             progress=False)
    assert stats["regions"] == plain["regions"] == 6
    model, _, cfg = load_checkpoint(dual)
    size, dim = cfg.model.image_size, cfg.model.embed_dim
    with_crops, without = RegionStore(tmp_path / "crops"), RegionStore(tmp_path / "plain")
    assert with_crops.info["crop_encoder"] == str(dual) and with_crops.info["crop_size"] == size
    naive = []
    for r in scenes:
        got, ref = with_crops[r.image_id], without[r.image_id]
        assert got["features"].shape == (len(ref["boxes"]), 512 + dim)
        torch.testing.assert_close(got["features"][:, :512], ref["features"])
        image = Image.open(r.image).convert("RGB")
        for (x1, y1, x2, y2), feature in zip(ref["boxes"].tolist(), got["features"]):
            crop = TF.resize(TF.pil_to_tensor(image.crop((x1, y1, x2, y2))), [size, size], antialias=True)
            with torch.no_grad():
                naive.append(model.encode_image(normalize(crop[None]))[0] * dim ** 0.5)
            torch.testing.assert_close(feature[512:], naive[-1], atol=5e-3, rtol=0)     # a float16 store
    extract_to_store(tmp_path / "clf", scenes, tmp_path / "only", bf16=False, crop_encoder=dual, roi_features=False,
                     progress=False)                     # --crop-only: the crop embedding is the whole feature
    only = RegionStore(tmp_path / "only")
    assert only.info["roi_features"] is False and with_crops.info["roi_features"] is True
    for r in scenes:
        torch.testing.assert_close(only[r.image_id]["features"], with_crops[r.image_id]["features"][:, 512:])
        torch.testing.assert_close(only[r.image_id]["cls_prob"], with_crops[r.image_id]["cls_prob"])
    with pytest.raises(ValueError, match="give a crop_encoder"):
        extract_to_store(tmp_path / "clf", scenes, tmp_path / "none", roi_features=False, progress=False)
    spread = torch.cdist(torch.stack(naive), torch.stack(naive)).fill_diagonal_(float("inf")).min()
    assert spread > 0.05                        # the crops differ by far more than the tolerance: a wrong box fails
    with pytest.raises(FileNotFoundError, match="no checkpoint in"):
        extract_to_store(tmp_path / "clf", scenes, tmp_path / "bad", crop_encoder=tmp_path / "clf", progress=False)


def _paste_scenes(emoji: list[Record], folder: Path) -> list[Record]:
    """Canvases of 64, 64 and 48 px holding 3, 2 and 1 emoji of 32 px, as scene records with meta objects
    (x, y, w, h)."""
    folder.mkdir()
    layouts = [(64, [(0, 0), (32, 16), (8, 32)]), (64, [(0, 32), (32, 0)]), (48, [(16, 16)])]
    records, used = [], iter(emoji)
    for n, (size, layout) in enumerate(layouts):
        canvas = Image.new("RGB", (size, size), (240, 245, 250))
        for x, y in layout:
            canvas.paste(Image.open(next(used).image).convert("RGB").resize((32, 32)), (x, y))
        canvas.save(folder / f"{n}.png")
        records.append(Record(image=str(folder / f"{n}.png"), captions=["x"], langs=["en"], image_id=f"scene{n}",
                              meta={"objects": [{"box": [x, y, 32, 32]} for x, y in layout]}))
    return records


def test_cli_imports_tsv_and_npz(tmp_path, capsys):
    from vlp.cli import main
    main(["regions", "import", "--tsv", str(FIX / "butd.tsv"), "--out", str(tmp_path / "a")])
    main(["regions", "import", "--npz-dir", str(FIX / "npz"), "--out", str(tmp_path / "b")])
    assert "3 images" in capsys.readouterr().out
    assert len(RegionStore(tmp_path / "a")) == 3 and len(RegionStore(tmp_path / "b")) == 3
    with pytest.raises(SystemExit, match="error: "):
        main(["regions", "import", "--tsv", str(tmp_path / "missing.tsv"), "--out", str(tmp_path / "c")])

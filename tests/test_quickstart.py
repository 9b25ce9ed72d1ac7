"""`vlp quickstart --system imagebert` at tiny size: every step runs, the evaluation JSON holds the dual,
rerank and exhaustive sections with the design keys, and a second call reuses all finished work."""
import json

from vlp.quickstart import quickstart_imagebert

KEYS = ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "rsum")


def test_imagebert_quickstart_end_to_end_and_reuse(emoji_tiny, tmp_path, capsys):
    from test_train import tiny_cfg
    from vlp.train import loop
    crops = loop.train(tiny_cfg(emoji_tiny, tmp_path / "de", **{"train.steps": 2}), progress=False)   # 64-d
    tiny = dict(out=str(tmp_path / "qs"), data=str(emoji_tiny.parent), scenes=str(tmp_path / "scenes"), n_scenes=40,
                rerank_k=4, eval_limit=6, exhaustive_limit=5, val_limit=4, dual_init="", crop_encoder=str(crops),
                classifier={"steps": 2, "batch_size": 8, "image_size": 32},
                overrides=["stages.emoji.train.steps=2", "stages.scenes.train.steps=2", "train.batch_size=8",
                           "train.precision=fp32", "stages.scenes.data.train_limit=9"],
                finetune_overrides=["train.steps=2", "train.batch_size=4", "train.precision=fp32", "data.train_limit=12"],
                dual_overrides=["train.steps=2", "train.batch_size=8", "model.image_size=32", "data.eval_split=\"\""])
    emoji_counts = (emoji_tiny.parent / "counts.json").read_text()
    res = quickstart_imagebert(**tiny)
    assert (emoji_tiny.parent / "counts.json").read_text() == emoji_counts      # the given emoji set is used, not rebuilt
    saved = json.loads((tmp_path / "qs" / "eval_test.json").read_text())
    assert saved == res
    for section in ("dual", "rerank", "exhaustive"):
        assert all(0 <= res[section][k] <= (600 if k == "rsum" else 100) for k in KEYS), section
    assert res["rerank"]["mode"] == "rerank" and res["rerank"]["k_t2i"] == 4 and res["dual"]["n_images"] == 6
    assert res["rerank"]["fuse"] == 0.0 and all(0 <= res["rerank_fused"][k] <= 100 for k in KEYS[:6])
    sel = res["fuse_selection"]                       # the weight is the best on the val scenes, not the test ones
    assert sel["split"] == "val" and res["rerank_fused"]["fuse"] == sel["weight"]
    assert sel["fused_t2i_r1"][f"{sel['weight']:g}"] == max(sel["fused_t2i_r1"].values())
    assert res["exhaustive"]["mode"] == "exhaustive" and res["exhaustive"]["limit"] == 5
    assert res["rerank"]["n_texts"] == res["dual"]["n_texts"] > 0
    assert res["region_dim"] == 64 and res["crop_encoder"].startswith(str(crops))   # the crop embedding alone
    from vlp.data.formats import read_records
    from vlp.data.regions import RegionStore
    train_scenes = read_records(tmp_path / "scenes" / "dataset.json", split="train")[0]
    store = RegionStore(tmp_path / "qs" / "regions" / "scenes")     # only the train scenes trained on get features
    assert all(r.image_id in store for r in train_scenes[:12]) and train_scenes[12].image_id not in store
    for run in ("imagebert", "imagebert/stages/emoji", "retrieval", "dual"):
        assert (tmp_path / "qs" / run / "checkpoints" / "latest").is_file(), run
    capsys.readouterr()

    again = quickstart_imagebert(**tiny)                       # everything finished: reused, same numbers
    out = capsys.readouterr().out
    assert "training the region classifier" not in out and "extracting" not in out and "skipped" in out
    assert {k: again["rerank"][k] for k in KEYS} == {k: res["rerank"][k] for k in KEYS}

    plain = quickstart_imagebert(**{**tiny, "crop_encoder": ""})   # other region features: extracted and trained again
    out = capsys.readouterr().out
    assert "extracting emoji regions" in out and "extracting scenes regions" in out and "resuming" not in out
    assert plain["region_dim"] == 512 and plain["crop_encoder"] is None


def test_ernie_quickstart_trains_fewer_steps_without_native_bf16(monkeypatch):
    """Float32 steps ran at about a third of the bf16 machine's rate: without native bf16 the preset's 600 steps would take
    half an hour, so the quickstart trains FP32_BUDGET steps; a user's --set still wins."""
    from vlp import config, layers
    from vlp.quickstart import FP32_BUDGET, PRESET, quickstart_config
    full = config.load(PRESET).train.steps
    monkeypatch.setattr(layers, "bf16_is_fast", lambda device_type="cpu": True)
    cfg, budget = quickstart_config("runs/q", "data/emoji")
    assert budget == () and cfg.train.steps == full and cfg.train.precision == "auto"
    monkeypatch.setattr(layers, "bf16_is_fast", lambda device_type="cpu": False)
    cfg, budget = quickstart_config("runs/q", "data/emoji")
    assert budget == FP32_BUDGET and cfg.train.steps == int(FP32_BUDGET[0].split("=")[1]) < full
    assert quickstart_config("runs/q", "data/emoji", ["train.steps=7"])[0].train.steps == 7


def test_imagebert_quickstart_budget_without_native_bf16():
    """Without native bf16 the ImageBERT quickstart trains IMAGEBERT_FP32_BUDGET's steps; with it the presets' own;
    what the caller passes wins in both."""
    from vlp import config
    from vlp.quickstart import CLASSIFIER, IMAGEBERT, IMAGEBERT_FP32_BUDGET, imagebert_settings
    assert imagebert_settings(True) == (CLASSIFIER, [], [], [], 100)
    clf, pre, ft, dual, limit = imagebert_settings(False)
    assert clf["steps"] == IMAGEBERT_FP32_BUDGET["classifier"]["steps"] < CLASSIFIER["steps"] and limit == 40
    full, cut = config.load(IMAGEBERT), config.load(IMAGEBERT, pre)
    assert all(c["train"]["steps"] < f["train"]["steps"] for c, f in zip(cut.stages, full.stages))
    assert ft == list(IMAGEBERT_FP32_BUDGET["finetune"]) and dual == list(IMAGEBERT_FP32_BUDGET["dual"])
    clf, pre, ft, dual, limit = imagebert_settings(False, {"steps": 3}, ["stages.scenes.train.steps=7"],
                                                   ["train.steps=5"], ["train.steps=4"], 9)
    assert clf["steps"] == 3 and limit == 9 and config.load(IMAGEBERT, pre).stages[-1]["train"]["steps"] == 7
    assert ft[-1] == "train.steps=5" and dual[-1] == "train.steps=4"

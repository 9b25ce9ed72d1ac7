"""`vlp quickstart --system imagebert` at tiny size: every step runs, the evaluation JSON holds the dual,
rerank and exhaustive sections with the design keys, and a second call reuses all finished work."""
import dataclasses
import json

from vlp.quickstart import CrossQuickstart, ImageBERTQuickstart, quickstart_cross, quickstart_imagebert

KEYS = ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "rsum")


def test_imagebert_quickstart_end_to_end_and_reuse(emoji_tiny, tmp_path, capsys):
    from test_train import tiny_cfg
    from vlp.train import loop
    crops = loop.train(tiny_cfg(emoji_tiny, tmp_path / "de", **{"train.steps": 2}), progress=False)   # 64-d
    tiny = ImageBERTQuickstart(
        out=str(tmp_path / "qs"), data=str(emoji_tiny.parent), scenes=str(tmp_path / "scenes"), n_scenes=40,
        rerank_k=4, eval_limit=6, exhaustive_limit=5, val_limit=4, dual_init="", crop_encoder=str(crops),
        classifier={"steps": 2, "batch_size": 8, "image_size": 32},
        pretrain={"stages.emoji.train.steps": 2, "stages.scenes.train.steps": 2, "train.batch_size": 8,
                  "train.precision": "fp32", "stages.scenes.data.train_limit": 9},
        finetune={"train.steps": 2, "train.batch_size": 4, "train.precision": "fp32", "data.train_limit": 12},
        dual={"train.steps": 2, "train.batch_size": 8, "model.image_size": 32})
    emoji_counts = (emoji_tiny.parent / "counts.json").read_text()
    res = quickstart_imagebert(tiny)
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
    logs = {run: (tmp_path / "qs" / run / "metrics.jsonl").read_text() for run in ("retrieval", "dual")}  # rates differ per run

    again = quickstart_imagebert(tiny)                       # everything finished: reused, same numbers
    out = capsys.readouterr().out
    assert "training the region classifier" not in out and "extracting" not in out and "skipped" in out
    assert all(logs[run] == (tmp_path / "qs" / run / "metrics.jsonl").read_text() for run in logs)   # not retrained
    assert {k: again["rerank"][k] for k in KEYS} == {k: res["rerank"][k] for k in KEYS}

    plain = quickstart_imagebert(dataclasses.replace(tiny, crop_encoder=""))   # other region features: extracted and trained again
    out = capsys.readouterr().out
    assert "extracting emoji regions" in out and "extracting scenes regions" in out and "resuming" not in out
    assert plain["region_dim"] == 512 and plain["crop_encoder"] is None


def test_interbert_quickstart_evaluates_each_language_and_its_streams(emoji_tiny, tmp_path):
    """The same path with InterBERT's presets: per-language sections with the dual, reranked and single-modal
    (text and image streams alone) results, each with the design keys."""
    from test_train import tiny_cfg
    from vlp.train import loop
    crops = loop.train(tiny_cfg(emoji_tiny, tmp_path / "de", **{"train.steps": 2}), progress=False)
    res = quickstart_cross(CrossQuickstart(
        "interbert", out=str(tmp_path / "qi"), data=str(emoji_tiny.parent), scenes=str(tmp_path / "scenes"),
        n_scenes=40, rerank_k=4, eval_limit=6, exhaustive_limit=5, val_limit=4, dual_init="", crop_encoder=str(crops),
        classifier={"steps": 2, "batch_size": 8, "image_size": 32},
        pretrain={"stages.emoji.train.steps": 2, "stages.scenes.train.steps": 2, "train.batch_size": 8,
                  "train.precision": "fp32", "stages.scenes.data.train_limit": 9},
        finetune={"train.steps": 2, "train.batch_size": 4, "train.precision": "fp32", "data.train_limit": 12},
        dual={"train.steps": 2, "train.batch_size": 8, "model.image_size": 32}))
    assert (tmp_path / "qi" / "interbert" / "stages.toml").is_file()
    for section in ("dual", "rerank", "single_modal"):
        for lang in ("en", "zh"):
            assert all(0 <= res[lang][section][k] <= (600 if k == "rsum" else 100) for k in KEYS), (lang, section)
    assert res["en"]["dual"]["n_texts"] + res["zh"]["dual"]["n_texts"] == res["dual"]["n_texts"]
    assert all(0 <= res["single_modal"][k] <= 100 for k in KEYS[:6])


def test_ernie_quickstart_fits_its_steps_to_the_machine(tmp_path):
    """The quickstart's preset carries a time budget (the step count is fitted during the warmup); a rerun
    recognises a run that recorded a fitted count as the same run; a user's --set still wins."""
    from vlp import config
    from vlp.quickstart import PRESET, _same_config, quickstart_config
    cfg = quickstart_config(str(tmp_path / "q"), "data/emoji")
    assert cfg.train.time_budget > 0 and cfg.train.steps == config.load(PRESET).train.steps
    assert cfg.data.train == "data/emoji/dataset.json" and cfg.train.out == str(tmp_path / "q")
    assert quickstart_config("q", "d", ["train.time_budget=0", "train.steps=7"]).train.steps == 7
    (tmp_path / "q").mkdir()
    assert not _same_config(tmp_path / "q", cfg)
    (tmp_path / "q" / "config.toml").write_text(config.dump(config.updated(cfg, {"train.steps": 123})))
    assert _same_config(tmp_path / "q", cfg)                     # the run fitted 123 steps to its budget
    assert not _same_config(tmp_path / "q", config.updated(cfg, {"train.lr": 1e-4}))


def test_imagebert_quickstart_budget_without_native_bf16():
    """Without native bf16 the ImageBERT quickstart trains IMAGEBERT_FP32_BUDGET's steps; with it the presets' own;
    what the caller gives wins in both."""
    from vlp import config
    from vlp.quickstart import CLASSIFIER, CROSS_TIME_BUDGETS as T, DUAL, IMAGEBERT, IMAGEBERT_FP32_BUDGET as B
    plain = ImageBERTQuickstart().resolved(fast=True)
    assert (plain.classifier, plain.pretrain, plain.finetune, plain.dual, plain.exhaustive_limit) == (
        CLASSIFIER, T["pretrain"], T["finetune"], {**DUAL, **T["dual"]}, 100)
    assert plain.out == "runs/quickstart-imagebert" and plain.languages == ()
    assert CrossQuickstart("interbert").resolved(fast=True).languages == ("en", "zh")
    cut = ImageBERTQuickstart().resolved(fast=False)
    assert cut.classifier["steps"] == B["classifier"]["steps"] < CLASSIFIER["steps"] and cut.exhaustive_limit == 40
    full, short = config.load(IMAGEBERT), config.updated(config.load(IMAGEBERT), cut.pretrain)
    assert all(c["train"]["steps"] < f["train"]["steps"] for c, f in zip(short.stages, full.stages))
    assert cut.finetune == {**B["finetune"], **T["finetune"]} and cut.dual == {**DUAL, **B["dual"], **T["dual"]}
    mine = ImageBERTQuickstart(classifier={"steps": 3}, pretrain={"stages.scenes.train.steps": 7},
                               finetune={"train.steps": 5}, dual={"train.steps": 4}, exhaustive_limit=9).resolved(False)
    assert mine.classifier["steps"] == 3 and mine.exhaustive_limit == 9
    assert config.updated(config.load(IMAGEBERT), mine.pretrain).stages[-1]["train"]["steps"] == 7
    assert mine.finetune["train.steps"] == 5 and mine.dual["train.steps"] == 4

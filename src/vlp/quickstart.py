"""`vlp quickstart`: the main job on the embedded default, end to end.

Build the emoji set (if missing) -> pretrain a small ERNIE-ViL 2.0 whose text tower starts from the
packaged MiniLM checkpoint -> evaluate zero-shot on the held-out test emoji (never seen in training)
-> print a table and write `runs/quickstart/eval_test.json` -> index every emoji image for search
(`runs/quickstart/index`, served by `vlp serve`). Running it again reuses a finished run with the
same config, resumes an interrupted one, and starts afresh when the config changed.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from vlp import config as config_lib

PRESET = Path(__file__).parent / "configs" / "emoji-ernie-vil2.toml"
# The preset's 600 steps take about 10 minutes under bf16 autocast on a CPU with native bf16 (AVX-512
# bf16 / AMX). On an AVX2 CPU without it a float32 step ran at 48 pairs/s against the bf16 machine's 133,
# so the quickstart trains fewer steps there to keep to its ten minutes (docs/results.md, "Machines
# without native bf16").
FP32_BUDGET = ("train.steps=180", "train.warmup_steps=30")


def quickstart_config(out: str, data: str, overrides: list[str] | tuple = ()) -> tuple[config_lib.Config, tuple]:
    """The preset, pointed at `data` and `out`, with FP32_BUDGET where this machine has no native bf16;
    the user's overrides come last and win. -> (config, the budget overrides applied)."""
    from vlp.layers import bf16_is_fast
    budget = () if bf16_is_fast() else FP32_BUDGET
    sets = [f'data.train="{Path(data) / "dataset.json"}"', f'train.out="{out}"', *budget, *overrides]
    return config_lib.load(PRESET, sets), budget


def quickstart(out: str = "runs/quickstart", data: str = "data/emoji", overrides: list[str] | tuple = ()) -> dict:
    from vlp.data.emoji import ensure_emoji
    from vlp.data.formats import read_records
    from vlp.eval.retrieval import evaluate, format_table
    from vlp.train.checkpoint import load_checkpoint
    from vlp.train.loop import train

    t0 = time.perf_counter()
    counts, _ = ensure_emoji(data)
    images = counts.get("images", {})
    shown = ", ".join(f"{n} {style}" for style, n in images.items()) if isinstance(images, dict) else images
    print(f"[1/4] emoji data in {data}: {counts.get('emoji', '?')} emoji, images: {shown} "
          f"({time.perf_counter() - t0:.0f} s)")

    cfg, budget = quickstart_config(out, data, overrides)
    run = Path(out)
    same = (run / "config.toml").is_file() and (run / "config.toml").read_text() == config_lib.dump(cfg)
    print(f"[2/4] pretraining {cfg.model.arch} ({cfg.model.image_encoder} image tower, text tower from "
          f"{cfg.model.text_init or 'scratch'}) for {cfg.train.steps} steps -> {run}"
          + (" (resuming / reusing the finished run)" if same else ""))
    if budget:
        full = config_lib.load(PRESET).train.steps
        print(f"      this CPU has no native bf16 matmuls: float32, {cfg.train.steps} steps instead of the preset's "
              f"{full} to stay within about 10 minutes (--set train.steps={full} for the full run)")
    t1 = time.perf_counter()
    train(cfg, resume=same, overwrite=True)
    train_s = time.perf_counter() - t1

    print("[3/4] zero-shot evaluation on the held-out test emoji")
    model, tok, cfg = load_checkpoint(run)
    records, _ = read_records(cfg.data.train, split="test")
    res = evaluate(model, tok, records, image_size=cfg.model.image_size, max_len=cfg.model.text_max_len)
    res.update(split="test", train_seconds=round(train_s, 1), total_seconds=round(time.perf_counter() - t0, 1))
    (run / "eval_test.json").write_text(json.dumps(res, indent=1, ensure_ascii=False))
    print(format_table(res))
    print(f"wrote {run / 'eval_test.json'}")

    print("[4/4] indexing every emoji image for search")
    from vlp.search.index import build_index
    index = run / "index"
    build_index(run, Path(data) / "dataset.json", index, overwrite=True)
    print(f"\ndone in {time.perf_counter() - t0:.0f} s. Next:")
    print(f"  vlp serve {index}              # search page on http://127.0.0.1:8000")
    print(f"  vlp evaluate {run} --data {Path(data) / 'dataset.json'} --split test --lang zh")
    return res


IMAGEBERT = Path(__file__).parent / "configs" / "emoji-imagebert.toml"
RETRIEVAL = Path(__file__).parent / "configs" / "emoji-imagebert-retrieval.toml"
# first-stage dual encoder on the scenes: at 96 px (at 64 px a scene's objects shrink to 11-25 px), batch 64
# (no periodic val evaluation: the quickstart evaluates the dual encoder itself, on the test scenes)
DUAL = ("train.steps=300", "train.warmup_steps=30", "train.lr=1e-3", "train.batch_size=64", "model.image_size=96",
        'data.eval_split=""')
CLASSIFIER = {"steps": 400, "batch_size": 64, "words": True, "stem": "half"}     # `vlp regions train` settings (docs/results.md)
FUSE = (0.5, 1.0, 2.0, 4.0, 8.0)     # weights W of sigmoid(ITM) + W * cosine (BLIP-style) tried on the val scenes
# Where bf16 is not native, float32 steps run at a quarter to a third of the bf16 machine's rate (region classifier
# 1.55 s against 0.41, scenes stage 1.8 s after length grouping, first-stage dual encoder 3.0 s against 0.93):
# these step counts keep the whole path within its 30 minutes there (docs/results.md, "Machines without native bf16").
# With a quarter of the steps, ITM at weight 1 sat at chance for a third of the scenes stage while MLM took the
# gradient: weight 5 made ITM-alone reranking 12.4 on val against 4.5 (all four tasks kept). The first stage drops the
# image<->image view (1.6x the steps in the same time: val t2i R@1 4.8 against 3.6). The scenes stage and fine-tuning
# read the first 4,000 of the 7,000 train scenes (the stage's 390 x 64 draws: 6.2 passes over them), so 3,000 fewer
# get region features, and fine-tuning runs longer (360 steps against 180: test ITM-alone R@1 7.3 against 6.3).
# With crop-embedding region features the classifier only labels MOC's targets (MOC itself did not measurably help
# retrieval), so it keeps ResNet-18's own stem: a quarter of the half stem's products, and scene extraction at 2.5x
# the rate. The time that frees goes to the scenes stage (390 steps against 300; with the 120-step classifier the whole
# run's val x 5 ITM-alone R@1 14.1 against the last budget's 13.8, fused 14.7 against 14.2; docs/results.md).
IMAGEBERT_FP32_BUDGET = {"classifier": {"steps": 120, "stem": "default"},
                         "pretrain": ("stages.emoji.train.steps=50", "stages.scenes.train.steps=390", "objectives.itm=5",
                                      "stages.scenes.data.train_limit=4000"),
                         "finetune": ("train.steps=360", "data.train_limit=4000"),
                         "dual": ("train.steps=100", "train.warmup_steps=15", "objectives.image_image=0"),
                         "exhaustive_limit": 40}


def imagebert_settings(fast: bool, classifier: dict | None = None, overrides=(), finetune_overrides=(), dual_overrides=(),
                       exhaustive_limit: int | None = None) -> tuple[dict, list, list, list, int]:
    """The ImageBERT quickstart's classifier settings, pretraining / fine-tuning / dual-encoder overrides and
    exhaustive limit: IMAGEBERT_FP32_BUDGET's where bf16 is not `fast`, the caller's values always winning."""
    budget = {} if fast else IMAGEBERT_FP32_BUDGET
    return ({**CLASSIFIER, **budget.get("classifier", {}), **(classifier or {})},
            [*budget.get("pretrain", ()), *overrides], [*budget.get("finetune", ()), *finetune_overrides],
            [*budget.get("dual", ()), *dual_overrides], exhaustive_limit or budget.get("exhaustive_limit", 100))


def _same_config(run: Path, cfg, name: str = "config.toml") -> bool:
    return (run / name).is_file() and (run / name).read_text() == config_lib.dump(cfg)


def _checkpoint_or_none(path: str) -> str | None:
    """The newest complete checkpoint under `path`, or None when there is none (or no path)."""
    from vlp.train.checkpoint import resolve
    try:
        return str(resolve(path)) if path else None
    except FileNotFoundError:
        return None


def quickstart_imagebert(out: str = "runs/quickstart-imagebert", data: str = "data/emoji", n_scenes: int = 10000,
                         rerank_k: int = 16, eval_limit: int = 400, exhaustive_limit: int | None = None, val_limit: int = 200,
                         dual_init: str = "runs/quickstart", crop_encoder: str = "runs/quickstart", overrides: list[str] | tuple = (),
                         classifier: dict | None = None, finetune_overrides: list[str] | tuple = (),
                         dual_overrides: list[str] | tuple = (), scenes: str | None = None) -> dict:
    """ImageBERT end to end on the emoji scenes; every step reuses finished work and resumes interrupted work:
    scenes -> region classifier -> region stores -> two-stage pretraining (single emoji, then scenes) ->
    retrieval fine-tuning -> first-stage dual encoder on the scenes -> dual-only vs reranked retrieval on
    the first `eval_limit` scenes of the test split -> `out/eval_test.json` with `dual`, `rerank` (ITM alone,
    the paper), `rerank_fused` (sigmoid(ITM) + W * cosine, W chosen on the first `val_limit` val scenes,
    `fuse_selection`) and `exhaustive` (every pair of the first `exhaustive_limit` scenes: 100, or 40 under the
    float32 budget) sections. Only the scenes it trains and evaluates on get region features. Where the CPU has
    no native bf16, IMAGEBERT_FP32_BUDGET's step counts apply (the arguments and overrides given still win).
    The dual encoder fine-tunes the ERNIE-ViL 2.0 quickstart's model when `dual_init` holds one, else it trains from scratch; the region
    features are the `crop_encoder` dual encoder's embedding of each box's crop when it holds a checkpoint
    (by default the same quickstart model; the classifier then gives only the class distributions MOC learns),
    else the classifier's RoI features. The crop embedding alone reranks better than with the RoI feature
    appended (test t2i R@1 8.5 against 7.2, val 12.4 against 12.0; docs/results.md): the RoI feature fits the
    train emoji the classifier learned, and the test scenes hold only unseen ones.
    overrides (`--set`) apply to the pretraining config; classifier (`vlp regions train` settings),
    finetune_overrides and dual_overrides shrink the other steps (tests)."""
    from vlp.data.emoji import ensure_emoji
    from vlp.data.formats import read_records
    from vlp.data.regions import RegionStore
    from vlp.data.scenes import build_scenes
    from vlp.eval.rerank import evaluate_cross_encoder
    from vlp.eval.retrieval import format_table
    from vlp.regions import extract_to_store, train_classifier
    from vlp.regions.classifier import CONFIG as CLASSIFIER_JSON, OtherSettings
    from vlp.train.checkpoint import load_checkpoint
    from vlp.train.loop import train
    from vlp.train.stages import train_stages

    from vlp.layers import bf16_is_fast

    t0, run, seconds = time.perf_counter(), Path(out), {}
    fast = bf16_is_fast()      # bf16 pair scoring where the CPU has native bf16 (about 2x), float32 elsewhere
    if not fast:
        print("this CPU has no native bf16 matmuls: float32 with fewer steps to stay within 30 minutes "
              "(quickstart.IMAGEBERT_FP32_BUDGET; --set overrides the pretraining steps)")
    settings = imagebert_settings(fast, classifier, overrides, finetune_overrides, dual_overrides, exhaustive_limit)
    clf, overrides, finetune_overrides, dual_overrides, exhaustive_limit = settings
    emoji_json = Path(data) / "dataset.json"
    scenes_dir = Path(scenes) if scenes else Path(data).parent / "scenes"

    def lap(name: str, start: float) -> None:
        seconds[name] = round(time.perf_counter() - start, 1)

    t = time.perf_counter()
    ensure_emoji(data)
    counts = build_scenes(scenes_dir, emoji=data, n=n_scenes)
    lap("data", t)
    split_counts = counts.get("scenes", {})
    shown = ", ".join(f"{n} {split}" for split, n in split_counts.items()) if isinstance(split_counts, dict) else n_scenes
    print(f"[1/7] emoji set in {data}; scenes in {scenes_dir}: {shown} ({seconds['data']} s)")

    t = time.perf_counter()
    clf_dir = run / "regions" / "classifier"
    info_path = clf_dir / CLASSIFIER_JSON
    info = json.loads(info_path.read_text()) if info_path.is_file() else {}
    fresh = not (info.get("data") == str(emoji_json) and bool(info.get("words")) == clf["words"]
                 and all(info.get(k) == v for k, v in clf.items() if k != "words"))
    if fresh:
        print(f"[2/7] training the region classifier (detector stand-in) -> {clf_dir}")
        try:                # continue an interrupted classifier run with these settings
            info = train_classifier(emoji_json, clf_dir, overwrite=True, resume=True, **clf).info
        except OtherSettings as e:     # its settings differ: start again
            print(f"[2/7] {e}; starting again")
            info = train_classifier(emoji_json, clf_dir, overwrite=True, **clf).info
    lap("classifier", t)
    print(f"[2/7] region classifier: val category accuracy {100 * info['val_accuracy']:.1f}% "
          f"(chance {100 * info['val_chance']:.1f}%), {len(info['words'])} name words ({seconds['classifier']} s)")

    stores = {"emoji": run / "regions" / "emoji", "scenes": run / "regions" / "scenes"}
    sets = [f'train.out="{run / "imagebert"}"']
    for name, manifest, store in (("emoji", emoji_json, stores["emoji"]),
                                  ("scenes", scenes_dir / "dataset.json", stores["scenes"])):
        sets += [f'stages.{name}.data.train="{manifest}"', f'stages.{name}.data.regions="{store}"']
    cfg = config_lib.load(IMAGEBERT, sets + list(overrides))
    ft = config_lib.load(RETRIEVAL, [f'train.out="{run / "retrieval"}"', f'data.train="{scenes_dir / "dataset.json"}"',
                                     f'data.regions="{stores["scenes"]}"', *finetune_overrides])
    limits = [c.data.train_limit for _, c in config_lib.stage_configs(cfg)[1:]] + [ft.data.train_limit]
    n_train = 0 if 0 in limits else max(limits)        # the train scenes the scenes stage and fine-tuning read

    t = time.perf_counter()
    crops = _checkpoint_or_none(crop_encoder)
    rebuilt = False
    for name, store in stores.items():
        manifest = emoji_json if name == "emoji" else scenes_dir / "dataset.json"
        every = read_records(manifest)[0]
        split = {s: [r for r in every if r.split == s and r.captions] for s in ("train", "val", "test")}
        # the emoji stage trains on the train emoji; the scenes: the train ones trained on (all, or the first
        # n_train), and the val / test ones evaluated below
        records = split["train"] if name == "emoji" else [
            *split["train"][:n_train or None], *split["val"][:val_limit],
            *split["test"][:max(eval_limit, exhaustive_limit)]]
        built = RegionStore(store).info if (store / "index.json").exists() else {}
        if (not fresh and built.get("crop_encoder") == (crops or "") and built.get("roi_features", True) == (not crops)
                and all(r.image_id in RegionStore(store) for r in records)):
            continue
        print(f"[3/7] extracting {name} regions -> {store}")
        rebuilt = True                           # new features: the pretraining below starts again
        stats = extract_to_store(clf_dir, records, store, whole_image=name == "emoji", crop_encoder=crops,
                                 roi_features=not crops, overwrite=True)
        seconds[f"regions_per_s_{name}"] = round(stats["regions_per_s"], 1)
    lap("regions", t)
    dim = RegionStore(stores["scenes"]).features.shape[1]
    print(f"[3/7] region stores: {', '.join(f'{n} {len(RegionStore(s))} images' for n, s in stores.items())}, "
          + (f"{dim}-d features: crop embeddings of {crops}" if crops else
             f"{dim}-d features: classifier RoI features (no dual-encoder checkpoint in {crop_encoder!r})")
          + f" ({seconds['regions']} s)")

    t = time.perf_counter()
    same = _same_config(run / "imagebert", cfg, "stages.toml") and not (fresh or rebuilt)
    print(f"[4/7] pretraining ImageBERT in {len(cfg.stages)} stages -> {run / 'imagebert'}"
          + (" (resuming / reusing)" if same else ""))
    train_stages(cfg, resume=same, overwrite=True)
    lap("pretrain", t)

    t = time.perf_counter()
    same = same and _same_config(run / "retrieval", ft)
    print(f"[5/7] retrieval fine-tuning ({', '.join(ft.objectives)}) -> {run / 'retrieval'}")
    train(ft, resume=same, init=str(run / "imagebert"), overwrite=True)
    lap("finetune", t)

    t = time.perf_counter()
    dual_run = run / "dual"
    init = _checkpoint_or_none(dual_init)
    dual = config_lib.load(PRESET, [f'train.out="{dual_run}"', f'data.train="{scenes_dir / "dataset.json"}"',
                                    *DUAL, *dual_overrides])
    print(f"[6/7] first-stage dual encoder (ERNIE-ViL 2.0) on the scenes -> {dual_run}, "
          + (f"fine-tuning {init}" if init else f"from scratch (no ERNIE-ViL 2.0 quickstart model in {dual_init})"))
    train(dual, resume=_same_config(dual_run, dual), init=init, overwrite=True)
    lap("dual", t)

    t = time.perf_counter()
    model, tok, mcfg = load_checkpoint(run / "retrieval")
    first = load_checkpoint(dual_run)
    first = (first[0], first[1], first[2].model.image_size)
    scene_store, manifest = RegionStore(stores["scenes"]), scenes_dir / "dataset.json"
    val = evaluate_cross_encoder(model, tok, read_records(manifest, split="val")[0], scene_store,
                                 mcfg.model.text_max_len, k=rerank_k, first_stage=first, limit=val_limit, fuse=(0.0, *FUSE),
                                 bf16=fast)
    chosen = max(FUSE, key=lambda w: (val[f"fused_{w:g}"]["t2i_r1"], -w))          # ties: the smaller weight
    selection = {"split": "val", "limit": val_limit, "k": rerank_k, "weight": chosen,
                 "dual_t2i_r1": val["first_stage"]["t2i_r1"], "itm_t2i_r1": val["t2i_r1"],
                 "fused_t2i_r1": {f"{w:g}": val[f"fused_{w:g}"]["t2i_r1"] for w in FUSE}}
    print(f"[7/7] fuse weight {chosen:g} chosen on the first {val_limit} val scenes (t2i R@1: "
          + ", ".join(f"W={w} {r:.2f}" for w, r in selection["fused_t2i_r1"].items()) + ")")
    print(f"[7/7] retrieval on the first {eval_limit} test scenes: the dual encoder alone, ImageBERT reranking its "
          f"top {rerank_k}, and ImageBERT scoring every pair of the first {exhaustive_limit}")
    records, _ = read_records(manifest, split="test")
    rerank = evaluate_cross_encoder(model, tok, records, scene_store, mcfg.model.text_max_len, k=rerank_k,
                                    first_stage=first, limit=eval_limit, fuse=(0.0, chosen), bf16=fast)
    dual_res, fused = rerank.pop("first_stage"), rerank.pop(f"fused_{chosen:g}")
    exhaustive = evaluate_cross_encoder(model, tok, records, scene_store, mcfg.model.text_max_len,
                                        limit=exhaustive_limit, bf16=fast)
    lap("evaluate", t)
    res = {"split": "test", "data": str(manifest), "limit": eval_limit, "dual_init": init, "crop_encoder": crops,
           "region_dim": dim,
           "dual": dual_res, "rerank": rerank, "rerank_fused": fused, "fuse_selection": selection,
           "exhaustive": {**exhaustive, "limit": exhaustive_limit},
           "seconds": seconds, "total_seconds": round(time.perf_counter() - t0, 1)}
    (run / "eval_test.json").write_text(json.dumps(res, indent=1, ensure_ascii=False))
    sections = [("dual", res["dual"]), (f"rerank top {rerank_k}, ITM alone", res["rerank"]),
                (f"rerank top {rerank_k}, sigmoid(ITM) + {chosen:g} x cosine", fused),
                (f"exhaustive (first {exhaustive_limit} scenes)", res["exhaustive"])]
    for name, section in sections:
        print(f"\n{name}")
        print(format_table({k: v for k, v in section.items() if not isinstance(v, dict)}))
    print(f"\nwrote {run / 'eval_test.json'}; done in {res['total_seconds']:.0f} s")
    return res

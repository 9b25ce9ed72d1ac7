"""The region classifier: a stand-in for ImageBERT's Visual Genome detector (Qi et al. 2020, "Embedding modeling").

ImageBERT reads detector regions: a pooled CNN feature, a box and the detector's class distribution
per region. No Visual Genome detector exists here, so `RegionClassifier` is a torchvision trunk
(default ResNet-18 with the small stem) + global average pooling + a linear head that predicts an
emoji's *category* (its first tag, "Food & Drink", ...; "(none)" when untagged), and optionally
auxiliary heads: the emoji's identity (`hex`) and the words of its English name (multi-label, over
the words of at least `WORD_MIN_COUNT` training images: "face", "cat", "flag", "medium", "tone", ...,
the counterpart of the detector's Visual Genome object and attribute names, which is what lets the
features describe emoji never seen in training). The pooled penultimate features
(the trunk's channels: 512 for ResNet-18) are the region features and the category softmax is the
class distribution; `vlp.regions.extract` pools both over boxes of a scene.

It trains on single emoji of the train split (both styles). Each view is a random resized crop
(area 0.6-1) shrunk to 0.4-1 of the canvas side and pasted at a random place on a light canvas,
so it sees emoji at the sizes and on the backgrounds of the scenes (`vlp data emoji-scenes`).

    clf = train_classifier("data/emoji/dataset.json", "runs/regions/classifier", steps=140)
    clf = load_classifier("runs/regions/classifier")       # eval mode; clf.info is classifier.json
    logits = clf(images)        # (B, 3, S, S) ImageNet-normalised -> (B, C) category logits
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import time
from collections import Counter
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from tqdm import tqdm

from vlp.data.formats import Record, SkipReport, read_records
from vlp.data.pairs import decode_images
from vlp.data.transforms import normalize, random_resized_crop
from vlp.encoders.cnn import TorchvisionTrunk
from vlp.layers import use_bf16
from vlp.train.optim import build_optimizer, build_scheduler

WEIGHTS, CONFIG = "classifier.safetensors", "classifier.json"
PROGRESS = "progress.pt"          # an unfinished run: model, optimiser, schedule and sampler state
UNTAGGED = "(none)"
CROP_SCALE = 0.6                 # random resized crop: area fraction in [0.6, 1]
CANVAS_SCALE = (0.4, 1.0)        # emoji side / canvas side (scenes: 28-58 px emoji on 128 px, i.e. 0.44-0.9 at 64)
BACKGROUND = (228, 255)          # canvas colour range per channel, as the scenes use
WHITE = 235                      # emoji pixels with every channel >= WHITE are its background
WEIGHT_DECAY = 0.05
WORD_MIN_COUNT = 4               # a name word gets an output when at least this many training images carry it


def category(record: Record) -> str:
    """An emoji's category: its first tag, or "(none)"."""
    return record.tags[0] if record.tags else UNTAGGED


class RegionClassifier(nn.Module):
    """Trunk -> global average pool (the region feature, (B, F)) -> category logits (B, C)."""

    def __init__(self, class_names: list[str], trunk: str = "resnet18", stem: str = "small",
                 identities: list[str] | None = None, words: list[str] | None = None):
        super().__init__()
        self.class_names, self.identities, self.words = list(class_names), list(identities or []), list(words or [])
        self.trunk_name, self.stem = trunk, stem
        self.trunk = TorchvisionTrunk(trunk, stem=stem)
        self.head = nn.Linear(self.trunk.width, len(self.class_names))
        self.identity_head = nn.Linear(self.trunk.width, len(self.identities)) if self.identities else None
        self.word_head = nn.Linear(self.trunk.width, len(self.words)) if self.words else None
        self.info: dict = {}

    @property
    def feature_dim(self) -> int:
        return self.trunk.width

    def pool(self, fmap: Tensor) -> Tensor:
        """(B, F, h, w) feature map or RoI grid -> (B, F): the average, the classifier's own pooling."""
        return fmap.mean((2, 3))

    def features(self, images: Tensor) -> Tensor:
        """images (B, 3, H, W) normalised -> pooled features (B, F)."""
        return self.pool(self.trunk.feature_map(images))

    def forward(self, images: Tensor) -> Tensor:
        """images (B, 3, H, W) normalised -> category logits (B, C)."""
        return self.head(self.features(images))


def augment(image: Tensor, gen: torch.Generator) -> Tensor:
    """(3, S, S) uint8 emoji on white -> a training view (3, S, S) uint8: a random resized crop, shrunk and
    pasted at a random place on a canvas of a random light colour (the emoji's white surround takes it too)."""
    size = image.shape[-1]
    image = random_resized_crop(image, CROP_SCALE, gen)
    r = torch.rand(3, generator=gen).tolist()
    side = max(1, round(size * (CANVAS_SCALE[0] + (CANVAS_SCALE[1] - CANVAS_SCALE[0]) * r[0])))
    small = TF.resize(image, [side, side], antialias=True)                                # (3, side, side)
    colour = torch.randint(BACKGROUND[0], BACKGROUND[1] + 1, (3, 1, 1), generator=gen, dtype=torch.uint8)
    canvas = colour.expand(3, size, size).clone()
    top, left = int((size - side) * r[1]), int((size - side) * r[2])
    patch = canvas[:, top:top + side, left:left + side]
    canvas[:, top:top + side, left:left + side] = torch.where((small >= WHITE).all(0), patch, small)
    return canvas


def _english_words(record: Record) -> set[str]:
    return {w.lower() for c, lang in zip(record.captions, record.langs) if lang in ("en", "")
            for w in re.findall(r"[^\W_]+", c) if not any("\u4e00" <= ch <= "\u9fff" for ch in w)}


def name_words(records: list[Record], min_count: int = WORD_MIN_COUNT) -> list[str]:
    """The English name words carried by at least `min_count` of the records, sorted."""
    counts = Counter(w for r in records for w in _english_words(r))
    return sorted(w for w, n in counts.items() if n >= min_count)


def _word_targets(records: list[Record], vocab: list[str]) -> Tensor:
    """(N, W) float multi-hot: which vocabulary words each record's English name holds."""
    position = {w: i for i, w in enumerate(vocab)}
    targets = torch.zeros(len(records), len(vocab))
    for n, r in enumerate(records):
        for w in _english_words(r):
            if w in position:
                targets[n, position[w]] = 1.0
    return targets


def bf16_autocast(bf16: bool):
    """bf16 autocast on the CPU when asked, else a no-op context."""
    return torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()


@torch.no_grad()
def accuracy(model: RegionClassifier, images: Tensor, labels: Tensor, batch_size: int = 64, bf16: bool = False
             ) -> float:
    """Category accuracy on uint8 images (N, 3, S, S) with labels (N,), in eval mode."""
    model.eval()
    hits = 0
    for i in range(0, len(images), batch_size):
        with bf16_autocast(bf16):
            logits = model(normalize(images[i:i + batch_size]))
        hits += int((logits.argmax(-1) == labels[i:i + batch_size]).sum())
    return hits / len(images)


@torch.no_grad()
def word_top1(model: RegionClassifier, images: Tensor, targets: Tensor, bf16: bool = False) -> float:
    """Of the images whose name holds a vocabulary word, the share whose most likely word is in the name."""
    model.eval()
    keep = targets.any(1)
    with bf16_autocast(bf16):
        top = torch.cat([model.word_head(model.features(normalize(images[keep][i:i + 64]))).argmax(-1)
                         for i in range(0, int(keep.sum()), 64)])
    return float(targets[keep].gather(1, top[:, None]).mean())


def _split(records: list[Record], split: str, image_size: int, class_names: list[str], progress: bool
           ) -> tuple[list[Record], Tensor, Tensor]:
    """One split's records, decoded images (N, 3, S, S) uint8 and category labels (N,)."""
    chosen = [r for r in records if r.split == split]
    if not chosen:
        raise ValueError(f"the emoji data has no {split!r} records: the classifier trains on 'train' and is "
                         "measured on 'val'")
    chosen, images = decode_images(chosen, image_size, SkipReport(), progress)
    labels = torch.tensor([class_names.index(category(r)) for r in chosen])
    return chosen, images, labels


def train_classifier(emoji_json: str | Path, out_dir: str | Path, steps: int = 140, batch_size: int = 32,
                     image_size: int = 64, lr: float = 2e-3, seed: int = 0, trunk: str = "resnet18",
                     stem: str = "small", identity: bool = False, words: bool = False, bf16: bool | None = None,
                     overwrite: bool = False, resume: bool = False, save_every: int = 50,
                     progress: bool = True) -> RegionClassifier:
    """Train on the train split of an emoji `dataset.json`, measure category accuracy on its val split,
    save `out_dir/classifier.safetensors` + `classifier.json`. -> the model in eval mode, `.info` as saved.
    The defaults take under 4 minutes on one CPU thread for the emoji set. identity: add the emoji-identity
    head as an auxiliary loss (over ~1,800 classes it cost val accuracy at 140 steps: 46.9% vs 51.8%).
    Every `save_every` steps the whole training state goes to `out_dir/progress.pt` (atomically);
    resume=True continues an interrupted run from there exactly as if it had not stopped, with the same
    settings only (else OtherSettings, a ValueError); the file is removed when the classifier is saved."""
    bf16 = use_bf16(bf16)                 # None: bf16 autocast where this CPU has native bf16
    out_dir = Path(out_dir)
    if (out_dir / CONFIG).exists() and not overwrite:
        raise FileExistsError(f"{out_dir} already holds a classifier ({CONFIG}); pass overwrite=True to replace it")
    settings = {"data": str(emoji_json), "steps": steps, "batch_size": batch_size, "image_size": image_size,
                "lr": lr, "seed": seed, "trunk": trunk, "stem": stem, "identity": identity, "words": words,
                "bf16": bf16}
    state = _resume_state(out_dir, settings, resume, overwrite)
    torch.manual_seed(seed)
    records, _ = read_records(emoji_json)
    class_names = sorted({category(r) for r in records})
    train, images, labels = _split(records, "train", image_size, class_names, progress)
    val, val_images, val_labels = _split(records, "val", image_size, class_names, progress)
    identities = sorted({r.meta["hex"] for r in train}) if identity else []
    position = {h: i for i, h in enumerate(identities)}
    ident = torch.tensor([position[r.meta["hex"]] for r in train]) if identity else None
    vocab = name_words(train) if words else []
    word_targets = _word_targets(train, vocab) if words else None
    model = RegionClassifier(class_names, trunk, stem, identities, vocab)
    opt = build_optimizer(model, lr, WEIGHT_DECAY)
    sched = build_scheduler(opt, warmup=max(1, steps // 10), total=steps)
    gen = torch.Generator().manual_seed(seed)
    done, spent = 0, 0.0
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        gen.set_state(state["generator"])
        done, spent = state["step"], state["seconds"]
    start = time.perf_counter()
    bar = tqdm(range(done, steps), desc="region classifier", disable=not progress, initial=done, total=steps)
    for step in bar:
        model.train()
        idx = torch.randint(len(images), (batch_size,), generator=gen)
        views = normalize(torch.stack([augment(images[i], gen) for i in idx]))
        with bf16_autocast(bf16):
            feats = model.features(views)                                             # (B, F)
            loss = F.cross_entropy(model.head(feats).float(), labels[idx])
            if ident is not None:
                loss = loss + F.cross_entropy(model.identity_head(feats).float(), ident[idx])
            if word_targets is not None:
                loss = loss + F.binary_cross_entropy_with_logits(model.word_head(feats).float(), word_targets[idx])
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        bar.set_postfix(loss=f"{loss.item():.3f}")
        if (step + 1) % save_every == 0 and step + 1 < steps:
            _save_progress(out_dir, {"settings": settings, "step": step + 1, "model": model.state_dict(),
                                     "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                                     "generator": gen.get_state(),
                                     "seconds": spent + time.perf_counter() - start})
    seconds = spent + time.perf_counter() - start
    info = {"trunk": trunk, "stem": stem, "image_size": image_size, "feature_dim": model.feature_dim,
            "class_names": class_names, "identities": identities, "words": vocab,
            "val_accuracy": accuracy(model, val_images, val_labels, bf16=bf16),
            "val_chance": float(torch.bincount(val_labels).max()) / len(val_labels), "val_images": len(val_labels),
            "train_images": len(images), "steps": steps, "batch_size": batch_size, "lr": lr, "seed": seed,
            "bf16": bf16, "train_seconds": round(seconds, 1), "data": str(emoji_json)}
    if vocab:
        info["val_word_top1"] = word_top1(model, val_images, _word_targets(val, vocab), bf16)
    save_classifier(model, info, out_dir)
    (out_dir / PROGRESS).unlink(missing_ok=True)
    return model


class OtherSettings(ValueError):
    """An interrupted classifier run cannot be resumed with other settings."""


def _resume_state(out_dir: Path, settings: dict, resume: bool, overwrite: bool) -> dict | None:
    """The saved state of an interrupted run in `out_dir` to continue (resume), or None to start afresh."""
    path = out_dir / PROGRESS
    if not path.is_file():
        return None
    if not resume:
        if overwrite:
            return None
        step = torch.load(path, weights_only=True)["step"]
        raise FileExistsError(f"{out_dir} holds an interrupted classifier run (step {step} of "
                              f"{settings['steps']}); pass resume=True (--resume) to continue it or "
                              "overwrite=True (--overwrite) to start again")
    state = torch.load(path, weights_only=True)
    differ = {k: (state["settings"].get(k), v) for k, v in settings.items() if state["settings"].get(k) != v}
    if differ:
        raise OtherSettings(f"cannot resume the classifier run in {out_dir} with other settings: " +
                         ", ".join(f"{k} was {a!r}, now {b!r}" for k, (a, b) in differ.items()))
    return state


def _save_progress(out_dir: Path, state: dict) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / f".{PROGRESS}.tmp-{os.getpid()}"
    torch.save(state, tmp)
    os.replace(tmp, out_dir / PROGRESS)


def save_classifier(model: RegionClassifier, info: dict, out_dir: str | Path) -> None:
    """Weights, then classifier.json last, each via a temporary file and a rename: a classifier.json that
    exists names complete weights."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / CONFIG).unlink(missing_ok=True)
    tmp = out_dir / f".{WEIGHTS}.tmp-{os.getpid()}"
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, tmp)
    os.replace(tmp, out_dir / WEIGHTS)
    tmp = out_dir / f".{CONFIG}.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(info, indent=1, ensure_ascii=False), encoding="utf-8")
    os.replace(tmp, out_dir / CONFIG)
    model.info = info


def load_classifier(path: str | Path, device: str | torch.device = "cpu") -> RegionClassifier:
    """A classifier folder written by `train_classifier` -> the model in eval mode, `.info` = classifier.json."""
    path = Path(path)
    if not (path / CONFIG).is_file() or not (path / WEIGHTS).is_file():
        raise FileNotFoundError(f"no region classifier in {path} (expected {CONFIG} and {WEIGHTS}; "
                                "train one with train_classifier / `vlp regions train`)")
    info = json.loads((path / CONFIG).read_text(encoding="utf-8"))
    model = RegionClassifier(info["class_names"], info["trunk"], info["stem"], info["identities"], info.get("words"))
    model.load_state_dict(load_file(path / WEIGHTS))
    model.info = info
    return model.to(device).eval()

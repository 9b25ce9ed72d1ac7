"""The one training loop, read top to bottom. Periodic work is `if step % n == 0`.

    run_dir = train(cfg)                        # pretrain
    run_dir = train(cfg, init="runs/x")         # fine-tune from a checkpoint's weights
    run_dir = train(cfg, resume=True)           # continue exactly where the newest checkpoint stopped
"""
from __future__ import annotations

import contextlib
import json
import math
import time
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm

from vlp import config as config_lib
from vlp.data.collate import Collator, PairCollator, views_for
from vlp.data.formats import SkipReport, read_records
from vlp.data.pairs import PairDataset, ResumableBatches
from vlp.data.region_pairs import RegionPairDataset, mine_neighbours
from vlp.data.regions import RegionStore
from vlp.layers import use_bf16
from vlp.models import build_model
from vlp.objectives import MASKED, build_objectives
from vlp.train import checkpoint as ckpt
from vlp.train import dist
from vlp.train.optim import build_optimizer, build_scheduler


class TrainingError(RuntimeError):
    pass


def prepare_data(cfg: config_lib.Config, split: str, report: SkipReport, progress: bool = True,
                 manifest: str = ""):
    """Read the manifest (building the emoji set first when asked to) -> records of one split."""
    manifest = manifest or cfg.data.train
    if cfg.data.build_emoji and Path(manifest).parent.name == "emoji" and not Path(manifest).exists():
        if dist.is_main():
            from vlp.data.emoji import build_emoji
            build_emoji(Path(manifest).parent, size=max(cfg.model.image_size, 64), progress=progress)
        dist.barrier()
    records, skipped = read_records(manifest, image_root=cfg.data.image_root or None, split=split,
                                    lang=cfg.data.lang or None)
    report.merge(skipped)
    if not records:
        raise ValueError(f"no usable records for split {split!r} in {manifest} ({skipped.summary()})")
    if split == cfg.data.train_split and cfg.data.train_limit:
        records = records[:cfg.data.train_limit]
    return records


def build_tokenizer(cfg: config_lib.Config, texts: list[str]):
    """The text checkpoint's vocabulary (extended with the captions' missing characters), or a new one."""
    from vlp.data.tokenizer import Tokenizer, resolve_checkpoint_dir
    if cfg.model.text_init:
        tok = Tokenizer.from_dir(resolve_checkpoint_dir(cfg.model.text_init))
        if cfg.model.extend_vocab:
            tok.extend(texts)
        return tok
    return Tokenizer.train(texts, vocab_size=8000)


def train(cfg: config_lib.Config, resume: bool = False, init: str | None = None, progress: bool = True,
          overwrite: bool = False, vocab_texts: list[str] | tuple = ()) -> Path:
    """One training run. vocab_texts: more captions a new vocabulary must cover (later stages')."""
    device = dist.init()
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    torch.manual_seed(cfg.train.seed + dist.rank())
    t = cfg.train
    run_dir = Path(t.out or f"runs/{t.name}")
    if not resume and (run_dir / "checkpoints").exists():
        if not overwrite:
            raise TrainingError(f"{run_dir} already holds checkpoints: pass --resume to continue it, --overwrite "
                                f"to start again, or --out for a new folder")
        if dist.is_main():
            import shutil
            shutil.rmtree(run_dir / "checkpoints")
    log = _Logger(run_dir, enabled=dist.is_main(), append=resume)

    # --- data and tokenizer --------------------------------------------------------------------------
    report = SkipReport()
    records = prepare_data(cfg, cfg.data.train_split, report, progress)
    start_step, state = 0, None
    if resume:
        try:
            state = ckpt.trainer_state(run_dir)
        except FileNotFoundError:
            log.info(f"--resume: no checkpoint in {run_dir} yet, starting from step 0")
    store = _region_store(cfg) if cfg.model.arch == "imagebert" else None
    if state is not None or init:
        model, tokenizer = ckpt.load_for_training(run_dir if state is not None else init, cfg)
    else:
        tokenizer = build_tokenizer(cfg, [c for r in records for c in r.captions] + list(vocab_texts))
        model = build_model(cfg.model, tokenizer.vocab_size)
        _init_new_rows(model, tokenizer, records, cfg, log)
    group_key = "hex" if any("hex" in r.meta for r in records) else ""     # emoji: one group per emoji
    if store is not None:       # single stream: (caption, regions) pairs, negatives and masks made in the collator
        d = cfg.data
        dataset = RegionPairDataset(records, store, seed=t.seed, report=report, group_key=group_key,
                                    negatives=d.negatives)
        if d.hard_negatives > 0:
            log.info(f"hard negatives: the {d.hard_pool} nearest records by "
                     + ("caption TF-IDF" if d.hard_from == "tfidf" else f"the dual encoder {d.hard_from}"))
            dataset.neighbours = mine_neighbours(dataset.records, dataset.group_ids, d.hard_from, d.hard_pool,
                                                 d.hard_max_sim, progress=progress)
        masked = any(cfg.objectives.get(name, 0) > 0 for name in MASKED)
        if d.itm_clean and not masked:
            log.info("warning: data.itm_clean has no effect without a masked objective (nothing is masked)")
        collate = PairCollator(tokenizer, cfg.model.text_max_len, negatives=d.negatives, mask=masked,
                               seed=t.seed, hard=d.hard_negatives, clean_itm=d.itm_clean)
    else:
        dataset = PairDataset(records, cfg.model.image_size, group_key=group_key, augment=cfg.data.augment,
                              crop_scale=cfg.data.crop_scale, seed=t.seed, report=report, progress=progress)
        collate = Collator(tokenizer, cfg.model.text_max_len, views_for(cfg.objectives))
    groups = len(set(dataset.group_ids)) if hasattr(dataset, "group_ids") else len(dataset)
    log.info(f"train: {len(dataset.records)} images in {groups} groups; tokenizer: {tokenizer.vocab_size} "
             f"tokens; skipped: {report.summary() or 'nothing'}")
    by_lang: dict[str, list[str]] = {}
    for r in dataset.records:
        for c, lg in zip(r.captions, r.langs):
            by_lang.setdefault(lg or "?", []).append(c)
    log.info("[UNK] rate of the training captions: " + ", ".join(
        f"{lg} {100 * tokenizer.unk_rate(cs):.2f}%" for lg, cs in sorted(by_lang.items())))

    # --- model, objectives, optimiser ---------------------------------------------------------------
    model.to(device)
    objectives = build_objectives(cfg.model.arch, cfg.objectives)
    opt = build_optimizer(model, t.lr, t.weight_decay, cfg.model.text_lr_scale)
    sched = build_scheduler(opt, t.warmup_steps, t.steps, t.min_lr_ratio)
    if state is not None:
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        start_step = state["step"]
        log.truncate(start_step)
        log.info(f"resumed from step {start_step}")
    ddp = DistributedDataParallel(model) if dist.world() > 1 else model
    if not resume or state is None:
        run_dir.mkdir(parents=True, exist_ok=True)
        if dist.is_main():
            (run_dir / "config.toml").write_text(config_lib.dump(cfg))
    batches = ResumableBatches(len(dataset), t.batch_size, t.seed, start=start_step * t.grad_accum,
                               rank=dist.rank(), world=dist.world(),
                               clusters=dataset.clusters(cfg.data.cluster_key) if cfg.data.cluster_key else None,
                               cluster_size=cfg.data.cluster_size)
    loader = iter(DataLoader(dataset, batch_sampler=batches, collate_fn=collate, num_workers=cfg.data.num_workers))
    bf16 = use_bf16(None if t.precision == "auto" else t.precision == "bf16", device.type)
    if t.precision == "auto":
        log.info(f"precision auto: {'bf16 autocast' if bf16 else 'float32 (no native bf16 matmuls here)'}")
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    if hasattr(model, "cache_text"):      # a locked text tower: its features for fixed captions, once
        captions = sorted({c for r in dataset.records for c in r.captions})
        ids, mask = tokenizer.encode(captions, cfg.model.text_max_len)
        with autocast:
            if n := model.cache_text(ids.to(device), mask.to(device)):
                log.info(f"locked text tower: features of {n} of {len(captions)} training captions precomputed")
    eval_records = _eval_records(cfg, report) if store is None else []   # cross-encoders: eval/rerank.py
    if state is not None:                 # last: building the loader above draws from the global RNG
        torch.set_rng_state(state["rng"])

    # --- the loop -----------------------------------------------------------------------------------
    bar = tqdm(range(start_step, t.steps), initial=start_step, total=t.steps, desc=t.name,
               disable=not (progress and dist.is_main()))
    tick, seen, data_s = time.perf_counter(), 0, 0.0      # data_s: time spent waiting for batches
    for step in bar:
        model.train()
        totals: dict[str, float] = {}
        for _ in range(t.grad_accum):
            t_data = time.perf_counter()
            batch = next(loader).to(device)
            data_s += time.perf_counter() - t_data
            with autocast:
                out = ddp(batch)
                losses = {name: w * obj(out, batch) for name, (w, obj) in objectives.items()}
                loss = sum(losses.values()) / t.grad_accum
            if not torch.isfinite(loss):
                raise TrainingError(f"loss is {loss.item()} at step {step + 1} ({_fmt(losses)}); stopped. The last good "
                                    f"checkpoint in {run_dir / 'checkpoints'} is intact: lower train.lr or check the data")
            loss.backward()
            for name, v in losses.items():
                totals[name] = totals.get(name, 0.0) + v.item() / t.grad_accum
            seen += batch.pairs() * dist.world()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), t.clip_grad or float("inf"))
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        done = step + 1

        if done % t.log_every == 0 or done == t.steps:
            elapsed = time.perf_counter() - tick
            row = {"step": done, "loss": sum(totals.values()), **totals, "lr": sched.get_last_lr()[0],
                   "grad_norm": float(grad_norm), "logit_scale": model.scale().item() if hasattr(model, "scale") else None,
                   "pairs_per_s": seen / max(elapsed, 1e-9),
                   "data_fraction": data_s / max(elapsed, 1e-9)}
            log.metrics(row)
            bar.set_postfix(loss=f"{row['loss']:.3f}", pairs_s=f"{row['pairs_per_s']:.0f}")
            tick, seen, data_s = time.perf_counter(), 0, 0.0
        if eval_records and ((t.eval_every and done % t.eval_every == 0) or done == t.steps):
            log.metrics({"step": done, "split": cfg.data.eval_split, **_evaluate(model, tokenizer, eval_records, cfg)})
        if (t.save_every and done % t.save_every == 0) or done == t.steps:
            if dist.is_main():
                ckpt.save_checkpoint(run_dir, done, model, tokenizer, cfg, keep=t.keep_checkpoints, trainer_state={
                    "step": done, "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                    "rng": torch.get_rng_state()})
            dist.barrier()
    bar.close()
    return run_dir


def _region_store(cfg: config_lib.Config) -> RegionStore:
    """The training images' region store; its feature size and class count size the model."""
    if not cfg.data.regions:
        raise TrainingError("model.arch = imagebert reads detector regions: set data.regions to a region store "
                            "(vlp regions extract ... or vlp regions import ...)")
    store = RegionStore(cfg.data.regions)
    dims = (int(store.features.shape[1]), max(1, len(store.class_names)))
    if cfg.model.region_dim and (cfg.model.region_dim, cfg.model.region_classes) != dims:
        raise TrainingError(f"{cfg.data.regions} holds {dims[0]}-d features over {dims[1]} classes, but the model "
                            f"was built for {cfg.model.region_dim} / {cfg.model.region_classes}")
    cfg.model.region_dim, cfg.model.region_classes = dims
    return store


def _init_new_rows(model, tokenizer, records, cfg, log) -> None:
    """Vocabulary rows a pretrained text tower lacked start at their translations (`new_token_init="pairs"`):
    every caption is paired with the other-language captions of its image."""
    first_new = getattr(model.text, "pretrained_vocab", 0)
    if not (cfg.model.text_init and cfg.model.new_token_init == "pairs" and 0 < first_new < tokenizer.vocab_size):
        return
    from vlp.encoders.text import init_rows_from_pairs
    pairs = [(a, b) for r in records for a, la in zip(r.captions, r.langs)
             for b, lb in zip(r.captions, r.langs) if la != lb]
    n = init_rows_from_pairs(model.text, tokenizer, pairs, first_new)
    log.info(f"vocabulary: {tokenizer.vocab_size - first_new} new tokens, {n} initialised from "
             f"{len(pairs)} caption translations, the rest at the mean")


def _eval_records(cfg, report):
    if not cfg.data.eval_split:
        return []
    try:
        return prepare_data(cfg, cfg.data.eval_split, report, progress=False, manifest=cfg.data.eval)
    except ValueError:
        return []


def _evaluate(model, tokenizer, records, cfg) -> dict:
    from vlp.eval.retrieval import evaluate
    res = evaluate(model, tokenizer, records, image_size=cfg.model.image_size, max_len=cfg.model.text_max_len,
                   batch_size=cfg.eval.batch_size, progress=False)
    return {k: v for k, v in res.items() if not isinstance(v, dict)}


def _fmt(losses: dict) -> str:
    return ", ".join(f"{k}={v.item():.4g}" for k, v in losses.items())


class _Logger:
    """metrics.jsonl (one JSON object per line) + messages through tqdm so bars stay intact."""

    def __init__(self, run_dir: Path, enabled: bool, append: bool):
        self.path, self.enabled = run_dir / "metrics.jsonl", enabled
        if enabled:
            run_dir.mkdir(parents=True, exist_ok=True)
            if not append and self.path.exists():
                self.path.unlink()

    def metrics(self, row: dict) -> None:
        if self.enabled:
            with self.path.open("a") as f:
                f.write(json.dumps({k: v for k, v in row.items() if v is not None}) + "\n")

    def truncate(self, step: int) -> None:
        """On resume, drop rows an interrupted run logged after its last checkpoint."""
        if self.enabled and self.path.exists():
            rows = [ln for ln in self.path.read_text().splitlines() if ln and json.loads(ln).get("step", 0) <= step]
            self.path.write_text("".join(r + "\n" for r in rows))

    def info(self, msg: str) -> None:
        if self.enabled:
            tqdm.write(msg)

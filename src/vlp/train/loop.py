"""The one training loop, read top to bottom, for every system. Periodic work is `if step % n == 0`.
What differs between systems (data, model, objectives, evaluation) comes from `vlp.systems.get(arch)`.

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
from vlp import systems
from vlp.data.formats import SkipReport, read_records
from vlp.data.pairs import ResumableBatches
from vlp.layers import use_bf16
from vlp.train import checkpoint as ckpt
from vlp.train import dist
from vlp.train.optim import build_optimizer, build_scheduler, lr_lambda


_clock = time.perf_counter          # the clock train.time_budget reads (tests substitute a deterministic one)


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
    """One training run of any system. vocab_texts: more captions a new vocabulary must cover (later stages')."""
    device = dist.init()
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    torch.manual_seed(cfg.train.seed + dist.rank())
    t = cfg.train
    system = systems.get(cfg.model.arch)
    try:
        system.check(cfg)
    except config_lib.ConfigError as e:
        raise TrainingError(str(e)) from None
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
    if state is not None and t.time_budget:
        t.steps = state.get("total_steps", t.steps)        # the count this run fitted into its time budget
    if state is not None or init:
        model, tokenizer = ckpt.load_for_training(run_dir if state is not None else init, cfg)
    else:
        tokenizer = build_tokenizer(cfg, [c for r in records for c in r.captions] + list(vocab_texts))
        model = system.build_model(cfg.model, tokenizer.vocab_size)
        _init_new_rows(model, tokenizer, records, cfg, log)
    data = system.train_data(cfg, records, tokenizer, report, log, progress)
    log.info(f"train: {len(data.records)} images in {data.groups} groups; tokenizer: {tokenizer.vocab_size} "
             f"tokens; skipped: {report.summary() or 'nothing'}")
    by_lang: dict[str, list[str]] = {}
    for r in data.records:
        for c, lg in zip(r.captions, r.langs):
            by_lang.setdefault(lg or "?", []).append(c)
    log.info("[UNK] rate of the training captions: " + ", ".join(
        f"{lg} {100 * tokenizer.unk_rate(cs):.2f}%" for lg, cs in sorted(by_lang.items())))

    # --- model, objectives, optimiser ---------------------------------------------------------------
    model.to(device)
    objectives = system.build_objectives(cfg.objectives)
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
    batches = ResumableBatches(len(data.dataset), t.batch_size, t.seed, start=start_step * t.grad_accum,
                               rank=dist.rank(), world=dist.world(), clusters=data.clusters,
                               cluster_size=cfg.data.cluster_size)
    loader = iter(DataLoader(data.dataset, batch_sampler=batches, collate_fn=data.collate,
                             num_workers=cfg.data.num_workers))
    bf16 = use_bf16(None if t.precision == "auto" else t.precision == "bf16", device.type)
    if t.precision == "auto":
        log.info(f"precision auto: {'bf16 autocast' if bf16 else 'float32 (no native bf16 matmuls here)'}")
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    system.before_training(model, data, tokenizer, cfg, autocast, log)
    evaluate = system.periodic_eval(cfg, report)       # None: the system is evaluated after training only
    if state is not None:                 # last: building the loader above draws from the global RNG
        torch.set_rng_state(state["rng"])

    # --- the loop -----------------------------------------------------------------------------------
    bar = tqdm(total=t.steps, initial=start_step, desc=t.name, disable=not (progress and dist.is_main()))
    tick, seen, data_s = time.perf_counter(), 0, 0.0      # data_s: time spent waiting for batches
    measure_at = min(20, t.warmup_steps) if t.time_budget else 0       # 0: the step count is fixed
    measure_at = measure_at if start_step < measure_at else 0            # a resumed run measured it already
    started = first_done = _clock()
    step = start_step
    while step < t.steps:
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
        done = step = step + 1
        bar.update(1)
        if done == start_step + 1:
            first_done = _clock()                         # the first step carries one-off costs: measured from its end
        if done == measure_at:
            per_step = _fit_steps_to_budget(t, done - start_step, started, first_done, sched)
            bar.total = t.steps
            log.info(f"time budget {t.time_budget:.0f} s: {t.steps} steps at {per_step:.2f} s/step on this machine")
            if dist.is_main():
                (run_dir / "config.toml").write_text(config_lib.dump(cfg))

        if done % t.log_every == 0 or done == t.steps:
            elapsed = time.perf_counter() - tick
            row = {"step": done, "loss": sum(totals.values()), **totals, "lr": sched.get_last_lr()[0],
                   "grad_norm": float(grad_norm), **system.log_stats(model),
                   "pairs_per_s": seen / max(elapsed, 1e-9), "data_fraction": data_s / max(elapsed, 1e-9)}
            log.metrics(row)
            bar.set_postfix(loss=f"{row['loss']:.3f}", pairs_s=f"{row['pairs_per_s']:.0f}")
            tick, seen, data_s = time.perf_counter(), 0, 0.0
        if evaluate and ((t.eval_every and done % t.eval_every == 0) or done == t.steps):
            log.metrics({"step": done, "split": cfg.data.eval_split, **evaluate(model, tokenizer)})
        if (t.save_every and done % t.save_every == 0) or done == t.steps:
            if dist.is_main():
                ckpt.save_checkpoint(run_dir, done, model, tokenizer, cfg, keep=t.keep_checkpoints, trainer_state={
                    "step": done, "total_steps": t.steps, "optimizer": opt.state_dict(),
                    "scheduler": sched.state_dict(), "rng": torch.get_rng_state()})
            dist.barrier()
    bar.close()
    return run_dir


def _fit_steps_to_budget(t: config_lib.TrainConfig, ran: int, started: float, first_done: float, sched) -> float:
    """train.time_budget, after `ran` steps of this process: the total steps become what fits in the budget at
    the rate of all but the first of them (at most train.steps; rank 0's count on every rank). Called within
    the warmup, whose learning rates do not depend on the total, so the schedule is the one a run configured
    with that count from the start follows. -> seconds per step."""
    now = _clock()
    per_step = (now - first_done) / (ran - 1) if ran > 1 else (now - started) / ran
    done = sched.last_epoch
    fits = done + int(max(0.0, t.time_budget - (now - started)) / max(per_step, 1e-9))
    t.steps = dist.broadcast_int(max(done, min(t.steps, fits)))
    sched.lr_lambdas = [lr_lambda(t.warmup_steps, t.steps, t.min_lr_ratio)] * len(sched.lr_lambdas)
    return per_step


def _init_new_rows(model, tokenizer, records, cfg, log) -> None:
    """Vocabulary rows a pretrained text tower lacked start at their translations (`new_token_init="pairs"`):
    every caption is paired with the other-language captions of its image."""
    first_new = model.text.freezing.pretrained_vocab
    if not (cfg.model.text_init and cfg.model.new_token_init == "pairs" and 0 < first_new < tokenizer.vocab_size):
        return
    from vlp.encoders.text import init_rows_from_pairs
    pairs = [(a, b) for r in records for a, la in zip(r.captions, r.langs)
             for b, lb in zip(r.captions, r.langs) if la != lb]
    n = init_rows_from_pairs(model.text, tokenizer, pairs, first_new)
    log.info(f"vocabulary: {tokenizer.vocab_size - first_new} new tokens, {n} initialised from "
             f"{len(pairs)} caption translations, the rest at the mean")


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

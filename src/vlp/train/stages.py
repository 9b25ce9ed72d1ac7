"""Multi-stage training (ImageBERT, Qi et al. 2020, "Multi-stage pre-training"): a config lists `[[stages]]`, each
overriding the base config (its data, objectives and weights, steps, lr, ...) and starting from the
weights the previous stage ended with. Every stage is an ordinary run of `vlp.train.loop.train`:

    run_dir/stages/<name>/   every stage but the last (checkpoints, metrics.jsonl, config.toml)
    run_dir/                 the last stage: the run's final model, what `vlp evaluate run_dir` loads
    run_dir/stages.toml      the whole multi-stage config

A finished stage (its last checkpoint is at its last step) is skipped on `--resume`; an interrupted
one resumes exactly. A stage other than the last with `steps = 0` is left out (e.g. to compare one stage
with two: `--set stages.emoji.train.steps=0`). The first stage builds the vocabulary from the captions of every stage, so a
later stage's new characters are not [UNK].

    run_dir = train_stages(cfg)                  # a config without stages trains once, as `train`
"""
from __future__ import annotations

from pathlib import Path

from vlp import config as config_lib
from vlp.data.formats import SkipReport
from vlp.train import checkpoint as ckpt
from vlp.train import dist
from vlp.train.loop import prepare_data, train


def stage_dirs(cfg: config_lib.Config) -> list[tuple[str, config_lib.Config, Path]]:
    """(name, resolved config, run folder) of every stage."""
    run_dir = Path(cfg.train.out or f"runs/{cfg.train.name}")
    stages = config_lib.stage_configs(cfg)
    out = []
    for i, (name, c) in enumerate(stages):
        c.train.out = str(run_dir if i == len(stages) - 1 else run_dir / "stages" / name)
        out.append((name, c, Path(c.train.out)))
    return out


def _finished(run_dir: Path, steps: int) -> bool:
    """Is the newest checkpoint the run's last (its configured steps, or those it fitted to a time budget)?"""
    try:
        state = ckpt.trainer_state(run_dir)
    except FileNotFoundError:
        return False
    return state["step"] == state.get("total_steps", steps)


def train_stages(cfg: config_lib.Config, resume: bool = False, init: str | None = None, progress: bool = True,
                 overwrite: bool = False) -> Path:
    if not cfg.stages:
        return train(cfg, resume=resume, init=init, progress=progress, overwrite=overwrite)
    stages = stage_dirs(cfg)
    run_dir = stages[-1][2]
    run_dir.mkdir(parents=True, exist_ok=True)
    if dist.is_main():
        (run_dir / "stages.toml").write_text(config_lib.dump(cfg))
    texts = []                                   # later stages' captions, for the first stage's vocabulary
    active = [c for _, c, _ in stages if c.train.steps > 0] or [stages[-1][1]]
    for c in active[1:]:
        texts += [t for r in prepare_data(c, c.data.train_split, SkipReport(),
                                          progress=False) for t in r.captions]
    previous = init
    for i, (name, c, out) in enumerate(stages):
        if c.train.steps == 0 and i < len(stages) - 1:
            print(f"stage {i + 1}/{len(stages)} {name!r}: 0 steps, left out")
            continue
        if resume and _finished(out, c.train.steps):
            print(f"stage {i + 1}/{len(stages)} {name!r}: finished in {out}, skipped")
        else:
            print(f"stage {i + 1}/{len(stages)} {name!r}: {c.train.steps} steps on {c.data.train} -> {out}"
                  + (f" (from {previous})" if previous else ""))
            train(c, resume=resume, init=previous, progress=progress, overwrite=overwrite,
                  vocab_texts=texts if c is active[0] else ())
        previous = str(out)
    return run_dir

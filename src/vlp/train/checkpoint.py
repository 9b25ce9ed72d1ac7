"""Checkpoints: `step_<N>/` folders holding config.json, model.safetensors, the tokenizer and
trainer_state.pt. Written to a temporary folder and renamed, so a folder that exists is complete;
the `latest` file names the newest one.

    model, tokenizer, cfg = load_checkpoint("runs/quickstart")          # a run folder or a step folder
"""
from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from vlp import config as config_lib
from vlp import systems
from vlp.models import text_config


def save_checkpoint(run_dir: str | Path, step: int, model, tokenizer, cfg, trainer_state: dict | None = None,
                    keep: int = 2) -> Path:
    ckpt_root = Path(run_dir) / "checkpoints"
    ckpt_root.mkdir(parents=True, exist_ok=True)
    final = ckpt_root / f"step_{step}"
    tmp = ckpt_root / f".step_{step}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    (tmp / "config.json").write_text(json.dumps(config_lib.to_dict(cfg), indent=1, ensure_ascii=False))
    if hasattr(model, "text"):
        (tmp / "text_config.json").write_text(json.dumps(text_config(model), indent=1))
    save_file({k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}, tmp / "model.safetensors")
    tokenizer.save(tmp)
    if trainer_state is not None:
        torch.save(trainer_state, tmp / "trainer_state.pt")
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    latest_tmp = ckpt_root / ".latest.tmp"
    latest_tmp.write_text(final.name)
    os.replace(latest_tmp, ckpt_root / "latest")
    steps = sorted((int(p.name.split("_")[1]) for p in ckpt_root.glob("step_*") if p.is_dir()))
    for old in steps[:-keep] if keep > 0 else []:
        shutil.rmtree(ckpt_root / f"step_{old}", ignore_errors=True)
    return final


def resolve(path: str | Path) -> Path:
    """A step folder, a run folder or its checkpoints/ folder -> the newest complete step folder."""
    path = Path(path)
    if (path / "model.safetensors").is_file():
        return path
    for root in (path / "checkpoints", path):
        latest = root / "latest"
        if latest.is_file() and (root / latest.read_text().strip() / "model.safetensors").is_file():
            return root / latest.read_text().strip()
    raise FileNotFoundError(f"no checkpoint in {path} (expected model.safetensors, or checkpoints/latest)")


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu"):
    """-> (model in eval mode, tokenizer, config) from a checkpoint written by save_checkpoint.
    Needs nothing but the checkpoint folder (the text tower's architecture is recorded in it)."""
    from vlp.data.tokenizer import Tokenizer

    step_dir = resolve(path)
    cfg = config_lib.from_dict(json.loads((step_dir / "config.json").read_text()))
    tokenizer = Tokenizer.from_dir(step_dir)
    saved_text = json.loads((step_dir / "text_config.json").read_text())
    model = systems.get(cfg.model.arch).build_model(cfg.model, tokenizer.vocab_size, saved_text)
    model.load_state_dict(load_file(step_dir / "model.safetensors"))
    return model.to(device).eval(), tokenizer, cfg


def load_for_training(path: str | Path, cfg):
    """-> (model, tokenizer): a checkpoint's weights in the model the *run's* config describes (its
    freezing and dropout), for resuming and fine-tuning."""
    from vlp.data.tokenizer import Tokenizer

    step_dir = resolve(path)
    tokenizer = Tokenizer.from_dir(step_dir)
    saved_text = json.loads((step_dir / "text_config.json").read_text())
    model = systems.get(cfg.model.arch).build_model(cfg.model, tokenizer.vocab_size, saved_text)
    missing, unexpected = model.load_state_dict(load_file(step_dir / "model.safetensors"), strict=False)
    if missing or unexpected:
        raise ValueError(f"checkpoint {step_dir} does not fit the configured model: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]} (do model.* settings match the checkpoint's config.json?)")
    return model, tokenizer


def trainer_state(path: str | Path) -> dict:
    """-> the state `save_checkpoint` wrote (step, optimizer and scheduler state dicts, RNG state). Loaded
    with weights_only=True: tensors and plain values only (the LambdaLR state holds `lr_lambdas: [None]`
    for our closure), so a crafted file cannot run code on resume."""
    file = resolve(path) / "trainer_state.pt"
    try:
        return torch.load(file, weights_only=True)
    except pickle.UnpicklingError as e:
        raise ValueError(f"{file} holds objects other than tensors and plain values: refused, since loading them "
                         f"could run arbitrary code (vlp's training loop never writes such a file). "
                         f"torch said: {str(e).splitlines()[0]}") from e

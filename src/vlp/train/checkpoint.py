"""Checkpoints: `step_<N>/` folders holding config.json, model.safetensors, the tokenizer and
trainer_state.pt. Written to a temporary folder and renamed, so a folder that exists is complete;
the `latest` file names the newest one.

    model, tokenizer, cfg = load_checkpoint("runs/quickstart")          # a run folder or a step folder
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from vlp import config as config_lib


def save_checkpoint(run_dir: str | Path, step: int, model, tokenizer, cfg, trainer_state: dict | None = None,
                    keep: int = 2) -> Path:
    ckpt_root = Path(run_dir) / "checkpoints"
    ckpt_root.mkdir(parents=True, exist_ok=True)
    final = ckpt_root / f"step_{step}"
    tmp = ckpt_root / f".step_{step}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    (tmp / "config.json").write_text(json.dumps(config_lib.to_dict(cfg), indent=1, ensure_ascii=False))
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
    """-> (model in eval mode, tokenizer, config) from a checkpoint written by save_checkpoint."""
    from vlp.data.tokenizer import Tokenizer
    from vlp.models import build_model

    step_dir = resolve(path)
    cfg = config_lib.from_dict(json.loads((step_dir / "config.json").read_text()))
    tokenizer = Tokenizer.from_dir(step_dir)
    cfg.model.text_init = ""                       # weights come from the checkpoint, not the original BERT
    state = load_file(step_dir / "model.safetensors")
    model = build_model_like(cfg, tokenizer.vocab_size, state)
    model.load_state_dict(state)
    return model.to(device).eval(), tokenizer, cfg


def build_model_like(cfg, vocab_size: int, state: dict):
    """Rebuild the architecture a state dict came from (the text tower's size is read off its tensors)."""
    from vlp.models import build_model
    m = cfg.model
    if "text.embeddings.word.weight" in state:
        m.text_width = state["text.embeddings.word.weight"].shape[1]
        m.text_layers = len({k.split(".")[3] for k in state if k.startswith("text.transformer.blocks.")})
        m.text_max_len = max(m.text_max_len, state["text.embeddings.position.weight"].shape[0])
    return build_model(m, vocab_size)


def trainer_state(path: str | Path) -> dict:
    return torch.load(resolve(path) / "trainer_state.pt", weights_only=False)

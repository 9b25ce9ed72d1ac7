"""The training loop: resume equals an uninterrupted run, NaN stops cleanly, every preset trains."""
import json
from pathlib import Path

import pytest
import torch

from vlp import config
from vlp.train import checkpoint as ckpt
from vlp.train import loop
from vlp.train.stages import train_stages

PRESETS = sorted((Path(__file__).parents[1] / "src/vlp/configs").glob("*.toml"))


def tiny_cfg(data, out, **extra):
    sets = [f'data.train="{data}"', f'train.out="{out}"', "train.steps=6", "train.batch_size=16",
            "train.log_every=1", "train.save_every=3", "train.warmup_steps=2", "data.eval_split=\"\"",
            "model.dropout=0.1"] + [f"{k}={v}" for k, v in extra.items()]
    return config.load(Path(__file__).parents[1] / "src/vlp/configs/tiny.toml", sets)


def losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()
            if "loss" in json.loads(line)]


def interrupted_after(monkeypatch, step: int, run) -> None:
    """Call run() with the checkpoint writer raising KeyboardInterrupt right after it wrote `step`: a run
    interrupted there, its last checkpoint intact."""
    real_save = ckpt.save_checkpoint

    def save_then_crash(run_dir, at, *a, **k):
        real_save(run_dir, at, *a, **k)
        if at == step:
            raise KeyboardInterrupt("simulated interruption")
    monkeypatch.setattr(ckpt, "save_checkpoint", save_then_crash)
    with pytest.raises(KeyboardInterrupt):
        run()
    monkeypatch.setattr(ckpt, "save_checkpoint", real_save)


LOCKED_MINILM = {"model.text_init": '"minilm"', "model.text_freeze_layers": 6, "model.new_token_init": '"pairs"'}
IMAGEBERT = "src/vlp/configs/emoji-imagebert.toml"
INTERBERT = "src/vlp/configs/emoji-interbert.toml"
TINY_INTERBERT = {"model.text_layers": 3, "model.extract_layers": 1}     # 2 shared layers + 1 per stream


def imagebert_cfg(data, regions, out, preset=IMAGEBERT, **extra):
    """A region preset (ImageBERT's by default) at tiny size: a 2-layer text tower from scratch over the tiny
    region store."""
    sets = [f'data.train="{data}"', f'data.regions="{regions}"', f'train.out="{out}"', "train.steps=6",
            "train.batch_size=8", "train.log_every=1", "train.save_every=3", "train.warmup_steps=2",
            "train.precision=fp32", 'model.text_init=""', "model.text_width=32", "model.text_layers=2",
            "model.text_heads=2"] + [f"{k}={v}" for k, v in extra.items()]
    return config.load(Path(__file__).parents[1] / preset, sets)


@pytest.mark.parametrize("text", ["scratch", "locked-minilm", "imagebert", "interbert"])
def test_resume_equals_uninterrupted(text, emoji_tiny, regions_tiny, tmp_path, monkeypatch):
    """Also with a locked MiniLM tower (features of English captions from `cache_text`), with
    ImageBERT (negatives and masks drawn in the collator) and with InterBERT (MSM segments, overlap masking,
    TF-IDF hard negatives)."""
    extra = {"locked-minilm": LOCKED_MINILM, "interbert": TINY_INTERBERT}.get(text, {})
    make = ((lambda out, **kw: imagebert_cfg(emoji_tiny, regions_tiny, out, **kw)) if text == "imagebert"
            else (lambda out, **kw: imagebert_cfg(emoji_tiny, regions_tiny, out, preset=INTERBERT, **kw))
            if text == "interbert" else (lambda out, **kw: tiny_cfg(emoji_tiny, out, **kw)))
    full = loop.train(make(tmp_path / "full", **extra), progress=False)
    interrupted_after(monkeypatch, 3, lambda: loop.train(make(tmp_path / "cut", **extra), progress=False))
    loop.train(make(tmp_path / "cut", **extra), resume=True, progress=False)

    assert len(losses(full)) == 6
    assert losses(tmp_path / "cut") == losses(full)          # bit-identical, steps 1-6
    a = ckpt.load_checkpoint(full)[0].state_dict()
    b = ckpt.load_checkpoint(tmp_path / "cut")[0].state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_refuses_to_overwrite_a_run(emoji_tiny, tmp_path):
    loop.train(tiny_cfg(emoji_tiny, tmp_path / "r", **{"train.steps": 3}), progress=False)
    with pytest.raises(loop.TrainingError, match="--resume"):
        loop.train(tiny_cfg(emoji_tiny, tmp_path / "r", **{"train.steps": 3}), progress=False)


def test_nan_loss_stops_with_last_checkpoint_intact(emoji_tiny, tmp_path, monkeypatch):
    from vlp.objectives import contrastive
    real = contrastive.symmetric_info_nce
    calls = {"n": 0}

    def poisoned(*a, **k):
        calls["n"] += 1
        out = real(*a, **k)
        return out * float("nan") if calls["n"] > 12 else out     # 4 calls per step: NaN from step 4 on
    monkeypatch.setattr(contrastive, "symmetric_info_nce", poisoned)
    with pytest.raises(loop.TrainingError, match="loss is nan at step 4.*intact"):
        loop.train(tiny_cfg(emoji_tiny, tmp_path / "nan"), progress=False)
    model, _, _ = ckpt.load_checkpoint(tmp_path / "nan")
    assert ckpt.resolve(tmp_path / "nan").name == "step_3"
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.stem)
def test_every_preset_tiny_forward_backward(preset, emoji_tiny, regions_tiny, tmp_path):
    """Each preset, shrunk (small images, 2 steps per stage, batch 8), trains, saves and evaluates (dual
    encoders) or logs every objective (single stream, over the tiny region store)."""
    from vlp import systems
    base = config.load(preset)
    single = systems.get(base.model.arch).CROSS_ENCODER
    tiny = {"data.train": f'"{emoji_tiny}"', "train.steps": 2, **({"data.regions": f'"{regions_tiny}"'} if single else {})}
    per_stage = [f"stages.{st['name']}.{k}={v}" for st in base.stages for k, v in tiny.items()]
    cfg = config.load(preset, [f"{k}={v}" for k, v in tiny.items()] + per_stage + [
        f'train.out="{tmp_path / "run"}"', "train.batch_size=8", "train.save_every=2", "model.image_size=32",
        "data.eval_split=\"test\"", "train.precision=fp32"])
    run = train_stages(cfg, progress=False)
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in rows if "loss" in r)
    if single:
        assert all(name in rows[-1] for name in cfg.objectives)
        assert ckpt.load_checkpoint(run)[0].regions.object.in_features == 16          # sized by the store
    else:
        assert any("t2i_r1" in r for r in rows)
    assert (run / "config.toml").is_file() and ckpt.resolve(run).name == "step_2"


def test_train_limit_keeps_the_first_records_of_the_train_split_only(emoji_tiny, tmp_path):
    from vlp.data.formats import SkipReport
    every = loop.prepare_data(tiny_cfg(emoji_tiny, tmp_path / "a"), "train", SkipReport())
    cfg = tiny_cfg(emoji_tiny, tmp_path / "b", **{"data.train_limit": 5, "data.eval_split": '"val"'})
    assert [r.image_id for r in loop.prepare_data(cfg, "train", SkipReport())] == [r.image_id for r in every[:5]]
    assert len(loop.prepare_data(cfg, "val", SkipReport())) == len(       # other splits are not cut
        loop.prepare_data(tiny_cfg(emoji_tiny, tmp_path / "c"), "val", SkipReport()))
    with pytest.raises(config.ConfigError, match="train_limit = -1 must be >= 0"):
        tiny_cfg(emoji_tiny, tmp_path / "d", **{"data.train_limit": -1})

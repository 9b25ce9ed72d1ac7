"""Multi-stage training: stages parse, dump and override; each starts from the previous one's weights;
an interrupted stage resumes exactly and finished ones are skipped."""
import json
from pathlib import Path

import pytest
import torch

from vlp import config
from vlp.train import checkpoint as ckpt
from vlp.train.stages import stage_dirs, train_stages

ROOT = Path(__file__).parents[1]
TWO_STAGES = """
[model]
arch = "imagebert"
text_init = ""
text_width = 32
text_layers = 2
text_heads = 2
[train]
batch_size = 8
log_every = 1
save_every = 3
warmup_steps = 1
[objectives]
mlm = 1.0
itm = 1.0
[[stages]]
name = "english"
[stages.data]
lang = "en"
[stages.train]
steps = 4
lr = 1e-3
[[stages]]
name = "both"
[stages.train]
steps = 6
[stages.objectives]
itm = 1.0
moc = 0.5
"""


def staged_cfg(tmp_path, data, regions, *sets):
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "staged.toml"
    path.write_text(TWO_STAGES)
    return config.load(path, [f'data.train="{data}"', f'data.regions="{regions}"', f'train.out="{tmp_path / "run"}"',
                              *sets])


def test_stages_resolve_dump_and_override(tmp_path):
    path = tmp_path / "staged.toml"
    path.write_text(TWO_STAGES)
    cfg = config.load(path, ["stages.both.train.lr=5e-4", "train.lr=2e-3"])
    (n1, c1), (n2, c2) = config.stage_configs(cfg)
    assert (n1, c1.train.steps, c1.train.lr, c1.data.lang) == ("english", 4, 1e-3, "en")
    assert (n2, c2.train.steps, c2.train.lr, c2.data.lang) == ("both", 6, 5e-4, "")
    assert c1.objectives == {"mlm": 1.0, "itm": 1.0} and c2.objectives == {"itm": 1.0, "moc": 0.5}
    assert not c1.stages and not c2.stages
    again = tmp_path / "again.toml"
    again.write_text(config.dump(cfg))                         # the dump is a config that loads back equal
    assert config.load(again) == cfg
    assert config.from_dict(config.to_dict(cfg)) == cfg        # and so does a checkpoint's config.json
    dirs = [d for _, _, d in stage_dirs(cfg)]
    assert dirs == [Path("runs/run/stages/english"), Path("runs/run")]


@pytest.mark.parametrize("text, error", [
    ('[[stages]]\nname = "a"\n[stages.train]\nstepz = 3\n', "stage 'a': unknown config key train.stepz"),
    ('[[stages]]\n[stages.train]\nsteps = 3\n', "stage 1 needs a name"),
    ('[[stages]]\nname = "a"\n[[stages]]\nname = "a"\n', "two stages are named 'a'"),
    ('[[stages]]\nname = "a"\n[stages.objectives]\nnope = 1.0\n', "unknown objective 'nope'"),
])
def test_bad_stages_name_the_stage_and_key(tmp_path, text, error):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(config.ConfigError, match=error):
        cfg = config.load(path)
        config.stage_configs(cfg)


def test_set_names_an_unknown_stage(tmp_path):
    path = tmp_path / "staged.toml"
    path.write_text(TWO_STAGES)
    with pytest.raises(config.ConfigError, match="no stage named 'third'; stages: english, both"):
        config.load(path, ["stages.third.train.steps=1"])


def test_each_stage_starts_from_the_previous_weights(emoji_tiny, regions_tiny, tmp_path):
    """With lr 0 in the second stage its weights stay the first stage's final ones; the first stage's
    vocabulary already covers the Chinese captions only the second stage reads."""
    cfg = staged_cfg(tmp_path, emoji_tiny, regions_tiny, "stages.both.train.lr=0.0", "train.precision=\"fp32\"")
    run = train_stages(cfg, progress=False)
    first, _, _ = ckpt.load_checkpoint(run / "stages" / "english")
    last, tok, last_cfg = ckpt.load_checkpoint(run)
    a, b = first.state_dict(), last.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert last_cfg.objectives == {"itm": 1.0, "moc": 0.5} and ckpt.resolve(run).name == "step_6"
    from vlp.data.formats import read_records
    zh = [c for r in read_records(emoji_tiny, split="train", lang="zh")[0] for c in r.captions]
    assert zh and tok.unk_rate(zh) == 0.0
    assert config.load(run / "stages.toml") == cfg


def test_interrupted_stage_resumes_and_finished_stages_are_skipped(emoji_tiny, regions_tiny, tmp_path, monkeypatch):
    full = train_stages(staged_cfg(tmp_path / "a", emoji_tiny, regions_tiny, "train.precision=\"fp32\""), progress=False)
    real_save = ckpt.save_checkpoint

    def crash_in_second_stage(run_dir, step, *a, **k):
        real_save(run_dir, step, *a, **k)
        if Path(run_dir).name == "run" and step == 3:
            raise KeyboardInterrupt("simulated interruption")
    monkeypatch.setattr(ckpt, "save_checkpoint", crash_in_second_stage)
    cut_cfg = staged_cfg(tmp_path / "b", emoji_tiny, regions_tiny, "train.precision=\"fp32\"")
    with pytest.raises(KeyboardInterrupt):
        train_stages(cut_cfg, progress=False)
    monkeypatch.setattr(ckpt, "save_checkpoint", real_save)
    first_stage = cut_cfg.train.out + "/stages/english/checkpoints/step_4/model.safetensors"
    before = Path(first_stage).stat().st_mtime_ns
    cut = train_stages(cut_cfg, resume=True, progress=False)
    assert Path(first_stage).stat().st_mtime_ns == before                  # the finished stage was not re-run
    rows = lambda run: [json.loads(x)["loss"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows(cut) == rows(full) and len(rows(full)) == 6


def test_a_stage_with_zero_steps_is_left_out(emoji_tiny, regions_tiny, tmp_path):
    cfg = staged_cfg(tmp_path, emoji_tiny, regions_tiny, "stages.english.train.steps=0", "stages.both.train.steps=2")
    run = train_stages(cfg, progress=False)
    assert not (run / "stages" / "english").exists() and ckpt.resolve(run).name == "step_2"

"""Config: presets load, overrides apply, bad keys and types are clear errors."""
from pathlib import Path

import pytest

from vlp import config

PRESETS = sorted((Path(__file__).parents[1] / "src/vlp/configs").glob("*.toml"))


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.stem)
def test_presets_load_and_round_trip(preset, tmp_path):
    cfg = config.load(preset)
    (tmp_path / "c.toml").write_text(config.dump(cfg))
    assert config.load(tmp_path / "c.toml") == cfg


def test_overrides_parse_types():
    cfg = config.load(None, ["train.batch_size=64", "train.lr=3e-4", "model.image_encoder=vit",
                             "train.precision=bf16", "model.train_new_tokens=false", "objectives.text_text=0.5"])
    assert (cfg.train.batch_size, cfg.train.lr, cfg.model.image_encoder) == (64, 3e-4, "vit")
    assert cfg.model.train_new_tokens is False and cfg.objectives["text_text"] == 0.5
    assert config.load(None, ["train.lr=1"]).train.lr == 1.0          # int widens to float


def test_unknown_key_names_valid_keys():
    with pytest.raises(config.ConfigError, match=r"unknown config key train\.batchsize.*batch_size"):
        config.load(None, ["train.batchsize=3"])
    with pytest.raises(config.ConfigError, match=r"unknown config section \[trian\].*train"):
        config.load(None, ["trian.steps=3"])


def test_wrong_type_and_bad_choice(tmp_path):
    with pytest.raises(config.ConfigError, match=r"train\.steps: expected int, got str"):
        config.load(None, ["train.steps=many"])
    with pytest.raises(config.ConfigError, match=r"precision.*fp32, bf16, auto"):
        config.load(None, ["train.precision=fp16"])
    with pytest.raises(config.ConfigError, match=r"unknown objective 'mlm' for ernie-vil2"):
        config.load(None, ["objectives.mlm=1"])
    (tmp_path / "bad.toml").write_text("[model]\nembed_dim = 'big'\n")
    with pytest.raises(config.ConfigError, match=r"model\.embed_dim: expected int"):
        config.load(tmp_path / "bad.toml")
    with pytest.raises(config.ConfigError, match="not found"):
        config.load(tmp_path / "missing.toml")


def test_retired_key_loads_from_a_saved_run_but_not_from_a_new_config():
    saved = config.to_dict(config.Config())
    saved["data"]["cache_images"] = True                           # written by an earlier version
    assert config.from_dict(saved) == config.Config()
    with pytest.raises(config.ConfigError, match="data.cache_images was removed"):
        config.load(None, ["data.cache_images=false"])


@pytest.mark.parametrize("setting", ["train.log_every=0", "train.batch_size=0", "train.grad_accum=0",
                                     "train.steps=-1", "train.save_every=-5", "data.negatives=0"])
def test_step_counts_and_sizes_are_checked_at_load(setting):
    """train.log_every = 0 used to divide by zero at the first step; every count is checked when loaded."""
    key = setting.split("=")[0].replace(".", r"\.")
    with pytest.raises(config.ConfigError, match=key + " = -?[0-9]+ must be >= [01]"):
        config.load(None, [setting])


def test_text_head_arch_and_hard_negative_share_are_checked():
    with pytest.raises(config.ConfigError, match=r"model\.text_head = 'mpl'; valid choices: linear, mlp"):
        config.load(None, ["model.text_head=mpl"])
    with pytest.raises(config.ConfigError, match=r"model\.arch = 'imagebrt'; valid choices: ernie-vil2, imagebert"):
        config.load(None, ["model.arch=imagebrt"])
    with pytest.raises(config.ConfigError, match=r"hard_negatives .* \[0, 1\]"):
        config.load(PRESETS[0].parent / "emoji-imagebert.toml", ["data.hard_negatives=1.5"])


def test_updated_sets_python_values_with_the_same_checks():
    base = config.load(PRESETS[0], ["train.steps=5"])
    cfg = config.updated(base, {"train.steps": 7, "data.train": "x/dataset.json"})
    assert (cfg.train.steps, cfg.data.train) == (7, "x/dataset.json") and base.train.steps == 5   # a copy
    assert config.updated(base, {}) == base
    assert config.updated(config.Config(), config.parse_sets(["train.lr=3e-4", "data.train=a b"])).train.lr == 3e-4
    with pytest.raises(config.ConfigError, match="unknown config key train.stpes"):
        config.updated(base, {"train.stpes": 7})
    with pytest.raises(config.ConfigError, match="expected int"):
        config.updated(base, {"train.steps": "7"})

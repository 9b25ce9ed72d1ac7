"""One module per system: each provides the whole `System` contract, and nothing outside `vlp.systems`
(the loop, evaluation, checkpoints, config) branches on a system's name."""
import re
from pathlib import Path

import pytest

from vlp import config, systems

SRC = Path(__file__).parents[1] / "src/vlp"


@pytest.mark.parametrize("name", systems.NAMES)
def test_every_system_module_provides_the_contract(name):
    module = systems.get(name)
    assert systems.is_system(module) == []
    assert isinstance(module.OBJECTIVES, tuple) and module.OBJECTIVES and isinstance(module.CROSS_ENCODER, bool)


def test_a_module_missing_a_member_is_reported():
    import types
    partial = types.ModuleType("half")
    partial.OBJECTIVES, partial.build_model = ("x",), lambda *a: None
    missing = systems.is_system(partial)
    assert "train_data" in missing and "evaluate" in missing and "build_model" not in missing


def test_unknown_arch_names_the_valid_ones():
    with pytest.raises(ValueError, match="unknown model.arch 'interbrt'; valid: ernie-vil2, imagebert"):
        systems.get("interbrt")


@pytest.mark.parametrize("path", ["train/loop.py", "train/checkpoint.py", "train/stages.py", "train/optim.py",
                                  "config.py", "objectives/__init__.py", "models/__init__.py", "eval/retrieval.py"])
def test_no_system_names_outside_the_systems_package(path):
    """Adding a system touches its module, presets and tests: the shared code names no system (but the
    default of `model.arch`)."""
    code = "\n".join(ln for ln in (SRC / path).read_text().splitlines() if not ln.strip().startswith("arch: str ="))
    names = [n for n in systems.NAMES if re.search(rf"[\"']{re.escape(n)}[\"']", code)]
    assert names == [], f"{path} names {names}"


def test_a_broken_eval_set_is_an_error_at_start(emoji_tiny, tmp_path):
    """A `data.eval_split` with no records used to switch evaluation off silently."""
    from test_train import tiny_cfg
    from vlp.train.loop import TrainingError, train
    cfg = tiny_cfg(emoji_tiny, tmp_path / "run", **{"data.eval_split": '"valid"'})
    with pytest.raises(TrainingError, match="data.eval_split = 'valid'.*no usable records"):
        train(cfg, progress=False)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_settings_of_another_system_are_refused(emoji_tiny, regions_tiny, tmp_path):
    from test_train import tiny_cfg
    from vlp.train.loop import TrainingError, train
    with pytest.raises(TrainingError, match="data.regions is read by single-stream systems"):
        train(tiny_cfg(emoji_tiny, tmp_path / "a", **{"data.regions": f'"{regions_tiny}"'}), progress=False)


def test_imagebert_check_reads_the_store_and_refuses_a_bad_hard_source(regions_tiny, tmp_path):
    cfg = config.Config()
    cfg.model.arch, cfg.objectives = "imagebert", {"itm": 1.0}
    with pytest.raises(config.ConfigError, match="set data.regions"):
        systems.get("imagebert").check(cfg)
    cfg.data.regions = str(regions_tiny)
    systems.get("imagebert").check(cfg)
    assert (cfg.model.region_dim, cfg.model.region_classes) == (16, 5)
    cfg.data.hard_negatives, cfg.data.hard_from = 0.2, "tfdif"
    with pytest.raises(config.ConfigError, match="hard_from = 'tfdif' is neither"):
        systems.get("imagebert").check(cfg)

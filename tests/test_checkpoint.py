"""trainer_state.pt: what the training loop writes loads with weights_only=True; anything else is refused."""
import os
from pathlib import Path

import pytest
import torch

from vlp import config
from vlp.train import checkpoint as ckpt
from vlp.train import loop

TINY = Path(__file__).parents[1] / "src/vlp/configs/tiny.toml"


def _cfg(data, out, steps):
    return config.load(TINY, [f'data.train="{data}"', f'train.out="{out}"', f"train.steps={steps}",
                              "train.batch_size=8", "train.warmup_steps=1", "train.save_every=2",
                              'data.eval_split=""', "train.log_every=1"])


def test_a_checkpoint_of_the_training_loop_loads_with_weights_only(emoji_tiny, tmp_path):
    run = loop.train(_cfg(emoji_tiny, tmp_path / "run", 2), progress=False)
    state = ckpt.trainer_state(run)
    assert state["step"] == 2 and isinstance(state["rng"], torch.Tensor)
    assert state["scheduler"]["last_epoch"] == 2 and state["optimizer"]["state"]
    loop.train(_cfg(emoji_tiny, tmp_path / "run", 3), resume=True, progress=False)     # the loop's own resume
    assert ckpt.trainer_state(run)["step"] == 3


class _Payload:
    """Unpickling this runs code: os.makedirs(marker)."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return os.makedirs, (self.marker,)


def test_a_trainer_state_holding_other_objects_is_refused(tmp_path):
    step = tmp_path / "checkpoints" / "step_1"
    step.mkdir(parents=True)
    (step / "model.safetensors").write_bytes(b"")
    marker = tmp_path / "code-ran"
    torch.save({"step": 1, "rng": torch.get_rng_state(), "extra": _Payload(str(marker))}, step / "trainer_state.pt")
    with pytest.raises(ValueError, match=r"trainer_state\.pt.*refused"):
        ckpt.trainer_state(step)
    assert not marker.exists()

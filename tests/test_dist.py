"""Two processes on gloo under torchrun: loss and gradients equal one process on the whole batch."""
import os
import subprocess
import sys
from pathlib import Path

import torch

WORKER = Path(__file__).with_name("dist_worker.py")


def run(nproc: int, out: Path) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-port",
           str(29500 + nproc + os.getpid() % 1000), str(WORKER), str(out)]
    subprocess.run(cmd, check=True, env=env, capture_output=True, timeout=120)
    return torch.load(out)


def test_two_ranks_equal_one(tmp_path):
    one, two = run(1, tmp_path / "one.pt"), run(2, tmp_path / "two.pt")
    assert torch.allclose(one["loss"], two["loss"], atol=1e-6)
    assert torch.allclose(one["grad_w"], two["grad_w"], atol=1e-6)
    assert torch.allclose(one["grad_b"], two["grad_b"], atol=1e-6)

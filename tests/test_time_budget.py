"""train.time_budget: the step count is fitted to the machine at hand during the warmup, recorded in the run's
config and checkpoints, and a resumed run finishes at the recorded count exactly as an uninterrupted one."""
import itertools
import json

import pytest
import torch

from test_train import interrupted_after, losses, tiny_cfg
from vlp import config
from vlp.train import checkpoint as ckpt
from vlp.train import loop
from vlp.train.optim import build_scheduler, lr_lambda


@pytest.fixture
def fake_clock(monkeypatch):
    """A clock that advances one second per reading: the loop reads it at its start, after its first step and
    when it fits the steps (step 4 here: rate = 1 s over steps 2..4 = 1/3 s per step)."""
    ticks = itertools.count()
    monkeypatch.setattr(loop, "_clock", lambda: float(next(ticks)))


def budget_cfg(emoji_tiny, out, **extra):
    return tiny_cfg(emoji_tiny, out, **{"train.steps": 12, "train.warmup_steps": 4, "train.time_budget": 3.0, **extra})


def test_fit_steps_to_budget_arithmetic(monkeypatch):
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = build_scheduler(opt, 20, 1000)
    for _ in range(10):
        opt.step()
        sched.step()
    t = config.TrainConfig(steps=1000, warmup_steps=20, time_budget=50.0)
    monkeypatch.setattr(loop, "_clock", lambda: 12.0)
    per_step = loop._fit_steps_to_budget(t, ran=10, started=2.0, first_done=3.0, sched=sched)
    assert per_step == 1.0 and t.steps == 10 + 40           # 10 s spent, 40 s left at 1 s per step
    assert [sched.lr_lambdas[0](s) for s in range(60)] == [lr_lambda(20, 50)(s) for s in range(60)]
    t = config.TrainConfig(steps=30, warmup_steps=20, time_budget=50.0)
    loop._fit_steps_to_budget(t, ran=10, started=2.0, first_done=3.0, sched=sched)
    assert t.steps == 30                                     # never more than configured
    t = config.TrainConfig(steps=1000, warmup_steps=20, time_budget=5.0)
    loop._fit_steps_to_budget(t, ran=10, started=2.0, first_done=3.0, sched=sched)
    assert t.steps == 10                                     # over budget already: stop here


def test_budget_run_records_its_steps_and_resumes_exactly(emoji_tiny, tmp_path, fake_clock, monkeypatch):
    full = loop.train(budget_cfg(emoji_tiny, tmp_path / "full"), progress=False)
    assert config.load(full / "config.toml").train.steps == 7          # 4 + (3 s - 2 s) / (1/3 s)
    assert len(losses(full)) == 7 and ckpt.resolve(full).name == "step_7"
    assert ckpt.trainer_state(full)["total_steps"] == 7
    lrs = [json.loads(line)["lr"] for line in (full / "metrics.jsonl").read_text().splitlines()]
    assert lrs[-1] == pytest.approx(0.0, abs=1e-12)                      # the cosine ends at the fitted count

    interrupted_after(monkeypatch, 6, lambda: loop.train(budget_cfg(emoji_tiny, tmp_path / "cut"), progress=False))
    cfg = budget_cfg(emoji_tiny, tmp_path / "cut")               # steps = 12 as configured: the run's own 7 win
    loop.train(cfg, resume=True, progress=False)
    assert cfg.train.steps == 7 and losses(tmp_path / "cut") == losses(full)
    a, b = ckpt.load_checkpoint(full)[0].state_dict(), ckpt.load_checkpoint(tmp_path / "cut")[0].state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_budget_needs_a_warmup_to_measure_in():
    with pytest.raises(config.ConfigError, match="time_budget = 60.0 needs train.warmup_steps >= 3"):
        config.load(None, ["train.time_budget=60", "train.warmup_steps=0"])

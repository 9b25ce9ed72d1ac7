"""What the loop settings do, seen from outside the loop (the tiny preset through `loop.train`):
train.grad_accum, train.eval_every, train.keep_checkpoints, model.text_lr_scale, data.cluster_key."""
import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from test_optim import naive_lr_factor
from vlp import config
from vlp.train import checkpoint as ckpt
from vlp.train import loop

TINY = Path(__file__).parents[1] / "src/vlp/configs/tiny.toml"


def _run(data, out, sets: dict | None = None, resume: bool = False) -> Path:
    base = {"data.train": f'"{data}"', "train.out": f'"{out}"', "train.steps": 4, "train.batch_size": 8,
            "train.log_every": 1, "train.save_every": 0, "train.warmup_steps": 1, "data.eval_split": '""'}
    cfg = config.load(TINY, [f"{k}={v}" for k, v in {**base, **(sets or {})}.items()])
    return loop.train(cfg, resume=resume, progress=False)


def _rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture
def spy(monkeypatch):
    """What the loop reads: each (group index, epoch) the training dataset serves, in order, the dataset,
    and the groups of each batch the collator builds."""
    from vlp.data.collate import Collator
    from vlp.data.pairs import PairDataset
    seen = SimpleNamespace(keys=[], batches=[], dataset=None)
    get, collate = PairDataset.__getitem__, Collator.__call__

    def getitem(self, key):
        seen.dataset = self
        seen.keys.append(tuple(key))
        return get(self, key)

    def call(self, samples):
        seen.batches.append([s["group"] for s in samples])
        return collate(self, samples)
    monkeypatch.setattr(PairDataset, "__getitem__", getitem)
    monkeypatch.setattr(Collator, "__call__", call)
    seen.reset = lambda: (seen.keys.clear(), seen.batches.clear())
    return seen


def test_grad_accum_consumes_grad_accum_batches_per_step(emoji_tiny, tmp_path, spy, monkeypatch):
    """The contrastive loss couples the rows of a batch (each is the others' negative), so two micro-batches
    of 4 do not give the update of one batch of 8, and the loop does not claim so: a step runs grad_accum
    batches of train.batch_size. grad_accum=2 for 3 steps reads the sampler's first 6 batches of 8, in order,
    also across an interruption after step 2 (the resumed run starts at batch 5), and the lr schedule counts
    optimizer steps: warmup and cosine over 3 steps, not 6."""
    from vlp.data.pairs import ResumableBatches
    sets = {"train.steps": 3, "train.grad_accum": 2, "train.lr": 0.01, "train.warmup_steps": 1,
            "train.min_lr_ratio": 0.1, "train.save_every": 2}
    real_save = ckpt.save_checkpoint

    def save_then_crash(run_dir, step, *a, **k):
        real_save(run_dir, step, *a, **k)
        raise KeyboardInterrupt("simulated interruption")
    monkeypatch.setattr(ckpt, "save_checkpoint", save_then_crash)
    with pytest.raises(KeyboardInterrupt):
        _run(emoji_tiny, tmp_path / "run", sets)
    monkeypatch.setattr(ckpt, "save_checkpoint", real_save)
    first = len(spy.batches)
    run = _run(emoji_tiny, tmp_path / "run", sets, resume=True)
    sampler = iter(ResumableBatches(len(spy.dataset), 8, seed=0))
    assert first == 4 and spy.batches and [len(b) for b in spy.batches] == [8] * 6
    assert spy.keys == [key for _ in range(6) for key in next(sampler)]
    rows = _rows(run)
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert [r["lr"] for r in rows] == pytest.approx([0.01 * naive_lr_factor(k, 1, 3, 0.1) for k in (1, 2, 3)])


def test_eval_every_logs_evaluations_at_its_steps_and_the_end(emoji_tiny, tmp_path):
    run = _run(emoji_tiny, tmp_path / "e2", {"train.steps": 5, "train.eval_every": 2, "data.eval_split": '"val"',
                                             "train.log_every": 5})
    evals = [r for r in _rows(run) if "split" in r]
    assert [r["step"] for r in evals] == [2, 4, 5]
    assert all(r["split"] == "val" and {"t2i_r1", "i2t_r1", "rsum"} <= r.keys() for r in evals)
    assert [r["step"] for r in _rows(run) if "loss" in r] == [5]
    run = _run(emoji_tiny, tmp_path / "e0", {"train.steps": 3, "train.eval_every": 0, "data.eval_split": '"val"'})
    assert [r["step"] for r in _rows(run) if "split" in r] == [3]            # 0: at the end only


def test_keep_checkpoints_leaves_the_newest(emoji_tiny, tmp_path):
    """Saved at steps 2, 4, 6 and 7 (the end); keep_checkpoints = 3 leaves the newest three."""
    run = _run(emoji_tiny, tmp_path / "k", {"train.steps": 7, "train.save_every": 2, "train.keep_checkpoints": 3})
    root = run / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_4", "step_6", "step_7"]
    assert (root / "latest").read_text() == "step_7"
    assert [ckpt.trainer_state(root / f"step_{s}")["step"] for s in (4, 6, 7)] == [4, 6, 7]


def test_text_lr_scale_moves_text_weights_by_the_scaled_lr(emoji_tiny, tmp_path):
    """Adam's first step moves each weight by about its group's lr (the sign of its gradient): with lr 0.01 and
    text_lr_scale 0.25 the text tower's weights move by at most 0.0025, the others by 0.01."""
    sets = {"train.steps": 1, "train.warmup_steps": 0, "train.weight_decay": 0, "model.text_lr_scale": 0.25}
    start = ckpt.load_checkpoint(_run(emoji_tiny, tmp_path / "lr0", {**sets, "train.lr": 0}))[0].state_dict()
    run = _run(emoji_tiny, tmp_path / "lr", {**sets, "train.lr": 0.01})
    after = ckpt.load_checkpoint(run)[0].state_dict()
    moved = {k: float((after[k] - start[k]).abs().max()) for k in start if start[k].is_floating_point()}
    text = [v for k, v in moved.items() if k.startswith("text.")]
    other = [v for k, v in moved.items() if not k.startswith("text.")]
    assert len(text) > 10 and len(other) > 10
    assert max(text) == pytest.approx(0.0025, rel=0.02) and max(other) == pytest.approx(0.01, rel=0.02)
    groups = ckpt.trainer_state(run)["optimizer"]["param_groups"]
    assert sorted({g["initial_lr"] for g in groups}) == pytest.approx([0.0025, 0.01])


def _cluster_runs(keys, dataset, key="base"):
    """Per epoch, the sequence of cluster values of the groups read, collapsed into runs of equal values."""
    value = lambda g: dataset.records[dataset.groups[g][0]].meta[key]          # noqa: E731
    out = {}
    for g, epoch in keys:
        seq = out.setdefault(epoch, [])
        if not seq or seq[-1][0] != value(g):
            seq.append([value(g), 0])
        seq[-1][1] += 1
    return out


def test_cluster_key_keeps_each_cluster_contiguous(emoji_tiny, tmp_path, spy):
    """The train split holds one emoji in six skin tones (one `base`). With data.cluster_key = "base" its six
    groups come one after another in both epochs read (at a different place each epoch), where the same
    sampler without clusters scatters them."""
    from vlp.data.pairs import ResumableBatches
    _run(emoji_tiny, tmp_path / "c", {"train.steps": 16, "train.lr": 0, "data.cluster_key": '"base"'})  # 2 epochs
    data = spy.dataset
    sizes: dict[str, int] = {}
    for members in data.groups:
        v = data.records[members[0]].meta["base"]
        sizes[v] = sizes.get(v, 0) + 1
    assert [v for v, n in sizes.items() if n > 1] == ["261D"] and sizes["261D"] == 6
    runs = _cluster_runs(spy.keys, data)
    assert sorted(runs) == [0, 1] and len(spy.keys) == 16 * 8
    for epoch, seq in runs.items():
        values = [v for v, _ in seq]
        assert len(values) == len(set(values)), epoch                     # no cluster is split up
        assert ["261D", 6] in seq, epoch                                   # read whole (within the 64 of 67 read)
    assert [v for v, _ in runs[0]] != [v for v, _ in runs[1]]                # the cluster order is reshuffled
    plain = iter(ResumableBatches(len(data), 8, seed=0))
    scattered = _cluster_runs([key for _ in range(16) for key in next(plain)], data)
    assert max(n for seq in scattered.values() for v, n in seq if v == "261D") < 6

"""AdamW parameter groups (weight decay, text lr scale, new vocabulary rows, frozen parameters) and the
warmup + cosine schedule against a hand-written formula."""
import math

import pytest
import torch
from torch import nn

from vlp.encoders.text import Freezing, TextEncoder
from vlp.layers import BertConfig, TransformerConfig
from vlp.models import freeze_text
from vlp.train.optim import build_optimizer, build_scheduler, lr_lambda

LR, WD, SCALE = 0.1, 0.05, 0.25
OLD_VOCAB, NEW_ROWS = 50, 10


class Tiny(nn.Module):
    """A pretrained-looking text tower (50 checkpoint rows + 10 new ones) and a few non-text parameters."""

    def __init__(self, freeze: int = 0, train_new_rows: bool = True):
        super().__init__()
        torch.manual_seed(0)
        self.text = TextEncoder(BertConfig(vocab_size=OLD_VOCAB, max_position=16, transformer=TransformerConfig(
            width=16, layers=2, heads=2, intermediate=32, dropout=0.0, attn_dropout=0.0)))
        self.text.resize_vocab(OLD_VOCAB + NEW_ROWS)
        self.text.freezing = Freezing(pretrained_vocab=OLD_VOCAB)
        freeze_text(self.text, freeze, train_new_rows=train_new_rows)
        self.proj = nn.Linear(16, 8)                            # weight: decay; bias: none
        self.norm = nn.LayerNorm(8)                             # none
        self.pos_embed = nn.Parameter(torch.zeros(4, 8))        # an embedding (2-d): none
        self.cls_token = nn.Parameter(torch.zeros(1, 1, 8))     # a token (3-d): none
        self.logit_scale = nn.Parameter(torch.tensor(2.0))      # a scalar: none


def _settings(model, opt) -> dict[str, tuple[float, float]]:
    """parameter name -> (lr, weight decay) of the group holding it; names the optimizer lacks are absent."""
    group_of = {id(p): g for g in opt.param_groups for p in g["params"]}
    assert len(group_of) == sum(len(g["params"]) for g in opt.param_groups)         # each parameter once
    return {n: (group_of[id(p)]["lr"], group_of[id(p)]["weight_decay"]) for n, p in model.named_parameters()
            if id(p) in group_of}


def test_groups_of_a_trainable_model():
    model = Tiny()
    got = _settings(model, build_optimizer(model, LR, WD, text_lr_scale=SCALE))
    assert len(got) == len(list(model.parameters()))
    expected = {
        "proj.weight": (LR, WD), "proj.bias": (LR, 0.0), "norm.weight": (LR, 0.0), "norm.bias": (LR, 0.0),
        "pos_embed": (LR, 0.0), "cls_token": (LR, 0.0), "logit_scale": (LR, 0.0),
        # text.*: the pretrained tower trains at lr * text_lr_scale
        "text.embeddings.word.weight": (LR * SCALE, 0.0), "text.embeddings.position.weight": (LR * SCALE, 0.0),
        "text.embeddings.norm.weight": (LR * SCALE, 0.0), "text.embeddings.norm.bias": (LR * SCALE, 0.0),
        "text.transformer.blocks.0.attn.q.weight": (LR * SCALE, WD),
        "text.transformer.blocks.0.attn.q.bias": (LR * SCALE, 0.0),
        "text.transformer.blocks.1.mlp.fc2.weight": (LR * SCALE, WD),
        "text.transformer.blocks.1.norm2.weight": (LR * SCALE, 0.0),
    }
    assert {n: got[n] for n in expected} == expected            # the code computes lr * scale too: exact
    for name, p in model.named_parameters():                 # and the rule, parameter by parameter
        plain_matrix = p.ndim >= 2 and not any(w in name for w in ("norm", "embed", "token"))
        assert got[name] == (LR * SCALE if name.startswith("text.") else LR, WD if plain_matrix else 0.0), name


def test_frozen_tower_new_rows_at_the_full_lr_frozen_params_left_out():
    """freeze_text(1): the embeddings and block 0 are frozen and absent; the word embedding trains its new
    rows only, at the full lr (not text_lr_scale), without decay; block 1 at the scaled lr."""
    model = Tiny(freeze=1)
    got = _settings(model, build_optimizer(model, LR, WD, text_lr_scale=SCALE))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set(got) == trainable
    assert not any(n.startswith(("text.transformer.blocks.0.", "text.embeddings.position", "text.embeddings.norm"))
                   for n in got)
    assert got["text.embeddings.word.weight"] == pytest.approx((LR, 0.0))
    assert got["text.transformer.blocks.1.attn.q.weight"] == pytest.approx((LR * SCALE, WD))
    assert got["text.transformer.blocks.1.norm1.bias"] == pytest.approx((LR * SCALE, 0.0))
    assert got["proj.weight"] == pytest.approx((LR, WD))

    locked = Tiny(freeze=2, train_new_rows=False)           # a locked tower whose new rows stay at their init
    got = _settings(locked, build_optimizer(locked, LR, WD, text_lr_scale=SCALE))
    assert not any(n.startswith("text.") for n in got) and "proj.weight" in got


def test_new_rows_move_at_the_full_lr_and_old_rows_stay():
    """One AdamW step from zero state moves every element with a gradient by about its group's lr."""
    model = Tiny(freeze=1)
    opt = build_optimizer(model, LR, 0.0, text_lr_scale=SCALE)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ids = torch.tensor([[2, 7, OLD_VOCAB + 3, 3], [2, OLD_VOCAB + 8, 9, 3]])
    out = model.text(ids, torch.ones_like(ids, dtype=torch.bool)).x
    (model.proj(out).sum() + (out * torch.arange(16.0)).sum()).backward()
    opt.step()
    moved = {n: (p.detach() - before[n]).abs() for n, p in model.named_parameters()}
    word = moved["text.embeddings.word.weight"]
    assert torch.equal(word[:OLD_VOCAB], torch.zeros_like(word[:OLD_VOCAB]))          # checkpoint rows: unchanged
    torch.testing.assert_close(word[[OLD_VOCAB + 3, OLD_VOCAB + 8]].max(), torch.tensor(LR), rtol=1e-3, atol=0)
    torch.testing.assert_close(moved["text.transformer.blocks.1.mlp.fc2.weight"].max(), torch.tensor(LR * SCALE),
                               rtol=1e-3, atol=0)
    assert moved["text.transformer.blocks.0.mlp.fc2.weight"].max() == 0                # frozen block


def naive_lr_factor(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warmup to 1 over `warmup` steps (step 0 already at 1/warmup), then cosine from 1 down to
    `min_ratio`, reached at `total` and held after it."""
    if step < warmup:
        return (step + 1) / warmup
    done = min(step - warmup, total - warmup) / (total - warmup)
    return min_ratio + (1 - min_ratio) * (1 + math.cos(math.pi * done)) / 2


@pytest.mark.parametrize("warmup,total,min_ratio", [(4, 20, 0.0), (4, 20, 0.1), (0, 10, 0.0), (0, 10, 0.2),
                                                    (1, 3, 0.0), (10, 11, 0.5)])
def test_lr_lambda_against_the_formula(warmup, total, min_ratio):
    f = lr_lambda(warmup, total, min_ratio)
    for step in range(total + 5):
        assert f(step) == pytest.approx(naive_lr_factor(step, warmup, total, min_ratio)), step


def test_lr_lambda_landmarks():
    f = lr_lambda(4, 20, 0.1)
    assert [f(s) for s in range(4)] == pytest.approx([0.25, 0.5, 0.75, 1.0])             # warmup
    assert f(4) == pytest.approx(1.0) and f(12) == pytest.approx(0.55)                     # cosine start, middle
    assert f(20) == pytest.approx(0.1) and f(100) == pytest.approx(0.1)                    # min_lr_ratio, held
    g = lr_lambda(0, 10)                                                                   # no warmup: no 1/0,
    assert g(0) == 1.0 and g(5) == pytest.approx(0.5) and g(10) == pytest.approx(0.0)      # cosine from step 0
    assert all(g(s) >= g(s + 1) for s in range(15))


def test_scheduler_sets_each_groups_lr_by_its_scale():
    """The lr of optimizer step k (0-based) is base lr x group scale x lr_lambda(k)."""
    model = Tiny()
    opt = build_optimizer(model, LR, WD, text_lr_scale=SCALE)
    sched = build_scheduler(opt, 3, 12, 0.1)
    f = lr_lambda(3, 12, 0.1)
    for k in range(15):
        for g in opt.param_groups:
            assert g["lr"] == pytest.approx(LR * g["lr_scale"] * f(k)), (k, g["lr_scale"])
        assert {g["lr_scale"] for g in opt.param_groups} == {1.0, SCALE}
        opt.step()
        sched.step()

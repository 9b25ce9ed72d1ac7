"""The one transformer every system shares: BERT-compatible blocks.

Post-LN blocks (BERT) and pre-LN blocks (ViT) differ only in where the LayerNorm sits, so one `Block`
does both. Parameter names stay close to BERT's (separate q/k/v projections) so that a Hugging Face
checkpoint maps onto them by a short name table (`vlp.encoders.text.load_bert`).

Speed on CPU (measured by benchmarks/train_throughput.py, figures in docs/results.md), without changing
what is stored: q, k and v are projected by one product over their concatenated weights (the
1/sqrt(head) scale folded into q's rows); in bfloat16 attention over short sequences is written out
(q k^T -> softmax -> v, batched products), 1.5-2.5x faster than `F.scaled_dot_product_attention` at
the lengths we train on, while float32 and long sequences go through `scaled_dot_product_attention`
(`TransformerConfig.attn`, `MATH_ATTN_MAX_LEN`); float32 linear layers run their products, forward and
backward, through oneDNN (`linear`), 2-2.5x faster than the default BLAS on the AMD CPU we measured.
Numerics stay float32 (or the autocast dtype): only the order of additions changes.

    cfg = TransformerConfig(width=256, layers=4, heads=4)
    y = Transformer(cfg)(x, mask)          # x (B, N, D) float, mask (B, N) bool, True = real token
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class Tokens(NamedTuple):
    """What every encoder returns."""
    x: Tensor      # (B, N, D)
    mask: Tensor   # (B, N) bool, True = real token


# Hugging Face `hidden_act` names -> ours. "gelu_new" and "gelu_pytorch_tanh" are the same tanh formula.
_HF_ACTS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "relu": "relu"}
_ACTS = ("gelu", "gelu_tanh", "relu")
_ATTN = ("auto", "sdpa", "math")
# "auto" attention: written out (q k^T -> softmax -> v) in bfloat16/float16 up to this many tokens,
# scaled_dot_product_attention otherwise. Measured on a 2-core Zen 5 (width 256, 4 heads, ~8K tokens,
# key-padding mask, forward + backward of the Attention module, best of 4): in bf16 autocast the
# written-out path took 0.67x / 0.40x / 0.55x SDPA's time at 32 / 65 / 256 tokens; in float32 it took
# 1.47x / 1.22x / 1.31x (its batched products go through the slower BLAS), so float32 stays on SDPA.
MATH_ATTN_MAX_LEN = 256


@dataclass
class TransformerConfig:
    width: int = 768
    layers: int = 12
    heads: int = 12
    intermediate: int = 0           # MLP hidden size; 0 = mlp_ratio * width (3072 for BERT-base)
    mlp_ratio: float = 4.0
    dropout: float = 0.1            # after attention / MLP outputs (BERT's hidden_dropout_prob)
    attn_dropout: float = 0.1       # on attention probabilities
    eps: float = 1e-12              # LayerNorm epsilon (BERT 1e-12, ViT 1e-6)
    pre_ln: bool = False            # False = BERT (post-LN), True = ViT (pre-LN)
    act: str = "gelu"               # gelu (exact erf, as BERT) | gelu_tanh | relu
    attn: str = "auto"              # auto (by length) | sdpa (always scaled_dot_product_attention) | math

    def __post_init__(self) -> None:
        if self.width % self.heads:
            raise ValueError(f"TransformerConfig: width {self.width} is not divisible by heads {self.heads}")
        if self.act not in _ACTS:
            raise ValueError(f"TransformerConfig: unknown act {self.act!r}; choose one of {_ACTS}")
        if self.attn not in _ATTN:
            raise ValueError(f"TransformerConfig: unknown attn {self.attn!r}; choose one of {_ATTN}")

    @property
    def mlp_width(self) -> int:
        return self.intermediate or int(self.mlp_ratio * self.width)

    @classmethod
    def from_hf(cls, hf_config: dict[str, Any]) -> TransformerConfig:
        """Read the transformer part of a Hugging Face BERT `config.json` (already parsed)."""
        act = hf_config.get("hidden_act", "gelu")
        if act not in _HF_ACTS:
            raise ValueError(f"BERT config: hidden_act {act!r} is not supported; supported: {sorted(_HF_ACTS)}")
        return cls(
            width=hf_config["hidden_size"],
            layers=hf_config["num_hidden_layers"],
            heads=hf_config["num_attention_heads"],
            intermediate=hf_config["intermediate_size"],
            dropout=hf_config.get("hidden_dropout_prob", 0.1),
            attn_dropout=hf_config.get("attention_probs_dropout_prob", 0.1),
            eps=hf_config.get("layer_norm_eps", 1e-12),
            act=_HF_ACTS[act],
        )


def init_weights(module: nn.Module, std: float = 0.02) -> None:
    """BERT's initialisation: normal(0, std) weights, zero biases, unit LayerNorm. Use with `.apply`."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, std=std)
    if isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)
    if isinstance(module, nn.Embedding) and module.padding_idx is not None:
        with torch.no_grad():
            module.weight[module.padding_idx].zero_()
    if isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def bf16_is_fast(device_type: str = "cpu") -> bool:
    """Whether bf16 matmuls run natively here: a CUDA GPU with bf16, or a CPU that oneDNN gives bf16
    kernels (AVX-512 / AMX). A CPU without them emulates bf16: measured on an AVX2-only EPYC, a bf16
    matmul ran at 0.3 GFLOP/s against 120 in float32, so bf16 there is a 400x slow-down, not a speed-up."""
    if device_type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    check = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    return bool(torch.backends.mkldnn.is_available() and check is not None and check())


def use_bf16(wanted: bool | None, device_type: str = "cpu") -> bool:
    """Resolve a bf16 switch: None = auto (bf16 where `bf16_is_fast`); True is honoured, with a warning
    where it would be slow."""
    if wanted is None:
        return bf16_is_fast(device_type)
    if wanted and not bf16_is_fast(device_type):
        import warnings
        warnings.warn(f"bf16 was asked for, but this {device_type.upper()} has no native bf16 matmuls: they are "
                      "emulated, several hundred times slower than float32 (use precision auto or fp32)", stacklevel=2)
    return bool(wanted)


# float32 linear layers through oneDNN (see `linear`); False = F.linear everywhere
ONEDNN_LINEAR = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def _onednn_ok(x: Tensor, weight: Tensor) -> bool:
    return (x.device.type == "cpu" and x.dtype == torch.float32 and weight.dtype == torch.float32
            and ONEDNN_LINEAR and not torch.is_autocast_enabled("cpu") and x.numel() > 0)


def _mm_onednn(a: Tensor, b: Tensor, bias: Tensor | None = None) -> Tensor:
    """a (M, K) @ b (N, K)^T (+ bias) -> (M, N) through oneDNN. a and b may be row- or column-major;
    any other layout (e.g. the stride-0 gradient of a sum) is copied first: oneDNN's fallback for
    it was ~50x slower (measured)."""
    a, b = (t if t.is_contiguous() or t.t().is_contiguous() else t.contiguous() for t in (a, b))
    return torch.ops.mkldnn._linear_pointwise(a, b, bias, "none", [], "")


class _OneDNNLinear(torch.autograd.Function):
    """F.linear with forward and backward products through oneDNN (float32, CPU)."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        x2 = x.reshape(-1, x.shape[-1])                                      # (..., in) -> (T, in)
        ctx.save_for_backward(x2, weight)
        ctx.has_bias = bias is not None
        return _mm_onednn(x2, weight, bias).view(*x.shape[:-1], weight.shape[0])   # (..., out)

    @staticmethod
    def backward(ctx, grad: Tensor):
        x2, weight = ctx.saved_tensors
        g = grad.reshape(-1, grad.shape[-1])                                 # (T, out)
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:                                          # (T, out) @ (out, in)
            gx = _mm_onednn(g, weight.t().contiguous()).view(*grad.shape[:-1], weight.shape[1])
        if ctx.needs_input_grad[1]:                                          # (out, T) @ (T, in)
            out, inn = weight.shape
            # oneDNN is fastest with the larger of the two output sides as its N (measured)
            gw = _mm_onednn(x2.t(), g.t()).t() if out >= inn else _mm_onednn(g.t(), x2.t())
        if ctx.has_bias and ctx.needs_input_grad[2]:
            gb = g.sum(0)
        return gx, gw, gb


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """F.linear; float32 on CPU (outside autocast) goes through oneDNN instead of the BLAS library.
    Set `vlp.layers.ONEDNN_LINEAR = False` to use F.linear everywhere."""
    if _onednn_ok(x, weight):
        return _OneDNNLinear.apply(x, weight, bias)
    return F.linear(x, weight, bias)


class Attention(nn.Module):
    """Multi-head self-attention with a key-padding mask; q, k, v kept apart to map BERT weights by name
    (they are concatenated at compute time into one product).

    impl: "sdpa" = F.scaled_dot_product_attention; "math" = q k^T -> softmax -> v written out (faster on
    CPU for short bfloat16 sequences); "auto" = math for bfloat16/float16 (autocast or weights) up to
    MATH_ATTN_MAX_LEN tokens, sdpa otherwise."""

    def __init__(self, width: int, heads: int, dropout: float = 0.0, impl: str = "auto"):
        super().__init__()
        if impl not in _ATTN:
            raise ValueError(f"Attention: unknown impl {impl!r}; choose one of {_ATTN}")
        self.heads, self.dropout, self.impl = heads, dropout, impl
        self.q, self.k, self.v = nn.Linear(width, width), nn.Linear(width, width), nn.Linear(width, width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """x (B, N, D), mask (B, N) bool (True = may be attended to) or None -> (B, N, D)."""
        B, N, D = x.shape
        H = self.heads
        low = x.dtype in (torch.bfloat16, torch.float16) or torch.is_autocast_enabled(x.device.type)
        use_math = self.impl == "math" or (self.impl == "auto" and low and N <= MATH_ATTN_MAX_LEN)
        scale = (D // H) ** -0.5                                             # folded into q's rows
        weight = torch.cat([self.q.weight * scale, self.k.weight, self.v.weight])   # (3D, D)
        bias = torch.cat([self.q.bias * scale, self.k.bias, self.v.bias])           # (3D,)
        # (B, N, 3D) -> (B, N, 3, H, D/H) -> (3, B, H, N, D/H)
        q, k, v = linear(x, weight, bias).view(B, N, 3, H, D // H).permute(2, 0, 3, 1, 4).unbind(0)
        p = self.dropout if self.training else 0.0
        if use_math:
            y = self._math(q, k, v, mask, p)
        else:
            attn_mask = None if mask is None else mask[:, None, None, :]    # (B, N) -> (B, 1, 1, N)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=p, scale=1.0)
        return linear(y.transpose(1, 2).reshape(B, N, D), self.proj.weight, self.proj.bias)  # (B, H, N, D/H) -> (B, N, D)

    @staticmethod
    def _math(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, p: float) -> Tensor:
        """q (already scaled), k, v (B, H, N, Dh); mask (B, N) bool or None -> (B, H, N, Dh)."""
        B, H, N, Dh = q.shape
        q3, k3, v3 = (t.reshape(B * H, N, Dh) for t in (q, k, v))            # (B*H, N, Dh)
        if mask is None:
            scores = torch.bmm(q3, k3.transpose(1, 2))                      # (B*H, N, N)
        else:
            # (B, N) -> (B*H, 1, N): 0 for real keys, -inf for padding, added inside the product
            neg = torch.zeros(B, 1, 1, N, dtype=q.dtype, device=q.device).masked_fill_(~mask[:, None, None, :],
                                                                                      float("-inf"))
            scores = torch.baddbmm(neg.expand(B, H, 1, N).reshape(B * H, 1, N), q3, k3.transpose(1, 2))
        probs = scores.softmax(-1)
        if p > 0:
            probs = F.dropout(probs, p, training=True)
        return torch.bmm(probs, v3).view(B, H, N, Dh)


class MLP(nn.Module):
    """Two linear layers with an activation between (BERT's intermediate + output dense)."""

    def __init__(self, width: int, hidden: int, act: str = "gelu"):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(width, hidden), nn.Linear(hidden, width)
        self.act = nn.ReLU() if act == "relu" else nn.GELU(approximate="tanh" if act == "gelu_tanh" else "none")

    def forward(self, x: Tensor) -> Tensor:
        h = self.act(linear(x, self.fc1.weight, self.fc1.bias))
        return linear(h, self.fc2.weight, self.fc2.bias)


class Block(nn.Module):
    """One transformer layer. Post-LN (BERT): x = LN(x + attn(x)); x = LN(x + mlp(x)).
    Pre-LN (ViT): x = x + attn(LN(x)); x = x + mlp(LN(x))."""

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.pre_ln = cfg.pre_ln
        self.attn = Attention(cfg.width, cfg.heads, cfg.attn_dropout, cfg.attn)
        self.norm1 = nn.LayerNorm(cfg.width, eps=cfg.eps)
        self.mlp = MLP(cfg.width, cfg.mlp_width, cfg.act)
        self.norm2 = nn.LayerNorm(cfg.width, eps=cfg.eps)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        if self.pre_ln:
            x = x + self.drop(self.attn(self.norm1(x), mask))
            return x + self.drop(self.mlp(self.norm2(x)))
        x = self.norm1(x + self.drop(self.attn(x, mask)))
        return self.norm2(x + self.drop(self.mlp(x)))


class Transformer(nn.Module):
    """A stack of `Block`s. No embeddings and no final norm: encoders add what their input needs."""

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.cfg = cfg
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.layers))
        self.apply(init_weights)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """x (B, N, D), mask (B, N) bool or None -> (B, N, D). Every row needs at least one real token."""
        if mask is not None:
            check_mask(x, mask)
        for block in self.blocks:
            x = block(x, mask)
        return x


def length_groups(lengths: Tensor, groups: int = 4, min_rows: int = 16) -> tuple[tuple[Tensor, ...], Tensor]:
    """Rows by sequence length (n,) -> (up to `groups` index tensors of rows of similar length, at least
    `min_rows` each; the permutation that puts the concatenated groups back in row order). Each group can
    run trimmed to its own longest row: the padding a batch of mixed lengths would compute is skipped."""
    order = torch.argsort(lengths, stable=True)
    return order.tensor_split(max(1, min(groups, len(lengths) // min_rows))), torch.argsort(order)


def check_mask(x: Tensor, mask: Tensor) -> None:
    """Raise a clear error for a mask of the wrong shape/dtype or a row with no real token
    (attention over nothing is NaN, which would otherwise surface far away in the loss)."""
    if mask.dtype != torch.bool or mask.shape != x.shape[:2]:
        raise ValueError(f"mask must be bool of shape {tuple(x.shape[:2])}, got {mask.dtype} {tuple(mask.shape)}")
    empty = (~mask.any(dim=1)).nonzero().flatten()
    if len(empty):
        raise ValueError(f"mask rows {empty.tolist()} have no real token (all False)")


@dataclass
class BertConfig:
    vocab_size: int
    max_position: int = 512
    type_vocab_size: int = 2
    pad_id: int = 0
    transformer: TransformerConfig = field(default_factory=TransformerConfig)

    @classmethod
    def from_hf(cls, hf_config: dict[str, Any]) -> BertConfig:
        """Read a Hugging Face BERT `config.json` (already parsed)."""
        return cls(
            vocab_size=hf_config["vocab_size"],
            max_position=hf_config.get("max_position_embeddings", 512),
            type_vocab_size=hf_config.get("type_vocab_size", 2),
            pad_id=hf_config.get("pad_token_id") or 0,
            transformer=TransformerConfig.from_hf(hf_config),
        )

    def replace(self, **changes: Any) -> BertConfig:
        """A copy with transformer fields (e.g. dropout=0.0) changed."""
        return dataclasses.replace(self, transformer=dataclasses.replace(self.transformer, **changes))


class BertEmbeddings(nn.Module):
    """word + position + token_type embeddings, then LayerNorm and dropout (as BERT)."""

    def __init__(self, cfg: BertConfig):
        super().__init__()
        width = cfg.transformer.width
        self.word = nn.Embedding(cfg.vocab_size, width, padding_idx=cfg.pad_id)
        self.position = nn.Embedding(cfg.max_position, width)
        self.token_type = nn.Embedding(cfg.type_vocab_size, width)
        self.norm = nn.LayerNorm(width, eps=cfg.transformer.eps)
        self.drop = nn.Dropout(cfg.transformer.dropout)

    def forward(self, ids: Tensor, token_type: Tensor | None = None, positions: Tensor | None = None) -> Tensor:
        """ids (B, L) long; token_type (B, L) long or None (= 0); positions (B, L) or (L,) or None -> (B, L, D)."""
        L = ids.shape[1]
        if L > self.position.num_embeddings:
            raise ValueError(f"sequence length {L} exceeds max_position {self.position.num_embeddings}")
        if ids.numel() and (ids.min() < 0 or ids.max() >= self.word.num_embeddings):
            raise ValueError(f"token ids must be in [0, {self.word.num_embeddings}), got range "
                             f"[{int(ids.min())}, {int(ids.max())}] (extend the vocabulary with resize_vocab?)")
        if positions is None:
            positions = torch.arange(L, device=ids.device)
        if token_type is None:
            token_type = torch.zeros_like(ids)
        x = self.word(ids) + self.position(positions) + self.token_type(token_type)
        return self.drop(self.norm(x))


_LAZY = ("TextEncoder", "load_bert", "save_bert")


def __getattr__(name: str) -> Any:
    """`from vlp.layers import load_bert` works too; the code lives in vlp.encoders.text (imported lazily
    because it imports this module)."""
    if name in _LAZY:
        from vlp.encoders import text
        return getattr(text, name)
    raise AttributeError(f"module 'vlp.layers' has no attribute {name!r}")

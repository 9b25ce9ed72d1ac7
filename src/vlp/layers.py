"""The one transformer every system shares: BERT-compatible blocks on `F.scaled_dot_product_attention`.

Post-LN blocks (BERT) and pre-LN blocks (ViT) differ only in where the LayerNorm sits, so one `Block`
does both. Parameter names stay close to BERT's (separate q/k/v projections) so that a Hugging Face
checkpoint maps onto them by a short name table (`vlp.encoders.text.load_bert`).

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

    def __post_init__(self) -> None:
        if self.width % self.heads:
            raise ValueError(f"TransformerConfig: width {self.width} is not divisible by heads {self.heads}")
        if self.act not in _ACTS:
            raise ValueError(f"TransformerConfig: unknown act {self.act!r}; choose one of {_ACTS}")

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


class Attention(nn.Module):
    """Multi-head self-attention with a key-padding mask; q, k, v kept apart to map BERT weights by name."""

    def __init__(self, width: int, heads: int, dropout: float = 0.0):
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.q, self.k, self.v = nn.Linear(width, width), nn.Linear(width, width), nn.Linear(width, width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """x (B, N, D), mask (B, N) bool (True = may be attended to) or None -> (B, N, D)."""
        B, N, D = x.shape
        # (B, N, D) -> (B, N, H, D/H) -> (B, H, N, D/H)
        q, k, v = (f(x).view(B, N, self.heads, D // self.heads).transpose(1, 2) for f in (self.q, self.k, self.v))
        # (B, N) -> (B, 1, 1, N): the same key mask for every head and query
        attn_mask = None if mask is None else mask[:, None, None, :]
        p = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=p)
        return self.proj(y.transpose(1, 2).reshape(B, N, D))  # (B, H, N, D/H) -> (B, N, D)


class MLP(nn.Module):
    """Two linear layers with an activation between (BERT's intermediate + output dense)."""

    def __init__(self, width: int, hidden: int, act: str = "gelu"):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(width, hidden), nn.Linear(hidden, width)
        self.act = nn.ReLU() if act == "relu" else nn.GELU(approximate="tanh" if act == "gelu_tanh" else "none")

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """One transformer layer. Post-LN (BERT): x = LN(x + attn(x)); x = LN(x + mlp(x)).
    Pre-LN (ViT): x = x + attn(LN(x)); x = x + mlp(LN(x))."""

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.pre_ln = cfg.pre_ln
        self.attn = Attention(cfg.width, cfg.heads, cfg.attn_dropout)
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

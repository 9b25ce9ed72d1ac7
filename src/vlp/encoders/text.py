"""The text encoder (BERT on our shared transformer) and Hugging Face BERT checkpoint loading/saving.

    enc = load_bert("path/to/bert-dir", dropout=0.0)   # config.json + model.safetensors | pytorch_model.bin
    out = enc(ids, mask)                               # Tokens: x (B, L, D), mask (B, L)
    save_bert(enc, "out-dir")                          # readable by load_bert and transformers.BertModel

Loading maps names by a short table (`hf_name`), fills every one of our parameters and fails with the
tensor's name when one is missing, has the wrong shape, or the checkpoint holds encoder tensors we
would silently drop. Heads (pooler, cls, ...) and `position_ids` buffers are ignored.
"""
from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from vlp.layers import BertConfig, BertEmbeddings, Tokens, Transformer, init_weights


@dataclasses.dataclass(frozen=True)
class Freezing:
    """What of a text tower trains: set by `vlp.models.freeze_text`, read by the optimizer (which lr) and
    the dual encoder (which captions a locked tower cannot change, LiT's text cache)."""
    pretrained_vocab: int = 0        # word rows below this id came from the checkpoint (0: our own vocabulary)
    frozen_layers: int = 0           # bottom blocks frozen, and the embeddings with them when > 0
    locked: bool = False             # every block frozen: only new vocabulary rows can change the output
    new_rows_only: bool = False      # the word embedding trains its rows >= pretrained_vocab only (at the full lr)


class TextEncoder(nn.Module):
    """BERT: embeddings + post-LN transformer. forward(ids, mask) -> Tokens (no pooler: models pool)."""

    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.cfg = cfg
        self.freezing = Freezing()
        self.embeddings = BertEmbeddings(cfg)
        self.transformer = Transformer(cfg.transformer)
        self.embeddings.apply(init_weights)

    @property
    def width(self) -> int:
        return self.cfg.transformer.width

    def new_row_parameters(self) -> list[nn.Parameter]:
        """Parameters that hold only new vocabulary rows (trained at the full lr, not `text_lr_scale`)."""
        return [self.embeddings.word.weight] if self.freezing.new_rows_only else []

    def forward(self, ids: Tensor, mask: Tensor, token_type: Tensor | None = None) -> Tokens:
        """ids (B, L) long, mask (B, L) bool (True = real token), token_type (B, L) long or None."""
        x = self.embeddings(ids, token_type)          # (B, L, D)
        return Tokens(self.transformer(x, mask), mask)

    def resize_vocab(self, new_size: int) -> None:
        """Grow the word embedding to `new_size` rows; old rows are kept, new rows start at the mean
        of the old ones. The mean is where an "average" token sits, so new tokens enter the pretrained
        layers in-distribution (random rows would have a different scale and swamp early steps).
        Call before building the optimizer: the embedding parameter is replaced."""
        old = self.embeddings.word
        if new_size < old.num_embeddings:
            raise ValueError(f"resize_vocab: cannot shrink vocabulary from {old.num_embeddings} to {new_size}")
        if new_size == old.num_embeddings:
            return
        new = nn.Embedding(new_size, old.embedding_dim, padding_idx=old.padding_idx,
                           device=old.weight.device, dtype=old.weight.dtype)
        with torch.no_grad():
            new.weight[: old.num_embeddings] = old.weight
            new.weight[old.num_embeddings:] = old.weight.mean(dim=0)
        new.weight.requires_grad_(old.weight.requires_grad)
        self.embeddings.word = new
        self.cfg = dataclasses.replace(self.cfg, vocab_size=new_size)


# --- Hugging Face names -------------------------------------------------------------------------

_EMBEDDINGS = {"word": "word_embeddings", "position": "position_embeddings",
               "token_type": "token_type_embeddings", "norm": "LayerNorm"}
_BLOCK = {"attn.q": "attention.self.query", "attn.k": "attention.self.key", "attn.v": "attention.self.value",
          "attn.proj": "attention.output.dense", "norm1": "attention.output.LayerNorm",
          "mlp.fc1": "intermediate.dense", "mlp.fc2": "output.dense", "norm2": "output.LayerNorm"}
_OUR_NAME = re.compile(r"transformer\.blocks\.(\d+)\.(.+)\.(weight|bias)")
_IGNORED = ("embeddings.position_ids", "embeddings.token_type_ids")   # buffers, not weights
_HF_ACTS = {"gelu": "gelu", "gelu_tanh": "gelu_new", "relu": "relu"}
_OVERRIDABLE = ("dropout", "attn_dropout")
_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json",
                 "pytorch_model.bin", "pytorch_model.bin.index.json")


def hf_name(ours: str) -> str:
    """Our parameter name -> the Hugging Face BertModel name (no "bert." prefix)."""
    if ours.startswith("embeddings."):
        _, module, leaf = ours.split(".")
        return f"embeddings.{_EMBEDDINGS[module]}.{leaf}"
    match = _OUR_NAME.fullmatch(ours)
    if match is None:
        raise KeyError(f"no Hugging Face name for parameter {ours!r}")
    layer, module, leaf = match.groups()
    return f"encoder.layer.{layer}.{_BLOCK[module]}.{leaf}"


def _read_config(path: Path) -> dict[str, Any]:
    if not path.is_dir():
        raise FileNotFoundError(f"BERT checkpoint directory not found: {path}")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{config_file} not found: a BERT checkpoint directory needs config.json")
    hf = json.loads(config_file.read_text())
    model_type = hf.get("model_type", "bert")      # old BERT configs carry no model_type
    if model_type not in ("bert", "ernie"):
        raise ValueError(f"{config_file}: model_type {model_type!r} is not BERT (expected 'bert' or 'ernie')")
    position_type = hf.get("position_embedding_type", "absolute")
    if position_type != "absolute":
        raise ValueError(f"{config_file}: position_embedding_type {position_type!r} is not supported "
                         "(only 'absolute')")
    missing = [k for k in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                           "intermediate_size") if k not in hf]
    if missing:
        raise ValueError(f"{config_file}: not a BERT config, missing {missing}")
    return hf


def _read_weights(path: Path) -> tuple[dict[str, Tensor], Path]:
    """All tensors of the checkpoint (safetensors preferred, sharded index files followed)."""
    for name in _WEIGHT_FILES:
        file = path / name
        if file.is_file():
            break
    else:
        raise FileNotFoundError(f"no weights in {path}: looked for {', '.join(_WEIGHT_FILES)}")
    if file.name.endswith(".index.json"):
        shards = sorted(set(json.loads(file.read_text())["weight_map"].values()))
    else:
        shards = [file.name]
    state: dict[str, Tensor] = {}
    for shard in shards:
        if shard.endswith(".safetensors"):
            state.update(load_file(path / shard))
        else:
            state.update(torch.load(path / shard, map_location="cpu", weights_only=True))
    return state, file


def _bert_part(state: dict[str, Tensor], file: Path) -> dict[str, Tensor]:
    """Keep the tensors under the BERT prefix ("", "bert.", "ernie.", ...), strip it, and rename the
    legacy LayerNorm gamma/beta of TF-converted checkpoints."""
    anchor = "embeddings.word_embeddings.weight"
    prefixes = sorted((k[: -len(anchor)] for k in state if k.endswith(anchor)), key=len)
    if not prefixes:
        raise ValueError(f"{file}: not a BERT checkpoint, no tensor named '{anchor}' (with any prefix)")
    prefix = prefixes[0]
    out = {}
    for key, value in state.items():
        if key.startswith(prefix):
            key = re.sub(r"LayerNorm\.gamma$", "LayerNorm.weight", key[len(prefix):])
            out[re.sub(r"LayerNorm\.beta$", "LayerNorm.bias", key)] = value
    return out


def _fold_task_type(hf_state: dict[str, Tensor], hf: dict[str, Any]) -> None:
    """ERNIE with use_task_id adds task_type_embeddings[0] to every token (task id 0 by default):
    the same as adding it to every token-type row, which keeps our model plain BERT."""
    task = hf_state.pop("embeddings.task_type_embeddings.weight", None)
    if task is not None and hf.get("use_task_id", False):
        key = "embeddings.token_type_embeddings.weight"
        hf_state[key] = hf_state[key] + task[0]


def _to_ours(hf_state: dict[str, Tensor], model: TextEncoder, file: Path) -> dict[str, Tensor]:
    ours, missing, wrong = {}, [], []
    for name, param in model.state_dict().items():
        key = hf_name(name)
        if key not in hf_state:
            missing.append(key)
        elif hf_state[key].shape != param.shape:
            wrong.append(f"{key} {tuple(hf_state[key].shape)} vs expected {tuple(param.shape)}")
        else:
            ours[name] = hf_state[key]
    used = {hf_name(n) for n in ours} | set(_IGNORED)
    extra = [k for k in hf_state if k.startswith(("embeddings.", "encoder.")) and k not in used]
    if missing:
        raise ValueError(f"{file}: missing tensor(s) {_few(missing)} (checkpoint does not match config.json)")
    if wrong:
        raise ValueError(f"{file}: tensor shape mismatch: {_few(wrong)} (checkpoint does not match config.json)")
    if extra:
        raise ValueError(f"{file}: unexpected encoder tensor(s) {_few(extra)}: not plain BERT, or more layers "
                         "than config.json says")
    return ours


def _few(items: list[str], n: int = 5) -> str:
    more = f" ... and {len(items) - n} more" if len(items) > n else ""
    return ", ".join(items[:n]) + more


def load_bert(path: str | Path, **overrides: float) -> TextEncoder:
    """A TextEncoder from any Hugging Face BERT checkpoint directory. `overrides` may set
    `dropout` / `attn_dropout` (e.g. 0.0 for feature extraction)."""
    path = Path(path)
    bad = sorted(set(overrides) - set(_OVERRIDABLE))
    if bad:
        raise TypeError(f"load_bert: cannot override {bad}; allowed: {list(_OVERRIDABLE)}")
    hf = _read_config(path)
    cfg = BertConfig.from_hf(hf).replace(**overrides)
    state, file = _read_weights(path)
    hf_state = _bert_part(state, file)
    _fold_task_type(hf_state, hf)
    with torch.device("meta"):                 # no random init: every tensor comes from the checkpoint
        model = TextEncoder(cfg)
    # fp16/bf16 checkpoints become float32 parameters
    ours = {k: v.float().contiguous() for k, v in _to_ours(hf_state, model, file).items()}
    model.load_state_dict(ours, assign=True)
    return model


def save_bert(model: TextEncoder, path: str | Path) -> None:
    """Write config.json + model.safetensors in Hugging Face BertModel names (no tokenizer files)."""
    cfg, t = model.cfg, model.cfg.transformer
    if t.pre_ln:
        raise ValueError("save_bert: a pre-LN transformer is not a BERT; Hugging Face BertModel is post-LN")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    hf = {
        "architectures": ["BertModel"], "model_type": "bert", "vocab_size": cfg.vocab_size,
        "hidden_size": t.width, "num_hidden_layers": t.layers, "num_attention_heads": t.heads,
        "intermediate_size": t.mlp_width, "hidden_act": _HF_ACTS[t.act], "hidden_dropout_prob": t.dropout,
        "attention_probs_dropout_prob": t.attn_dropout, "max_position_embeddings": cfg.max_position,
        "type_vocab_size": cfg.type_vocab_size, "layer_norm_eps": t.eps, "pad_token_id": cfg.pad_id,
        "position_embedding_type": "absolute", "initializer_range": 0.02,
    }
    (path / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
    state = {hf_name(k): v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, path / "model.safetensors", metadata={"format": "pt"})


@torch.no_grad()
def init_rows_from_pairs(model: TextEncoder, tokenizer, pairs: list[tuple[str, str]], first_new_row: int) -> int:
    """Start each new vocabulary row where its translations sit (dictionary-style initialisation of
    new tokens, as WECHSEL and similar methods do for a new language).

    `pairs` are (caption, translation) of one image, e.g. a Chinese and an English name. A new token
    (id >= first_new_row) starts at the mean input embedding of the pretrained tokens of the
    translations of every caption it occurs in, re-centred: the average over all translations is
    replaced by the mean of the pretrained rows, so common words ("face", "button") cancel and what
    is specific to the token remains. Tokens that occur in no pair keep their row. -> rows set.
    """
    weight = model.embeddings.word.weight                       # (V, D)
    n_new = weight.shape[0] - first_new_row
    if n_new <= 0 or not pairs:
        return 0
    special = torch.tensor(sorted({tokenizer.pad_id, tokenizer.unk_id, tokenizer.cls_id, tokenizer.sep_id,
                                   tokenizer.mask_id}))
    ids_a, _ = tokenizer.encode([a for a, _ in pairs], max_len=64)
    ids_b, _ = tokenizer.encode([b for _, b in pairs], max_len=64)
    known = (ids_b < first_new_row) & ~torch.isin(ids_b, special)    # (P, L)
    vec = (weight[ids_b] * known.unsqueeze(-1)).sum(1) / known.sum(1, keepdim=True).clamp_min(1)  # (P, D)
    has = known.any(1)
    vec, ids_a = vec[has], ids_a[has]
    occurs = torch.zeros(len(ids_a), n_new)                      # (P, n_new): token occurs in caption p
    rows, cols = (ids_a >= first_new_row).nonzero(as_tuple=True)
    occurs[rows, ids_a[rows, cols] - first_new_row] = 1.0
    count = occurs.sum(0)                                        # (n_new,)
    mean = occurs.t() @ vec / count.clamp_min(1).unsqueeze(1)    # (n_new, D)
    centred = mean - vec.mean(0) + weight[:first_new_row].mean(0)
    seen = count > 0
    weight[first_new_row:][seen] = centred[seen]
    return int(seen.sum())

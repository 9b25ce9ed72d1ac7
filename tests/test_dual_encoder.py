"""The dual encoder's locked-text path and the initialisation of new vocabulary rows."""
import dataclasses

import torch

from vlp.config import ModelConfig
from vlp.encoders.text import init_rows_from_pairs
from vlp.layers import BertConfig, TransformerConfig
from vlp.encoders.text import Freezing, TextEncoder
from vlp.models import freeze_text
from vlp.models.dual_encoder import DualEncoder, mean_pool
from vlp.encoders.patches import PatchEncoder


def _model(old_vocab=50, new=10):
    torch.manual_seed(0)
    text = TextEncoder(BertConfig(vocab_size=old_vocab, max_position=16,
                                  transformer=TransformerConfig(width=32, layers=2, heads=2, intermediate=64,
                                                                dropout=0.0, attn_dropout=0.0)))
    text.resize_vocab(old_vocab + new)
    with torch.no_grad():
        text.embeddings.word.weight[old_vocab:] = torch.randn(new, 32)
    text.freezing = Freezing(pretrained_vocab=old_vocab)
    freeze_text(text, 2)
    return DualEncoder(text, PatchEncoder(16, 8, 32, 1, 2), embed_dim=16)


def test_locked_tower_split_equals_one_pass():
    """Captions without new tokens run without autograd: same embeddings, same gradients to the new rows."""
    model = _model()
    ids = torch.randint(5, 50, (6, 7))
    ids[1, 3], ids[4, 2] = 55, 58                        # two captions hold new tokens
    mask = torch.ones_like(ids, dtype=torch.bool)
    mask[0, 5:] = mask[4, 4:] = False
    ids[~mask] = 0
    fast = model.encode_text(ids, mask)
    fast.square().sum().backward()
    g_fast = model.text.embeddings.word.weight.grad.clone()
    model.zero_grad()
    model.text.freezing = dataclasses.replace(model.text.freezing, new_rows_only=False)   # every caption runs the tower
    slow = torch.nn.functional.normalize(model.text_proj(mean_pool(model.text(ids, mask))), dim=-1)
    slow.square().sum().backward()
    torch.testing.assert_close(fast, slow, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(g_fast, model.text.embeddings.word.weight.grad, atol=1e-5, rtol=1e-5)
    assert g_fast[:50].abs().sum() == 0 and g_fast[55].abs().sum() > 0


def test_live_captions_run_in_length_buckets_equal_one_padded_pass():
    """Captions with trainable new rows run in groups of similar length (`_run_by_length`): the same
    embeddings and gradients as one pass padded to the longest, in the caller's row order."""
    model = _model()
    g = torch.Generator().manual_seed(3)
    lengths = torch.randint(2, 8, (48,), generator=g)
    mask = torch.arange(7)[None] < lengths[:, None]                    # (48, 7)
    ids = torch.randint(5, 50, (48, 7), generator=g)
    ids[:, 1] = torch.randint(50, 60, (48,), generator=g)              # every caption holds a new token
    ids[~mask] = 0
    calls = []
    hook = model.text.register_forward_hook(lambda m, a, out: calls.append(a[0].shape))
    fast = model.encode_text(ids, mask)
    hook.remove()
    assert len(calls) == 3 and sorted(c[1] for c in calls) == sorted(set(c[1] for c in calls))   # 3 trimmed groups
    fast.square().sum().backward()
    g_fast = model.text.embeddings.word.weight.grad.clone()
    model.zero_grad()
    slow = torch.nn.functional.normalize(model.text_proj(mean_pool(model.text(ids, mask))), dim=-1)
    slow.square().sum().backward()
    torch.testing.assert_close(fast, slow, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(g_fast, model.text.embeddings.word.weight.grad, atol=1e-5, rtol=1e-5)


def test_cached_features_equal_the_tower():
    """`cache_text` features are looked up for frozen-token captions: same embeddings and gradients."""
    model = _model()
    ids = torch.randint(5, 50, (6, 7))
    ids[1, 3] = 55                                       # one caption holds a new token
    mask = torch.ones_like(ids, dtype=torch.bool)
    mask[0, 5:] = mask[2, 3:] = False
    ids[~mask] = 0
    assert model.cache_text(ids[:3], mask[:3]) == 2      # the caption with a new token is never cached
    noise = torch.randn(50, 32)
    model.text.embeddings.word.weight.data[:50] += noise  # poison the tower: only a lookup gives the old value
    poisoned = model.encode_text(ids, mask)
    model.text.embeddings.word.weight.data[:50] -= noise
    model._text_cache = {}
    plain = model.encode_text(ids, mask)
    torch.testing.assert_close(poisoned[[0, 2]], plain[[0, 2]], atol=1e-5, rtol=1e-5)   # cached rows
    assert not torch.allclose(poisoned[3:], plain[3:], atol=1e-3)                      # not cached: recomputed
    model.cache_text(ids, mask)
    cached = model.encode_text(ids, mask)
    cached.square().sum().backward()
    g = model.text.embeddings.word.weight.grad.clone()
    model.zero_grad()
    model._text_cache = {}
    model.encode_text(ids, mask).square().sum().backward()
    torch.testing.assert_close(cached, plain, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(g, model.text.embeddings.word.weight.grad)


def test_frozen_new_rows_cache_every_caption():
    """train_new_rows=False: the new rows keep their init, so every caption is a lookup."""
    model = _model()
    freeze_text(model.text, 2, train_new_rows=False)
    assert not model.text.freezing.new_rows_only and model.text.freezing.locked
    assert not model.text.embeddings.word.weight.requires_grad
    ids = torch.randint(5, 60, (5, 6))                   # new tokens (>= 50) in some captions
    mask = torch.ones_like(ids, dtype=torch.bool)
    plain = model.encode_text(ids, mask)
    assert model.cache_text(ids, mask) == len({tuple(r) for r in ids.tolist()})
    calls = []
    model.text.register_forward_hook(lambda *a: calls.append(1))
    torch.testing.assert_close(model.encode_text(ids, mask), plain)
    assert not calls                                     # the tower did not run


def test_locked_tower_stays_in_inference_mode():
    model = _model().train()
    assert model.training and model.image.training and not model.text.training
    model.text.freezing = dataclasses.replace(model.text.freezing, locked=False)
    assert model.train().text.training


class _Tok:
    """Whitespace tokenizer over integer strings, with BERT's special ids 0-4."""
    pad_id, unk_id, cls_id, sep_id, mask_id = 0, 1, 2, 3, 4

    def encode(self, texts, max_len):
        rows = [[2] + [int(w) for w in t.split()] + [3] for t in texts]
        L = max(map(len, rows))
        ids = torch.tensor([r + [0] * (L - len(r)) for r in rows])
        return ids, ids != 0


def test_init_rows_from_pairs():
    model = _model()
    w = model.text.embeddings.word.weight
    before = w.detach().clone()
    # new token 55 occurs with translations {10, 11} and {10, 12}; 56 with {20}; 57 nowhere
    n = init_rows_from_pairs(model.text, _Tok(), [("55 56", "20"), ("55", "10 11"), ("55 7", "10 12")], 50)
    assert n == 2
    E = before[:50]
    centre = E.mean(0) - torch.stack([E[20], E[[10, 11]].mean(0), E[[10, 12]].mean(0)]).mean(0)
    torch.testing.assert_close(w[55], centre + (E[20] + E[[10, 11]].mean(0) + E[[10, 12]].mean(0)) / 3)
    torch.testing.assert_close(w[56], centre + E[20])
    torch.testing.assert_close(w[57], before[57])
    torch.testing.assert_close(w[:50], E)


def test_partly_frozen_tower_trains_its_top_layers():
    model = _model()
    for p in model.text.transformer.blocks[1].parameters():
        p.requires_grad_(True)
    model.text.freezing = Freezing(pretrained_vocab=50)
    freeze_text(model.text, 1)
    assert not model.text.freezing.locked and model.text.freezing.frozen_layers == 1
    ids = torch.randint(5, 50, (4, 6))                   # no new tokens at all
    model.encode_text(ids, torch.ones_like(ids, dtype=torch.bool)).sum().backward()
    assert model.text.transformer.blocks[1].attn.q.weight.grad.abs().sum() > 0
    assert model.text.transformer.blocks[0].attn.q.weight.grad is None


def test_mlp_text_head_on_cached_features():
    """`text_head = "mlp"`: a nonlinear projection after the locked tower, on the cached features too;
    unknown names fail clearly."""
    import pytest
    model = _model()
    mlp = DualEncoder(model.text, model.image, embed_dim=16, text_head="mlp")
    ids, mask = torch.randint(5, 50, (4, 6)), torch.ones(4, 6, dtype=torch.bool)
    assert mlp.cache_text(ids, mask) == 4
    out = mlp.encode_text(ids, mask)
    assert out.shape == (4, 16) and isinstance(mlp.text_proj, torch.nn.Sequential)
    torch.testing.assert_close(out.norm(dim=-1), torch.ones(4))
    out.sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in mlp.text_proj.parameters())
    with pytest.raises(ValueError, match="unknown text_head 'deep'"):
        DualEncoder(model.text, model.image, embed_dim=16, text_head="deep")

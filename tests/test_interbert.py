"""InterBERT pieces: MSM and overlap masking, the hybrid model (shared, text-only and image-only layers), its
single-modal paths, MRM, the 4-way retrieval loss, the collator's InterBERT options and the system's evaluation."""
import json
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from test_imagebert import CLASSES, FEAT, SPECIAL, VOCAB, _batch, _samples, tok  # noqa: F401 (tok: a fixture)
from vlp.data.masking import IGNORE, box_iou, mask_regions_overlap, mask_segments, overlap_masked, segment_tokens
from vlp.encoders.text import TextEncoder
from vlp.layers import BertConfig, TransformerConfig
from vlp.models.hybrid_stream import InterBERT
from vlp.objectives.masked_region import MaskedRegionModeling
from vlp.objectives.matching import RetrievalFinetune

T = True
_ = False


# --- MSM --------------------------------------------------------------------------------------------

def _segments(maskable, word_start, anchors, extra):
    tb = lambda rows: torch.tensor(rows, dtype=torch.bool)
    return segment_tokens(tb(maskable), tb(word_start), tb(anchors), torch.tensor(extra)).int().tolist()


def test_segments_hand_made():
    """[CLS] a hedge ##hog em ##oj ##i to the left [SEP] [PAD]: words a | hedge ##hog | em ##oj ##i | to | the | left"""
    maskable = [[_, T, T, T, T, T, T, T, T, T, _, _]] * 5
    starts = [[T, T, T, _, T, _, _, T, T, T, T, T]] * 5
    anchors = [[_, _, T, _, _, _, _, _, _, _, _, _],      # "hedgehog" + 1 word: hedge ##hog em ##oj ##i
               [_, _, _, _, _, _, _, _, T, _, _, _],      # "the" + 2 words: the left, and it stops at [SEP]
               [_, _, _, T, _, _, _, _, _, _, _, _],      # an anchor on a "##" piece is no anchor
               [_, T, T, _, _, _, _, _, _, _, _, _],      # "a" + 2 and "hedgehog" + 0 merge: a hedge ##hog em ##oj ##i
               [_, _, _, _, _, _, _, T, _, _, T, _]]      # "to" + 0; an anchor at [SEP] is no anchor
    extra = [[0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0],
             [0, 0, 0, 0, 0, 0, 0, 0, 2, 0, 0, 0],
             [0, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0],
             [0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
             [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2, 0]]
    assert _segments(maskable, starts, anchors, extra) == [
        [0, 0, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0],
        [0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 0, 0],
        [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        [0, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0],
        [0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0]]
    # [CLS] a [UNK] b ##c d [SEP]: the segment of "a" + 1 skips the [UNK] (not maskable) and takes "b ##c";
    # a "##" piece right after the [UNK] would begin a word
    got = _segments([[_, T, _, T, T, T, _]], [[T, T, T, T, _, T, T]], [[_, T, _, _, _, _, _]], [[0, 1, 0, 0, 0, 0, 0]])
    assert got == [[0, 1, 0, 1, 1, 0, 0]]
    got = _segments([[_, T, _, T, T, _]], [[T, T, T, _, _, T]], [[_, _, _, T, _, _]], [[0, 0, 0, 0, 0, 0]])
    assert got == [[0, 0, 0, 1, 1, 0]]


def _captions(B, L, gen):
    ids = torch.randint(5, VOCAB, (B, L), generator=gen)
    ids[:, 0], ids[:, -1] = 2, 3
    word_start = torch.rand(B, L, generator=gen) > 0.3                  # ~30% of the tokens continue a word
    return ids, torch.ones(B, L, dtype=torch.bool), word_start


def _words(ids, word_start):
    maskable = ids > 4
    start = maskable & (word_start | ~F.pad(maskable[:, :-1], (1, 0)))
    return maskable, start, start.long().cumsum(1) - 1


def test_mask_segments_rates_whole_words_and_80_10_10():
    gen = torch.Generator().manual_seed(0)
    ids, mask, word_start = _captions(4000, 32, gen)
    rows = torch.arange(4000) % 4 != 0
    out, labels = mask_segments(ids, mask, mask_id=4, special_ids=SPECIAL, vocab_size=VOCAB, word_start=word_start,
                                rows=rows, gen=torch.Generator().manual_seed(1))
    assert not (labels[~rows] != IGNORE).any()                          # losses on the loss rows only
    out, labels = mask_segments(ids, mask, mask_id=4, special_ids=SPECIAL, vocab_size=VOCAB, word_start=word_start,
                                gen=torch.Generator().manual_seed(1))
    chosen = labels != IGNORE
    maskable, start, word = _words(ids, word_start)
    assert not (chosen & ~maskable).any() and not ((out != ids) & ~chosen).any()
    cont = maskable & ~start                                            # a "##" piece goes with the piece before it
    assert torch.equal(chosen[:, 1:][cont[:, 1:]], chosen[:, :-1][cont[:, 1:]])
    # a word with two words before it is masked unless no anchor among itself and those two reaches it
    expect = 1 - 0.9 * (1 - 0.1 * 2 / 3) * (1 - 0.1 / 3)                 # 0.188
    assert abs(chosen[start & (word >= 2)].float().mean() - expect) < 0.01
    assert abs(chosen[start & (word == 0)].float().mean() - 0.1) < 0.01  # the first word: its own anchor only
    o, i = out[chosen], ids[chosen]
    assert 0.78 < (o == 4).float().mean() < 0.82                        # [MASK]
    assert 0.08 < ((o != 4) & (o != i)).float().mean() < 0.11           # random (1 in 55 draws the original)
    assert (labels[chosen] == i).all()
    again = mask_segments(ids, mask, mask_id=4, special_ids=SPECIAL, vocab_size=VOCAB, word_start=word_start,
                          gen=torch.Generator().manual_seed(1))
    assert torch.equal(again[0], out) and torch.equal(again[1], labels)  # pure: same generator, same masks


def test_mask_segments_one_span_per_caption():
    gen = torch.Generator().manual_seed(2)
    ids, mask, word_start = _captions(3000, 24, gen)
    _, labels = mask_segments(ids, mask, mask_id=4, special_ids=SPECIAL, vocab_size=VOCAB, word_start=word_start,
                              one_span=True, gen=gen)
    maskable, start, word = _words(ids, word_start)
    lengths = []
    for r in range(len(ids)):
        words = sorted(set(word[r][(labels[r] != IGNORE) & maskable[r]].tolist()))
        assert words and words == list(range(words[0], words[-1] + 1))  # one contiguous run of whole words
        last = int(word[r][maskable[r]].max())
        if words[0] <= last - 2:                                        # not cut by the caption's end
            lengths.append(len(words))
    counts = torch.bincount(torch.tensor(lengths), minlength=4)[1:] / len(lengths)
    assert set(lengths) == {1, 2, 3} and (abs(counts - 1 / 3) < 0.04).all()


# --- overlap masking ------------------------------------------------------------------------------------

def test_box_iou_against_torchvision():
    from torchvision.ops import box_iou as tv_iou
    gen = torch.Generator().manual_seed(0)
    xy = torch.rand(3, 6, 2, generator=gen)
    boxes = torch.cat([xy, xy + torch.rand(3, 6, 2, generator=gen)], -1)
    for b in range(3):
        torch.testing.assert_close(box_iou(boxes)[b], tv_iou(boxes[b], boxes[b]))


def test_overlap_masked_hand_made():
    A, B = [0, 0, 10, 10], [1, 1, 11, 11]           # IoU 81 / 119 = 0.68
    D, E = [0, 0, 10, 4], [0, 0, 10, 3.9]           # with A: IoU 0.40 exactly, 0.39; with B: 0.24, 0.23
    C, pad = [20, 20, 30, 30], [0, 0, 0, 0]         # C overlaps nothing
    boxes = torch.tensor([[A, B, C, D, E, pad]], dtype=torch.float)
    real = torch.tensor([[T, T, T, T, T, _]])

    def masked(*anchors):
        a = torch.zeros(1, 6, dtype=torch.bool)
        a[0, list(anchors)] = True
        return overlap_masked(boxes, real, a).int()[0].tolist()
    assert masked(0) == [1, 1, 0, 1, 0, 0]          # A takes B and D (IoU >= 0.4 is inclusive), not E or C
    assert masked(1) == [1, 1, 0, 0, 0, 0]          # B takes A only: one hop, D overlaps B too little
    assert masked(2) == [0, 0, 1, 0, 0, 0]
    assert masked(4) == [0, 0, 0, 1, 1, 0]          # E takes D (IoU 0.975), not A (0.39)
    assert masked(5) == [0, 0, 0, 0, 0, 0]          # padding is never masked, nor masks
    assert masked(2, 3) == [1, 0, 1, 1, 1, 0]       # D takes A and E, not B (0.24); C alone
    zero_area = torch.tensor([[[5, 5, 5, 5], C]], dtype=torch.float)   # a degenerate box still masks itself
    assert overlap_masked(zero_area, torch.ones(1, 2, dtype=torch.bool), torch.tensor([[T, _]])).tolist() == [[T, _]]


def test_mask_regions_overlap_groups_and_rates():
    """An overlapping box is always masked with its anchor; a box overlapping nothing is masked on its own,
    independently, at the anchor rate; features are zeroed exactly where masked; targets on loss rows only."""
    n = 6000
    boxes = torch.tensor([[0, 0, 10, 10], [1, 1, 11, 11], [20, 20, 30, 30], [0, 0, 0, 0]], dtype=torch.float)
    boxes = boxes.expand(n, 4, 4)
    real = torch.tensor([T, T, T, _]).expand(n, 4)
    feats = torch.rand(n, 4, FEAT) + 0.1
    rows = torch.arange(n) % 3 != 0
    out, targets = mask_regions_overlap(feats, boxes, real, rows=rows, gen=torch.Generator().manual_seed(0))
    masked = (out == 0).all(-1)
    assert torch.equal(out[~masked], feats[~masked]) and not masked[:, 3].any()
    assert torch.equal(masked[:, 0], masked[:, 1])                   # A and B: always together
    assert abs(masked[:, 0].float().mean() - (1 - 0.85 ** 2)) < 0.02  # either one an anchor
    assert abs(masked[:, 2].float().mean() - 0.15) < 0.015
    p_with, p_without = masked[masked[:, 0], 2].float().mean(), masked[~masked[:, 0], 2].float().mean()
    assert abs(p_with - p_without) < 0.03                             # C: independent of the A-B group
    assert torch.equal(targets, masked & rows[:, None])


def test_mrm_kl_against_naive():
    gen = torch.Generator().manual_seed(0)
    probs = torch.softmax(torch.randn(3, 4, CLASSES, generator=gen), -1)
    probs[0, 0] = torch.tensor([1.0] + [0.0] * (CLASSES - 1))        # a one-hot distribution: 0 log 0 = 0
    targets = torch.tensor([[T, _, T, _], [_, _, _, _], [T, T, _, T]])
    logits = torch.randn(int(targets.sum()), CLASSES, generator=gen)
    batch = SimpleNamespace(region_probs=probs, region_targets=targets)
    q = logits.softmax(-1)
    p = probs[targets]
    naive = sum(sum(float(p[k, c]) * (torch.log(p[k, c]) - torch.log(q[k, c])) for c in range(CLASSES) if p[k, c] > 0)
                for k in range(len(p))) / len(p)
    torch.testing.assert_close(MaskedRegionModeling()(SimpleNamespace(mrm_logits=logits), batch), naive)
    none = MaskedRegionModeling()(SimpleNamespace(mrm_logits=torch.zeros(0, CLASSES, requires_grad=True)), batch)
    assert none.item() == 0.0 and none.requires_grad


# --- the hybrid model --------------------------------------------------------------------------------

def _model(extract=1, layers=3, seed=0):
    torch.manual_seed(seed)
    text = TextEncoder(BertConfig(vocab_size=VOCAB, max_position=32, transformer=TransformerConfig(
        width=32, layers=layers, heads=2, intermediate=64, dropout=0.0, attn_dropout=0.0)))
    return InterBERT(text, feature_dim=FEAT, n_classes=CLASSES, extract_layers=extract)


def _args(b):
    return b.text_ids, b.text_mask, b.region_feats, b.region_boxes, b.region_mask


def test_extract_zero_equals_a_plain_single_stream_pass():
    """extract_layers = 0: every layer shared; the states equal one padded pass of the whole transformer over
    [global; regions; text] (the length groups trim padding only) and ITM reads [CLS] * global."""
    model, b = _model(extract=0).eval(), _batch(torch.Generator().manual_seed(5), B=40, L=14)
    assert len(model.image_blocks) == 0 and model.shared == 3
    v, vmask = model.embed_image(b.region_feats, b.region_boxes, b.region_mask)
    t = model.text.embeddings(b.text_ids)
    x = model.text.transformer(torch.cat([v, t], 1), torch.cat([vmask, b.text_mask], 1))   # (B, 1+R+L, D)
    text, image = model.encode(*_args(b), min_rows=8)
    real = b.text_mask
    torch.testing.assert_close(text[real], x[:, v.shape[1]:][real], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(image[vmask], x[:, :v.shape[1]][vmask], atol=1e-5, rtol=1e-5)
    assert (text[~real] == 0).all()
    out = model(b)
    torch.testing.assert_close(out.itm_logit, model.itm(x[:, v.shape[1]] * x[:, 0]).squeeze(-1), atol=1e-5, rtol=1e-5)


def test_length_groups_equal_one_padded_pass_with_extraction():
    model, b = _model(extract=1).eval(), _batch(torch.Generator().manual_seed(6), B=48, L=14)
    with torch.no_grad():
        for p in model.image_blocks.parameters():                     # the image stream differs from the text one
            p.add_(0.05 * torch.randn_like(p))
    (text, image), (ref_text, ref_image) = model.encode(*_args(b), min_rows=8), model.encode(*_args(b), buckets=1)
    real = b.text_mask
    torch.testing.assert_close(text[real], ref_text[real], atol=1e-5, rtol=1e-5)
    v, vmask = model.embed_image(b.region_feats, b.region_boxes, b.region_mask)
    torch.testing.assert_close(image[vmask], ref_image[vmask], atol=1e-5, rtol=1e-5)
    # by hand: shared block 0, 1 over both, then block 2 on the text part and the image block on the image part
    t = model.text.embeddings(b.text_ids)
    x = torch.cat([v, t], 1)
    m = torch.cat([vmask, b.text_mask], 1)
    for blk in model.text.transformer.blocks[:2]:
        x = blk(x, m)
    R1 = v.shape[1]
    torch.testing.assert_close(text[real], model.text.transformer.blocks[2](x[:, R1:], b.text_mask)[real],
                               atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(image[vmask], model.image_blocks[0](x[:, :R1], vmask)[vmask], atol=1e-5, rtol=1e-5)


def test_global_token_is_the_mean_of_the_given_regions():
    model, b = _model(), _batch(torch.Generator().manual_seed(7))
    v, vmask = model.embed_image(b.region_feats, b.region_boxes, b.region_mask)
    m = b.region_mask[..., None].float()
    mean = (b.region_feats * m).sum(1) / m.sum(1)                     # of the real (already masked) features
    whole = torch.tensor([0.0, 0.0, 1.0, 1.0, 1.0]).expand(len(mean), 5)
    ref = model.regions(mean[:, None], whole[:, None], torch.ones(len(mean), 1, dtype=torch.bool)).x[:, 0]
    torch.testing.assert_close(v[:, 0], ref)
    torch.testing.assert_close(v[:, 1:], model.regions(b.region_feats, b.region_boxes, b.region_mask).x)
    assert vmask[:, 0].all() and torch.equal(vmask[:, 1:], b.region_mask)


def test_single_modal_paths_shapes_and_slices():
    """encode_text / encode_image give (B, D) unit vectors, as a dual encoder's; with no shared layer they
    equal the pooled states of a full pass (the streams never meet), and the text path is the text tower."""
    from vlp.metrics import recall_at_k_from_embeddings
    model, b = _model(extract=3).eval(), _batch(torch.Generator().manual_seed(8), B=10)
    with torch.no_grad():
        for p in model.image_blocks.parameters():
            p.add_(0.05 * torch.randn_like(p))
    t = model.encode_text(b.text_ids, b.text_mask)
    v = model.encode_image(b.region_feats, b.region_boxes, b.region_mask)
    assert t.shape == v.shape == (10, 32)
    torch.testing.assert_close(t.norm(dim=-1), torch.ones(10))
    torch.testing.assert_close(v.norm(dim=-1), torch.ones(10))
    text, image = model.encode(*_args(b))
    torch.testing.assert_close(model.encode_text(b.text_ids, b.text_mask, normalize=False), text[:, 0])
    torch.testing.assert_close(model.encode_image(b.region_feats, b.region_boxes, b.region_mask, normalize=False),
                               image[:, 0])
    torch.testing.assert_close(text[b.text_mask], model.text(b.text_ids, b.text_mask).x[b.text_mask])
    res = recall_at_k_from_embeddings(t, v, torch.arange(10))
    assert res["n_texts"] == res["n_images"] == 10
    # shared layers: the single-modal paths run the same blocks, but regions and text no longer meet
    shared = _model(extract=1).eval()
    t1 = shared.encode_text(b.text_ids, b.text_mask, normalize=False)
    torch.testing.assert_close(t1, shared.text(b.text_ids, b.text_mask).x[:, 0])
    assert not torch.allclose(t1, shared.encode(*_args(b))[0][:, 0])
    # padded regions do not count, and the regions' order does not matter
    feats = b.region_feats.clone()
    feats[~b.region_mask] = 5.0
    torch.testing.assert_close(model.encode_image(feats, b.region_boxes, b.region_mask), v)
    perm = torch.arange(b.region_feats.shape[1]).flip(0)
    torch.testing.assert_close(model.encode_image(b.region_feats[:, perm], b.region_boxes[:, perm],
                                                  b.region_mask[:, perm]), v, atol=1e-5, rtol=1e-5)


def test_every_head_trains_and_the_image_stream_starts_as_the_top_text_layers():
    from vlp.models import freeze_text
    from vlp.objectives.masked_lm import MaskedLM
    from vlp.objectives.matching import ImageTextMatching
    model = _model(extract=2)
    for a, c in zip(model.image_blocks, model.text.transformer.blocks[1:]):
        assert all(torch.equal(p, q) for p, q in zip(a.parameters(), c.parameters()))
        assert all(p is not q for p, q in zip(a.parameters(), c.parameters()))      # copies, not shared
    b = _batch(torch.Generator().manual_seed(9))
    out = model(b)
    assert out.mlm_logits.shape == (int((b.mlm_labels != IGNORE).sum()), VOCAB)
    assert out.mrm_logits.shape == (int(b.region_targets.sum()), CLASSES)
    (MaskedLM()(out, b) + MaskedRegionModeling()(out, b) + ImageTextMatching()(out, b)).backward()
    for name in ("mlm_bias", "mrm.1.weight", "itm.weight", "regions.object.weight", "image_blocks.1.mlp.fc2.weight",
                 "text.transformer.blocks.0.attn.q.weight", "text.transformer.blocks.2.attn.q.weight"):
        assert model.get_parameter(name).grad.abs().sum() > 0, name
    text = _model(extract=0).text
    freeze_text(text, 3)                                              # a frozen text tower: the image stream trains
    frozen = InterBERT(text, FEAT, CLASSES, extract_layers=1)
    assert all(p.requires_grad for p in frozen.image_blocks.parameters())
    with pytest.raises(ValueError, match="extract_layers = 4: the text tower has 3 layers"):
        InterBERT(_model().text, FEAT, CLASSES, extract_layers=4)


# --- retrieval fine-tuning and the collator's InterBERT options ------------------------------------------

def test_retrieval_4way_against_naive():
    logits, labels = torch.randn(5 * 4), torch.tensor([1.0, 0, 0, 0] * 5)
    s = logits.view(5, 4)
    naive = torch.stack([s[i].logsumexp(0) - s[i, 0] for i in range(5)]).mean()
    out, batch = SimpleNamespace(itm_logit=logits), SimpleNamespace(itm_label=labels)
    torch.testing.assert_close(RetrievalFinetune("4way")(out, batch), naive)
    with pytest.raises(ValueError, match="data.negatives = 3, got 1"):
        RetrievalFinetune("4way")(SimpleNamespace(itm_logit=torch.randn(10)),
                                  SimpleNamespace(itm_label=torch.tensor([1.0, 0] * 5)))


def test_collator_four_way_rows(tok):
    """[match, a random caption for the image, a random image for the caption, a hard image for the caption]."""
    from vlp.data.collate import PairCollator
    samples, extra = _samples(6), _samples(6, torch.Generator().manual_seed(9))
    for i, s in enumerate(samples[:5]):                               # the last sample has no hard neighbour
        s["hard"] = [dict(extra[i], text=f"hard {i}", group=100 + i)]
    b = PairCollator(tok, 16, negatives=3, mask=False, seed=1, four_way=True)(samples)
    texts = [tok.decode(r) for r in b.text_ids]

    def regions_of(r, s):
        k = len(s["feats"])
        return int(b.region_mask[r].sum()) == k and torch.equal(b.region_feats[r, :k], s["feats"])
    assert b.itm_label.tolist() == [1.0, 0, 0, 0] * 6
    for i, s in enumerate(samples):
        r = 4 * i
        assert texts[r] == s["text"] and regions_of(r, s)
        assert texts[r + 1] != s["text"] and regions_of(r + 1, s)                       # random caption
        assert texts[r + 2] == s["text"] and b.group[r + 2] != s["group"]               # random image
        assert texts[r + 3] == s["text"] and b.group[r + 3] != s["group"]               # hard image
        if i < 5:
            assert b.group[r + 3] == 100 + i and regions_of(r + 3, extra[i])
    with pytest.raises(ValueError, match="negatives = 3"):
        PairCollator(tok, 16, negatives=1, four_way=True)


def test_collator_segments_and_overlap(tok):
    """MSM in the collator masks whole words ("em ##oj ##i" together) on matched rows; overlap masking masks an
    overlapping twin with its anchor; the defaults stay ImageBERT's token and independent masking."""
    from vlp.data.collate import PairCollator
    samples = _samples(6)
    words = ["hedgehog emoji to the left of a dog face", "two hedgehogs above an emoji tree",
             "a red apple emoji", "dog face", "一个狗脸在一个刺猬的左边", "cat face emoji"]
    twin = torch.tensor([[0.1, 0.1, 0.5, 0.5, 0.16], [0.12, 0.1, 0.52, 0.5, 0.16], [0.7, 0.7, 0.9, 0.9, 0.04]])
    for s, w in zip(samples, words):
        s["text"], s["feats"], s["boxes"] = w, torch.rand(3, FEAT) + 0.1, twin
        s["labels"], s["probs"] = torch.zeros(3, dtype=torch.long), torch.softmax(torch.randn(3, CLASSES), -1)
    cont = tok.continuation_ids()
    pieces = 0
    for seed in range(40):
        b = PairCollator(tok, 24, negatives=1, mask=True, seed=seed, text_masking="segments",
                         region_masking="overlap")(samples)
        plain = PairCollator(tok, 24, negatives=1, mask=False, seed=seed)(samples)
        chosen = b.mlm_labels != IGNORE
        ids = plain.text_ids
        is_cont = cont[ids] & plain.text_mask
        pieces += int(is_cont.sum())
        assert torch.equal(chosen[:, 1:][is_cont[:, 1:]], chosen[:, :-1][is_cont[:, 1:]])   # whole words
        assert not chosen[b.itm_label == 0].any()
        zeroed = (b.region_feats == 0).all(-1)
        assert torch.equal(zeroed[:, 0], zeroed[:, 1])                   # IoU 0.9: always together
        assert torch.equal(b.region_targets, zeroed & (b.itm_label == 1)[:, None])
    assert pieces > 0
    default = PairCollator(tok, 24, negatives=1, mask=True, seed=3)(samples)
    explicit = PairCollator(tok, 24, negatives=1, mask=True, seed=3, text_masking="tokens",
                            region_masking="independent")(samples)
    assert torch.equal(default.text_ids, explicit.text_ids) and torch.equal(default.region_feats, explicit.region_feats)


# --- the system --------------------------------------------------------------------------------------

def test_check_refuses_bad_settings(regions_tiny, tmp_path):
    from vlp import config, systems
    from vlp.data.regions import RegionStore
    system = systems.get("interbert")
    cfg = config.Config()
    cfg.model.arch, cfg.objectives = "interbert", {"msm": 1.0, "mrm": 1.0, "itm": 1.0}
    with pytest.raises(config.ConfigError, match="set data.regions"):
        system.check(cfg)
    cfg.data.regions = str(regions_tiny)
    system.check(cfg)
    assert (cfg.model.region_dim, cfg.model.region_classes) == (16, 5)
    for key, value, message in [("objectives", {"msm": 1.0, "mlm": 1.0}, "msm and mlm"),
                                ("objectives", {"retrieval_4way": 1.0}, "set data.negatives = 3"),
                                ("data.mrm_masking", "iou", "mrm_masking = 'iou'"),
                                ("data.msm_spans", "two", "msm_spans = 'two'"),
                                ("model.extract_layers", -1, "extract_layers = -1")]:
        bad = config.Config()
        bad.model.arch, bad.data.regions, bad.objectives = "interbert", str(regions_tiny), {"itm": 1.0}
        if key == "objectives":
            bad.objectives = value
        else:
            section, name = key.split(".")
            setattr(getattr(bad, section), name, value)
        with pytest.raises(config.ConfigError, match=message):
            system.check(bad)
    no_classes = RegionStore.write(tmp_path / "plain", [{"image_id": "1", "image_w": 8, "image_h": 8,
                                                         "features": torch.rand(2, 16), "boxes": torch.rand(2, 4)}])
    cfg.data.regions, cfg.model.region_dim = str(no_classes.path), 0
    with pytest.raises(config.ConfigError, match="objectives.mrm predicts"):
        system.check(cfg)


def test_evaluate_reports_cross_modal_and_single_modal(emoji_tiny, regions_tiny, tmp_path):
    from test_train import INTERBERT, TINY_INTERBERT, imagebert_cfg
    from vlp import systems
    from vlp.data.formats import read_records
    from vlp.train import checkpoint as ckpt
    from vlp.train import loop
    cfg = imagebert_cfg(emoji_tiny, regions_tiny, tmp_path / "run", preset=INTERBERT,
                        **{"train.steps": 2, **TINY_INTERBERT})
    run = loop.train(cfg, progress=False)
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert all(name in rows[-1] for name in ("msm", "mrm", "itm"))
    model, tok_, saved = ckpt.load_checkpoint(run)
    assert len(model.image_blocks) == 1 and saved.model.extract_layers == 1
    records, _ = read_records(emoji_tiny, split="test")
    res = systems.get("interbert").evaluate(model, tok_, saved, records,
                                            systems.EvalOptions(regions=str(regions_tiny), limit=6, progress=False))
    assert res["mode"] == "exhaustive" and res["n_images"] == 6
    single = res["single_modal"]
    assert single["mode"] == "single_modal" and single["n_images"] == 6 and single["n_texts"] == res["n_texts"]
    for section in (res, single, single["itm_weighted"]):
        assert all(0 <= section[k] <= 100 for k in ("i2t_r1", "t2i_r1", "t2i_r10"))
    with pytest.raises(ValueError, match="--regions"):
        systems.get("interbert").evaluate(model, tok_, saved, records, systems.EvalOptions())

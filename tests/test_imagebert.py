"""ImageBERT pieces: masking functions, region embedding, the single-stream model and its four losses."""
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from vlp.data.collate import Batch
from vlp.data.masking import IGNORE, mask_regions, mask_tokens
from vlp.encoders.regions import RegionEmbedder, box_features
from vlp.encoders.text import TextEncoder
from vlp.layers import BertConfig, TransformerConfig
from vlp.models.single_stream import ImageBERT
from vlp.objectives.masked_lm import MaskedLM
from vlp.objectives.masked_region import MaskedObjectClassification, MaskedRegionFeatureRegression
from vlp.objectives.matching import ImageTextMatching

SPECIAL = [0, 1, 2, 3, 4]          # pad, unk, cls, sep, mask
VOCAB, FEAT, CLASSES = 60, 12, 7


def _ids(B, L, gen):
    ids = torch.randint(5, VOCAB, (B, L), generator=gen)
    lengths = torch.randint(3, L + 1, (B,), generator=gen)
    mask = torch.arange(L)[None] < lengths[:, None]
    ids[:, 0] = 2
    ids[torch.arange(B), lengths - 1] = 3
    return ids * mask, mask


def test_mask_tokens_follows_bert():
    gen = torch.Generator().manual_seed(0)
    ids, mask = _ids(400, 40, gen)
    rows = torch.arange(400) % 2 == 0
    out, labels = mask_tokens(ids, mask, mask_id=4, special_ids=SPECIAL, vocab_size=VOCAB, rows=rows,
                              gen=torch.Generator().manual_seed(1))
    candidates = mask & (ids > 4)
    changed_or_labelled = (out != ids) | (labels != IGNORE)
    assert not (changed_or_labelled & ~candidates).any()             # specials and padding untouched
    assert not (labels[~rows] != IGNORE).any()                       # losses on the chosen rows only
    chosen = labels[rows] != IGNORE
    frac = chosen.sum() / candidates[rows].sum()
    assert 0.14 < frac < 0.17
    o, i = out[rows][chosen], ids[rows][chosen]
    assert 0.77 < (o == 4).float().mean() < 0.83                      # [MASK]
    assert 0.07 < ((o != 4) & (o != i)).float().mean() < 0.12          # random (a few random draws equal the original)
    assert (labels[rows][chosen] == i).all()
    again = mask_tokens(ids, mask, mask_id=4, special_ids=SPECIAL, vocab_size=VOCAB, rows=rows,
                        gen=torch.Generator().manual_seed(1))
    assert torch.equal(again[0], out) and torch.equal(again[1], labels)   # pure: same generator, same masks
    one = torch.tensor([[2, 7, 3]]).expand(2000, 3)                    # one maskable token: masked 15% of rows
    _, lab = mask_tokens(one, one > 0, mask_id=4, special_ids=SPECIAL, vocab_size=VOCAB, gen=gen)
    assert 0.12 < (lab[:, 1] != IGNORE).float().mean() < 0.18


def test_mask_regions_zeroes_90_percent_of_the_chosen():
    gen = torch.Generator().manual_seed(0)
    feats = torch.rand(300, 20, FEAT) + 0.1
    rmask = torch.arange(20)[None] < torch.randint(1, 21, (300, 1), generator=gen)
    rows = torch.arange(300) < 200
    out, targets = mask_regions(feats, rmask, rows=rows, gen=gen)
    zeroed = (out == 0).all(-1)
    assert not (zeroed & ~rmask).any() and not (targets & ~rmask).any() and not targets[~rows].any()
    chosen = zeroed | targets                                           # every zeroed region was chosen
    assert 0.85 < zeroed[rows].sum() / targets[rows].sum() < 0.95
    assert torch.equal(out[~chosen], feats[~chosen])
    single = torch.ones(2000, 1, dtype=torch.bool)                     # one region per image: not forced
    out, targets = mask_regions(torch.ones(2000, 1, FEAT), single, gen=gen)
    assert 0.12 < targets.float().mean() < 0.18 and 0.10 < (out == 0).all(-1).float().mean() < 0.16


def _model():
    torch.manual_seed(0)
    text = TextEncoder(BertConfig(vocab_size=VOCAB, max_position=32, transformer=TransformerConfig(
        width=32, layers=2, heads=2, intermediate=64, dropout=0.0, attn_dropout=0.0)))
    return ImageBERT(text, feature_dim=FEAT, n_classes=CLASSES)


def test_region_embedding_is_orderless_and_matches_the_paper():
    model = _model()
    emb = model.regions
    feats, boxes = torch.randn(2, 5, FEAT), torch.rand(2, 5, 5)
    x = emb(feats, boxes, torch.ones(2, 5, dtype=torch.bool)).x
    t = model.text.embeddings
    ref = F.layer_norm(emb.object(feats) + emb.location(boxes) + t.token_type.weight[1] + t.position.weight[0],
                       (32,), emb.norm.weight, emb.norm.bias, emb.norm.eps)
    torch.testing.assert_close(x, ref)
    perm = torch.tensor([3, 0, 4, 1, 2])
    torch.testing.assert_close(emb(feats[:, perm], boxes[:, perm], torch.ones(2, 5, dtype=torch.bool)).x, x[:, perm])
    loc = box_features(torch.tensor([[10.0, 20.0, 30.0, 40.0]]), 100.0, 200.0)
    torch.testing.assert_close(loc, torch.tensor([[0.1, 0.1, 0.4, 0.3, 1200 / 20000]]))


def _batch(gen, B=12, L=10, R=5):
    ids, mask = _ids(B, L, gen)
    feats = torch.rand(B, R, FEAT, generator=gen)
    rmask = torch.arange(R)[None] < torch.randint(1, R + 1, (B, 1), generator=gen)
    itm = (torch.arange(B) % 2 == 0).float()
    masked_ids, labels = mask_tokens(ids, mask, mask_id=4, special_ids=SPECIAL, vocab_size=VOCAB, rows=itm > 0,
                                     prob=0.3, gen=gen)
    masked_feats, targets = mask_regions(feats, rmask, rows=itm > 0, prob=0.3, gen=gen)
    probs = torch.softmax(torch.randn(B, R, CLASSES, generator=gen), -1)
    return Batch(images=None, text_ids=masked_ids, text_mask=mask, group=torch.arange(B), region_feats=masked_feats,
                 region_boxes=torch.rand(B, R, 5, generator=gen), region_mask=rmask, region_orig=feats,
                 region_labels=probs.argmax(-1), region_probs=probs, region_targets=targets, mlm_labels=labels,
                 itm_label=itm)


def test_losses_against_naive_full_heads():
    """Heads applied at the masked positions only give the losses of heads applied everywhere."""
    model, b = _model(), _batch(torch.Generator().manual_seed(3))
    out = model(b)
    text, regions = model.encode(b.text_ids, b.text_mask, b.region_feats, b.region_boxes, b.region_mask)
    all_logits = F.linear(model.mlm_transform(text), model.text.embeddings.word.weight, model.mlm_bias)  # (B, L, V)
    naive_mlm = F.cross_entropy(all_logits.reshape(-1, VOCAB), b.mlm_labels.reshape(-1), ignore_index=IGNORE)
    torch.testing.assert_close(MaskedLM()(out, b), naive_mlm)
    moc_all = model.moc(regions)                                                   # (B, R, C)
    k = b.region_targets
    assert k.sum() >= 3 and (b.mlm_labels != IGNORE).sum() >= 3                    # the batch has targets
    torch.testing.assert_close(MaskedObjectClassification()(out, b), F.cross_entropy(moc_all[k], b.region_labels[k]))
    kl = sum(F.kl_div(F.log_softmax(moc_all[i, j], -1), b.region_probs[i, j], reduction="sum")
             for i, j in k.nonzero().tolist()) / k.sum()
    torch.testing.assert_close(MaskedObjectClassification("distribution")(out, b), kl)
    mse = ((model.mrfr(regions)[k] - b.region_orig[k]) ** 2).mean()
    torch.testing.assert_close(MaskedRegionFeatureRegression()(out, b), mse)
    itm = -(b.itm_label * F.logsigmoid(out.itm_logit) + (1 - b.itm_label) * F.logsigmoid(-out.itm_logit)).mean()
    torch.testing.assert_close(ImageTextMatching()(out, b), itm)
    # only matched pairs carry masking targets
    assert not (b.mlm_labels[b.itm_label == 0] != IGNORE).any() and not b.region_targets[b.itm_label == 0].any()


def test_all_four_losses_train_every_head():
    model, b = _model(), _batch(torch.Generator().manual_seed(4))
    out = model(b)
    loss = sum(obj(out, b) for obj in (MaskedLM(), MaskedObjectClassification(), MaskedRegionFeatureRegression(),
                                       ImageTextMatching()))
    loss.backward()
    for name in ("mlm_bias", "moc.1.weight", "mrfr.1.weight", "itm.weight", "regions.object.weight",
                 "regions.location.weight", "text.transformer.blocks.0.attn.q.weight"):
        assert model.get_parameter(name).grad.abs().sum() > 0, name
    # text positions pass to the regions and back: a region change moves the [CLS] state
    b2 = _batch(torch.Generator().manual_seed(4))
    b2.region_feats = b2.region_feats + 1.0
    assert not torch.allclose(model(b2).cls, out.cls)


def test_length_groups_equal_one_padded_pass():
    """encode() runs rows in groups of similar caption length, each trimmed to its longest: the text
    states at real tokens, the region states and every gradient equal one padded pass over the batch."""
    model, b = _model().eval(), _batch(torch.Generator().manual_seed(5), B=48, L=14)
    assert len(set(b.text_mask.sum(1).tolist())) > 4                              # lengths differ: groups trim

    def padded(m):                                                                 # the plain single pass
        t, r = m.text.embeddings(b.text_ids), m.regions(b.region_feats, b.region_boxes, b.region_mask).x
        x = m.text.transformer(torch.cat([t, r], 1), torch.cat([b.text_mask, b.region_mask], 1))
        return x[:, :t.shape[1]], x[:, t.shape[1]:]

    args = (b.text_ids, b.text_mask, b.region_feats, b.region_boxes, b.region_mask)
    (text, regions), (ref_text, ref_regions) = model.encode(*args, min_rows=8), padded(model)
    real = b.text_mask
    torch.testing.assert_close(text[real], ref_text[real], atol=1e-5, rtol=1e-5)
    assert (text[~real] == 0).all()
    torch.testing.assert_close(regions[b.region_mask], ref_regions[b.region_mask], atol=1e-5, rtol=1e-5)
    grads = []
    for run in (lambda: model.encode(*args, min_rows=8), lambda: padded(model)):
        model.zero_grad()
        t, r = run()
        (t[real].square().sum() + r[b.region_mask].sum()).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], atol=1e-4, rtol=1e-4, msg=name)


def test_moc_target_is_checked():
    with pytest.raises(ValueError, match="MOC target must be"):
        MaskedObjectClassification("soft")


def _samples(n=6, gen=None):
    gen = gen or torch.Generator().manual_seed(5)
    words = ["red apple", "dog face", "a cat above a house", "two trees", "blue car", "green frog"]
    out = []
    for i in range(n):
        k = int(torch.randint(1, 5, (1,), generator=gen))
        out.append({"text": words[i % len(words)], "feats": torch.rand(k, FEAT, generator=gen) + 0.1,
                    "boxes": torch.rand(k, 5, generator=gen), "labels": torch.randint(CLASSES, (k,), generator=gen),
                    "probs": torch.softmax(torch.randn(k, CLASSES, generator=gen), -1), "group": i // 2})
    return out


@pytest.fixture(scope="module")
def tok():
    from vlp.data.tokenizer import Tokenizer, minilm_dir
    return Tokenizer.from_dir(minilm_dir())


def test_pair_collator_rows_negatives_and_masks(tok):
    from vlp.data.collate import PairCollator
    samples = _samples()
    b = PairCollator(tok, 16, negatives=3, mask=True, seed=1)(samples)
    assert len(b) == 6 * 4 and b.itm_label.view(6, 4).tolist() == [[1.0, 0.0, 0.0, 0.0]] * 6
    plain = PairCollator(tok, 16, negatives=3, mask=False, seed=1)(samples)
    texts = [tok.decode(r) for r in plain.text_ids]
    for i, s in enumerate(samples):
        rows = range(4 * i, 4 * i + 4)
        assert texts[4 * i] == s["text"] and plain.group[4 * i] == s["group"]
        for r in rows[1:]:   # a negative keeps the caption or the regions of sample i, never both
            same_regions = len(s["feats"]) == int(plain.region_mask[r].sum()) and torch.equal(
                plain.region_feats[r, :len(s["feats"])], s["feats"])
            assert same_regions != (texts[r] == s["text"])     # (captions are distinct in this batch)
            if same_regions:                                   # a caption of another group
                assert all(texts[r] != o["text"] for o in samples if o["group"] == s["group"])
            else:                                              # regions of another group
                assert plain.group[r] != s["group"]
    assert plain.mlm_labels is None and plain.region_targets is None
    # masking: losses on matched rows only; the originals are kept for MRFR; padding never masked
    assert not (b.mlm_labels[b.itm_label == 0] != IGNORE).any() and b.region_targets[b.itm_label == 1].any()
    assert not b.region_targets[b.itm_label == 0].any() and not (b.region_targets & ~b.region_mask).any()
    torch.testing.assert_close(b.region_orig, plain.region_feats)
    again = PairCollator(tok, 16, negatives=3, mask=True, seed=1)(samples)
    assert torch.equal(again.text_ids, b.text_ids) and torch.equal(again.region_feats, b.region_feats)
    with pytest.raises(ValueError, match="at least two groups"):
        PairCollator(tok, 16)([dict(s, group=0) for s in samples])


def test_pair_collator_clean_itm(tok):
    """clean_itm: the rows ITM scores are the unmasked rows of the plain collator; a masked copy of each
    matched pair follows them, the only rows with masked-task targets, and ITM leaves those out."""
    from vlp.data.collate import PairCollator
    samples = _samples()
    b = PairCollator(tok, 16, negatives=3, mask=True, seed=1, clean_itm=True)(samples)
    plain = PairCollator(tok, 16, negatives=3, mask=False, seed=1)(samples)
    assert len(b) == 6 * 4 + 6 and b.itm_rows.tolist() == [True] * 24 + [False] * 6 and b.pairs() == 6
    assert torch.equal(b.text_ids[:24], plain.text_ids) and torch.equal(b.region_feats[:24], plain.region_feats)
    assert not (b.mlm_labels[:24] != IGNORE).any() and not b.region_targets[:24].any()
    assert (b.mlm_labels[24:] != IGNORE).any() and b.region_targets[24:].any() and (b.itm_label[24:] == 1).all()
    torch.testing.assert_close(b.region_orig[24:], plain.region_feats[::4])      # the copies are the matched pairs
    assert not torch.equal(b.text_ids[24:], plain.text_ids[::4])                 # ... masked
    logit = torch.randn(len(b))
    loss = ImageTextMatching()(SimpleNamespace(itm_logit=logit), b)
    torch.testing.assert_close(loss, F.binary_cross_entropy_with_logits(logit[:24], plain.itm_label))


def test_pair_collator_hard_negatives(tok):
    """hard=1: every negative row pairs the sample with one of its own hard neighbours, each used once;
    hard=0: the neighbours are ignored (the batch-only rows of the plain collator)."""
    from vlp.data.collate import PairCollator
    samples, extra = _samples(6), _samples(12, torch.Generator().manual_seed(9))
    for i, s in enumerate(samples):
        s["hard"] = [dict(h, text=f"hard {i} {k}", group=100 + 3 * i + k) for k, h in enumerate(extra[2 * i:2 * i + 2])]
    b = PairCollator(tok, 16, negatives=2, mask=False, seed=1, hard=1.0)(samples)
    texts = [tok.decode(r) for r in b.text_ids]
    for i, s in enumerate(samples):
        assert texts[3 * i] == s["text"]
        assert texts[3 * i + 1] == f"hard {i} 0" and torch.equal(b.region_feats[3 * i + 1, :len(s["feats"])], s["feats"])
        h = s["hard"][1]                                   # second negative: the caption with the neighbour's regions
        assert texts[3 * i + 2] == s["text"] and b.group[3 * i + 2] == h["group"]
        assert torch.equal(b.region_feats[3 * i + 2, :len(h["feats"])], h["feats"])
    plain = PairCollator(tok, 16, negatives=2, mask=False, seed=1)(samples)
    ignored = PairCollator(tok, 16, negatives=2, mask=False, seed=1, hard=0.0)(samples)
    assert torch.equal(plain.text_ids, ignored.text_ids) and torch.equal(plain.region_feats, ignored.region_feats)


def test_tfidf_neighbours_against_naive():
    import math
    from collections import Counter
    from vlp.data.region_pairs import tfidf_neighbours
    docs = ["a red apple to the left of a dog face", "a dog face", "two red apple emoji", "a red apple 一个红苹果",
            "a blue car above a dog face", "一个红苹果和一个狗脸", "a cat", "a red apple to the left of a dog face"]
    groups = [0, 1, 2, 3, 4, 5, 6, 0]
    bags = [Counter(d.lower().replace("一个", "一 个 ").split()) for d in docs]   # reference terms, by hand:
    bags = [Counter(w for t in b.elements() for w in ([t] if t.isascii() else list(t))) for b in bags]
    df = Counter(w for b in bags for w in b)
    vec = [{w: c * (math.log((1 + len(docs)) / (1 + df[w])) + 1) for w, c in b.items()} for b in bags]
    norm = [math.sqrt(sum(v * v for v in x.values())) for x in vec]
    cos = [[sum(a.get(w, 0) * v for w, v in b.items()) / (norm[i] * norm[j]) for j, b in enumerate(vec)]
           for i, a in enumerate(vec)]
    got = tfidf_neighbours(docs, groups, k=3, max_sim=0.6, chunk=3)
    for i in range(len(docs)):
        ok = [j for j in range(len(docs)) if groups[j] != groups[i] and 0 < cos[i][j] < 0.6]
        want = sorted((cos[i][j] for j in ok), reverse=True)[:3]
        mine = got[i][got[i] >= 0].tolist()
        assert set(mine) <= set(ok) and len(set(mine)) == len(mine)        # other groups, below max_sim, distinct
        assert [cos[i][j] for j in mine] == pytest.approx(want, abs=1e-5)  # the most similar first (ties in any order)
    assert 7 not in got[0] and 0 not in got[7]                            # same group: never a negative


def test_retrieval_finetune_losses_against_naive():
    from vlp.objectives.matching import RetrievalFinetune
    logits = torch.randn(5 * 4)
    labels = torch.tensor([1.0, 0, 0, 0] * 5)
    out, batch = SimpleOut(logits), SimpleBatch(labels)
    s = logits.view(5, 4)
    torch.testing.assert_close(RetrievalFinetune("bce")(out, batch), F.binary_cross_entropy_with_logits(logits, labels))
    naive_ce = torch.stack([-(s[i, 0] - s[i].logsumexp(0)) for i in range(5)]).mean()
    torch.testing.assert_close(RetrievalFinetune("ce")(out, batch), naive_ce)
    naive_tri = torch.stack([max(torch.tensor(0.0), 0.2 - s[i, 0] + max(s[i, 1:])) for i in range(5)]).mean()
    torch.testing.assert_close(RetrievalFinetune("triplet", margin=0.2)(out, batch), naive_tri)
    with pytest.raises(ValueError, match="grouped as"):
        RetrievalFinetune("ce")(out, SimpleBatch(torch.tensor([0.0, 1, 0, 0] * 5)))
    with pytest.raises(ValueError, match="retrieval loss must be"):
        RetrievalFinetune("hinge")


class SimpleOut:
    def __init__(self, itm_logit):
        self.itm_logit = itm_logit


class SimpleBatch:
    def __init__(self, itm_label):
        self.itm_label = itm_label

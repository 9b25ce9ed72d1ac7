"""Cross-encoder retrieval: exhaustive scoring and rerank-the-top-k against naive full matrices."""
import pytest
import torch

from vlp.eval.rerank import cross_encoder_recall, evaluate_cross_encoder, pair_scorer
from vlp.metrics import recall_at_k

T2I = torch.tensor([0, 0, 1, 2, 2, 2, 3, 5, 5, 6, 7, 7])        # 12 captions, 8 images, image 4 has none
KEYS = ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "rsum")


def _scorer(S):
    return lambda t, i: S[t, i]


@pytest.mark.parametrize("seed", range(5))
def test_exhaustive_equals_the_full_matrix_with_ties(seed):
    S = torch.randint(0, 4, (12, 8), generator=torch.Generator().manual_seed(seed)).float()   # many ties
    res = cross_encoder_recall(_scorer(S), T2I, n_images=8, progress=False)
    ref = recall_at_k(S, T2I)
    assert {k: res[k] for k in KEYS} == pytest.approx({k: ref[k] for k in KEYS})
    assert res["mode"] == "exhaustive" and res["pairs_scored"] == 12 * 8


def _naive_rerank(first, S, k):
    """Per query row: the top k of `first` take their S score (above everything), the rest keep `first` below."""
    out = first - first.max() + S.min() - 1.0                    # every first-stage score below every S score
    top = first.topk(k, dim=1).indices
    return out.scatter(1, top, S.gather(1, top))


@pytest.mark.parametrize("k", [1, 3, 8])
def test_rerank_equals_a_naive_reranked_matrix(k):
    g = torch.Generator().manual_seed(k)
    te, ie = torch.randn(12, 6, generator=g), torch.randn(8, 6, generator=g)
    S = torch.randn(12, 8, generator=g)                          # the cross-encoder's (text, image) scores
    res = cross_encoder_recall(_scorer(S), T2I, k=k, text_emb=te, image_emb=ie, chunk=5, progress=False)
    first = te @ ie.t()
    t2i = recall_at_k(_naive_rerank(first, S, k), T2I)
    i2t = recall_at_k(_naive_rerank(first.t(), S.t(), k).t(), T2I)
    for key in KEYS[:3]:
        assert res[key] == pytest.approx(i2t[key]), key
    for key in KEYS[3:6]:
        assert res[key] == pytest.approx(t2i[key]), key
    if k == 8:                                                   # k = all images: rerank is exhaustive t2i
        assert res["t2i_r1"] == pytest.approx(recall_at_k(S, T2I)["t2i_r1"])


@pytest.mark.parametrize("fuse", [0.5, 3.0])
def test_fused_rerank_equals_the_naive_matrix_of_fused_scores(fuse):
    """fuse = w: the top k ranked by sigmoid(cross score) + w * first-stage score."""
    g = torch.Generator().manual_seed(7)
    te, ie = torch.randn(12, 6, generator=g), torch.randn(8, 6, generator=g)
    S = torch.randn(12, 8, generator=g)
    first = te @ ie.t()
    res = cross_encoder_recall(_scorer(S), T2I, k=3, text_emb=te, image_emb=ie, chunk=5, progress=False, fuse=fuse)
    fused = S.sigmoid() + fuse * first
    t2i = recall_at_k(_naive_rerank(first, fused, 3), T2I)
    i2t = recall_at_k(_naive_rerank(first.t(), fused.t(), 3).t(), T2I)
    assert [res[k] for k in KEYS[:3]] == pytest.approx([i2t[k] for k in KEYS[:3]])
    assert [res[k] for k in KEYS[3:6]] == pytest.approx([t2i[k] for k in KEYS[3:6]])
    assert res["fuse"] == fuse


def test_rerank_lifts_a_good_cross_encoder_over_a_weak_first_stage():
    g = torch.Generator().manual_seed(0)
    te, ie = torch.randn(12, 6, generator=g), torch.randn(8, 6, generator=g)
    perfect = (T2I[:, None] == torch.arange(8)[None]).float()    # knows every pair
    first = recall_at_k(te @ ie.t(), T2I)
    res = cross_encoder_recall(_scorer(perfect), T2I, k=8, text_emb=te, image_emb=ie, progress=False)
    assert res["t2i_r1"] == 100.0 and res["t2i_r1"] >= first["t2i_r1"]


def test_clear_errors():
    with pytest.raises(ValueError, match="needs n_images"):
        cross_encoder_recall(_scorer(torch.zeros(12, 8)), T2I)
    with pytest.raises(ValueError, match="out of range"):
        cross_encoder_recall(_scorer(torch.zeros(12, 8)), T2I, n_images=5)


def test_pair_scorer_matches_single_pairs():
    from test_imagebert import FEAT, _model
    model = _model().eval()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(5, 60, (4, 7), generator=g)
    mask = torch.arange(7)[None] < torch.tensor([[3], [7], [5], [2]])
    ids[:, 0], ids = 2, ids * mask
    feats, boxes = torch.rand(3, 4, FEAT, generator=g), torch.rand(3, 4, 5, generator=g)
    rmask = torch.arange(4)[None] < torch.tensor([[1], [4], [2]])
    score = pair_scorer(model, ids, mask, feats, boxes, rmask, batch_size=5)
    t, i = torch.tensor([0, 1, 2, 3, 0, 3, 1]), torch.tensor([0, 1, 2, 0, 2, 1, 0])
    one = torch.stack([model.match_scores(ids[a:a + 1, :int(mask[a].sum())], mask[a:a + 1, :int(mask[a].sum())],
                                          feats[b:b + 1, :int(rmask[b].sum())], boxes[b:b + 1, :int(rmask[b].sum())],
                                          rmask[b:b + 1, :int(rmask[b].sum())])[0] for a, b in zip(t.tolist(), i.tolist())])
    torch.testing.assert_close(score(t, i), one, atol=1e-5, rtol=1e-5)
    half = pair_scorer(model, ids, mask, feats, boxes, rmask, batch_size=5, bf16=True)(t, i)   # bf16 autocast:
    assert half.dtype == torch.float32 and not torch.equal(half, one)                       # a different path,
    torch.testing.assert_close(half, one, atol=0.05, rtol=0.05)                             # the same scores


def test_vlp_evaluate_a_single_stream_checkpoint(emoji_tiny, regions_tiny, tmp_path):
    """`vlp evaluate` on an ImageBERT run: exhaustive, and reranking a dual encoder's top 4."""
    import json

    from test_train import imagebert_cfg, tiny_cfg
    from vlp.cli import main
    from vlp.train import loop
    cross = loop.train(imagebert_cfg(emoji_tiny, regions_tiny, tmp_path / "ib", **{"train.steps": 2}), progress=False)
    dual = loop.train(tiny_cfg(emoji_tiny, tmp_path / "de", **{"train.steps": 2}), progress=False)
    base = ["evaluate", str(cross), "--data", str(emoji_tiny), "--split", "test", "--regions", str(regions_tiny)]
    main(base + ["--out", str(tmp_path / "all.json")])
    main(base + ["--first-stage", str(dual), "--rerank-k", "4", "--out", str(tmp_path / "rr.json")])
    exhaustive, rerank = (json.loads((tmp_path / f).read_text()) for f in ("all.json", "rr.json"))
    assert exhaustive["mode"] == "exhaustive" and rerank["mode"] == "rerank" and rerank["k_t2i"] == 4
    n_img = exhaustive["n_images"]
    assert exhaustive["pairs_scored"] == exhaustive["n_texts"] * n_img and n_img > 4
    assert rerank["pairs_scored"] == 4 * (rerank["n_texts"] + n_img)
    assert set(KEYS) <= set(rerank) and set(KEYS[:6]) <= set(rerank["first_stage"])
    main(["evaluate", str(dual), "--data", str(emoji_tiny), "--split", "test", "--limit", "3",     # a dual encoder:
          "--out", str(tmp_path / "de.json")])                                                    # --limit holds too
    assert json.loads((tmp_path / "de.json").read_text())["n_images"] == 3 < n_img
    with pytest.raises(SystemExit, match="--regions"):
        main(["evaluate", str(cross), "--data", str(emoji_tiny), "--split", "test"])
    # an image without regions in the store is skipped and counted, not silently dropped
    import dataclasses

    from vlp.data.formats import read_records
    from vlp.data.regions import RegionStore
    from vlp.train.checkpoint import load_checkpoint
    model, tok, cfg = load_checkpoint(cross)
    records = read_records(emoji_tiny, split="test")[0]
    lost = dataclasses.replace(records[0], image_id="not-in-the-store")
    res = evaluate_cross_encoder(model, tok, [lost, *records], RegionStore(regions_tiny), cfg.model.text_max_len,
                                 progress=False)
    assert exhaustive["skipped_no_regions"] == 0 and res["skipped_no_regions"] == 1
    assert {k: res[k] for k in KEYS} == {k: exhaustive[k] for k in KEYS}


def test_memoized_scorer_scores_each_pair_once():
    from vlp.eval.rerank import _memoized
    S, calls = torch.randn(5, 4), []

    def score(t, i):
        calls.extend(zip(t.tolist(), i.tolist()))
        return S[t, i]
    cached = _memoized(score)
    t, i = torch.tensor([0, 1, 4, 0]), torch.tensor([3, 2, 0, 3])
    assert torch.equal(cached(t, i), S[t, i]) and torch.equal(cached(t.flip(0), i.flip(0)), S[t, i].flip(0))
    assert sorted(calls) == sorted({(0, 3), (1, 2), (4, 0)})


def test_hard_negatives_mined_with_a_dual_encoder(emoji_tiny, regions_tiny, tmp_path, capsys):
    """Neighbours from a dual encoder equal a naive ranking of its similarities (own group and identical
    captions left out), and an ImageBERT fine-tuning run with `data.hard_from = DUAL` trains on them."""
    from test_train import imagebert_cfg, tiny_cfg
    from vlp.data.formats import SkipReport, read_records
    from vlp.data.pairs import decode_images
    from vlp.data.region_pairs import mine_neighbours
    from vlp.eval.retrieval import embed_images, embed_texts
    from vlp.train import loop
    from vlp.train.checkpoint import load_checkpoint
    dual = loop.train(tiny_cfg(emoji_tiny, tmp_path / "de", **{"train.steps": 2}), progress=False)
    records = read_records(emoji_tiny, split="train")[0]
    groups = [hash(r.meta["hex"]) for r in records]            # the two styles of one emoji: one group
    got = mine_neighbours(records, groups, str(dual), k=5, progress=False)
    model, tok, cfg = load_checkpoint(dual)
    img = embed_images(model.eval(), decode_images(records, cfg.model.image_size, SkipReport(), progress=False)[1])
    for n, r in enumerate(records):
        q = embed_texts(model, tok, r.captions, cfg.model.text_max_len).sum(0)
        sim = {m: float(q @ img[m]) for m, o in enumerate(records)
               if groups[m] != groups[n] and not set(o.captions) & set(r.captions)}
        want = sorted(sim.values(), reverse=True)[:5]
        assert set(got[n].tolist()) <= set(sim) and [sim[m] for m in got[n].tolist()] == pytest.approx(want, abs=1e-4)
    cfg = imagebert_cfg(emoji_tiny, regions_tiny, tmp_path / "ib", **{
        "train.steps": 2, "data.negatives": 2, "data.hard_negatives": 1.0, "data.hard_from": f'"{dual}"',
        "data.hard_pool": 4})
    capsys.readouterr()
    loop.train(cfg, progress=False)
    assert "hard negatives: the 4 nearest records by the dual encoder" in capsys.readouterr().out


def test_rerank_skips_unreadable_images_and_keeps_rows_aligned(emoji_tiny, regions_tiny, tmp_path):
    """Rerank mode decodes the images for the first stage: an unreadable or missing image is skipped and
    counted, and the recalls equal those of the same records without it (no row shifts after it)."""
    import dataclasses

    from vlp import config
    from vlp.data.formats import read_records
    from vlp.data.regions import RegionStore
    from vlp.data.tokenizer import Tokenizer
    from vlp import systems
    build_model = lambda mcfg, vocab: systems.get(mcfg.arch).build_model(mcfg, vocab)   # noqa: E731
    root = __import__("pathlib").Path(__file__).parents[1] / "src/vlp/configs"
    records = read_records(emoji_tiny, split="test")[0][:10]
    tok = Tokenizer.train([c for r in records for c in r.captions], vocab_size=300)
    torch.manual_seed(0)
    dual = build_model(config.load(root / "tiny.toml").model, tok.vocab_size).eval()
    cross = build_model(config.load(root / "emoji-imagebert.toml", [
        'model.text_init=""', "model.text_width=32", "model.text_layers=2", "model.text_heads=2",
        "model.region_dim=16", "model.region_classes=5"]).model, tok.vocab_size).eval()
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    corrupt = dataclasses.replace(records[2], image=str(tmp_path / "broken.png"))
    missing = dataclasses.replace(records[6], image=str(tmp_path / "no-such-file.png"))
    with_bad = [*records[:2], corrupt, *records[3:6], missing, *records[7:]]
    without = [r for n, r in enumerate(records) if n not in (2, 6)]
    store = RegionStore(regions_tiny)
    run = lambda recs: evaluate_cross_encoder(cross, tok, recs, store, 24, k=3, first_stage=(dual, tok, 32),
                                              progress=False, fuse=[0.0, 1.0])
    res, ref = run(with_bad), run(without)
    assert res["skipped_unreadable"] == 2 and ref["skipped_unreadable"] == 0
    assert res["n_images"] == ref["n_images"] == 8 and res["n_texts"] == ref["n_texts"]
    for section in (None, "fused_1", "first_stage"):
        got, want = (res[section], ref[section]) if section else (res, ref)
        assert {k: got[k] for k in KEYS[:6]} == pytest.approx({k: want[k] for k in KEYS[:6]}), section
    exhaustive = evaluate_cross_encoder(cross, tok, with_bad, store, 24, progress=False)   # reads no images
    assert exhaustive["n_images"] == 10 and exhaustive["skipped_unreadable"] == 0

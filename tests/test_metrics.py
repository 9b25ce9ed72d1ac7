"""Fast vs naive retrieval metrics: random data, exact ties, several captions, images without captions."""

import math

import pytest
import torch

from vlp.metrics import coco_1k, image_to_image, recall_at_k, recall_at_k_from_embeddings


def naive_recall(scores: list[list[float]], text_to_image: list[int], ks=(1, 5, 10)) -> dict:
    """Reference with plain loops: rank = 1 + number of non-ground-truth candidates scoring >= the GT."""
    n_texts, n_images = len(scores), len(scores[0])
    t2i_ranks = [1 + sum(1 for j in range(n_images) if j != g and scores[t][j] >= scores[t][g])
                 for t, g in enumerate(text_to_image)]
    i2t_ranks = []
    for i in range(n_images):
        captions = [t for t in range(n_texts) if text_to_image[t] == i]
        if not captions:
            continue
        best = max(scores[t][i] for t in captions)
        i2t_ranks.append(1 + sum(1 for t in range(n_texts) if t not in captions and scores[t][i] >= best))
    out = {}
    for name, ranks in (("i2t", i2t_ranks), ("t2i", t2i_ranks)):
        for k in ks:
            out[f"{name}_r{k}"] = 100.0 * sum(r <= k for r in ranks) / len(ranks)
        s = sorted(ranks)
        mid = s[len(s) // 2] if len(s) % 2 else (s[len(s) // 2 - 1] + s[len(s) // 2]) / 2
        out[f"{name}_meanr"], out[f"{name}_medr"] = sum(ranks) / len(ranks), float(math.floor(mid))
    out["rsum"] = sum(out[f"{d}_r{k}"] for d in ("i2t", "t2i") for k in ks)
    return out


def assert_same(fast: dict, ref: dict) -> None:
    for key, value in ref.items():
        assert fast[key] == pytest.approx(value, abs=1e-9), key


def random_case(seed: int, n_images: int, n_texts: int, dim: int = 8, missing: int = 3):
    """Integer-valued embeddings: dot products are exact (equal in every summation order) and tie often."""
    g = torch.Generator().manual_seed(seed)
    text = torch.randint(-1, 2, (n_texts, dim), generator=g).float()
    image = torch.randint(-1, 2, (n_images, dim), generator=g).float()
    with_captions = torch.randperm(n_images, generator=g)[: n_images - missing]  # the rest have no caption
    t2i = torch.cat([with_captions, with_captions[torch.randint(0, len(with_captions), (n_texts - len(with_captions),),
                                                                generator=g)]])
    return text, image, t2i[torch.randperm(n_texts, generator=g)]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matrix_matches_naive_with_rounded_ties(seed):
    g = torch.Generator().manual_seed(seed)
    n_images, n_texts = 23, 61
    scores = torch.round(torch.rand(n_texts, n_images, generator=g) * 10) / 10  # one decimal: many ties
    t2i = torch.cat([torch.arange(20), torch.randint(0, 20, (n_texts - 20,), generator=g)])  # 3 images uncaptioned
    ks = (1, 2, 5, 10)
    fast = recall_at_k(scores, t2i, ks=ks, chunk=7)
    assert_same(fast, naive_recall(scores.tolist(), t2i.tolist(), ks))
    assert recall_at_k(scores.T.contiguous().T, t2i, ks=ks, chunk=7) == fast  # column-major input
    assert recall_at_k(scores.double(), t2i, ks=ks, chunk=100) == fast
    assert (fast["n_images"], fast["n_texts"]) == (n_images, n_texts)


@pytest.mark.parametrize("chunk", [1, 5, 16, 1024])
def test_embeddings_path_equals_matrix_path_and_naive(chunk):
    text, image, t2i = random_case(seed=chunk, n_images=37, n_texts=113)
    scores = text @ image.T
    ref = recall_at_k(scores, t2i)
    fast = recall_at_k_from_embeddings(text, image, t2i, chunk=chunk)
    assert fast == ref
    assert_same(fast, naive_recall(scores.tolist(), t2i.tolist()))


def test_collapsed_model_scores_zero_not_hundred():
    t2i = torch.arange(50).repeat_interleave(5)
    m = recall_at_k(torch.zeros(250, 50), t2i)
    assert m["rsum"] == 0.0
    assert m["t2i_meanr"] == 50.0 and m["i2t_meanr"] == 250 - 5 + 1


def test_perfect_scores():
    t2i = torch.arange(10).repeat_interleave(3)
    scores = torch.nn.functional.one_hot(t2i, 10).float()  # (30, 10)
    m = recall_at_k(scores, t2i)
    assert m["rsum"] == 600.0 and m["i2t_medr"] == 1.0 and m["t2i_meanr"] == 1.0
    emb = torch.eye(10)
    assert recall_at_k(scores.requires_grad_(), t2i) == m  # autograd-tracked inputs are fine
    assert recall_at_k_from_embeddings(emb[t2i].requires_grad_(), emb.bfloat16(), t2i) == m


def test_coco_1k_equals_mean_over_folds():
    text, image, t2i = random_case(seed=7, n_images=40, n_texts=150, missing=0)
    got = coco_1k(text, image, t2i, folds=4, chunk=6)
    folds = []
    for f in range(4):
        keep = (t2i >= 10 * f) & (t2i < 10 * f + 10)
        folds.append(recall_at_k(text[keep] @ image[10 * f:10 * f + 10].T, t2i[keep] - 10 * f))
    for key in folds[0]:
        if key not in ("n_images", "n_texts"):
            assert got[key] == pytest.approx(sum(m[key] for m in folds) / 4), key
    assert got["protocol"] == "coco-10-4fold" and got["n_images"] == 40 and got["n_texts"] == 150


def test_coco_1k_protocol_name_and_bad_folds():
    text, image, t2i = random_case(seed=3, n_images=5000, n_texts=5000, dim=2, missing=0)
    assert coco_1k(text, image, t2i)["protocol"] == "coco-1k-5fold"
    with pytest.raises(ValueError, match="equal folds"):
        coco_1k(text[:10], image[:7], t2i[:10] % 7, folds=5)


def test_image_to_image_matches_naive():
    g = torch.Generator().manual_seed(5)
    query = torch.randint(-1, 2, (29, 6), generator=g).float()
    gallery = torch.randint(-1, 2, (31, 6), generator=g).float()
    q2g = torch.randint(0, 31, (29,), generator=g)
    got = image_to_image(query, gallery, q2g, chunk=4)
    ref = naive_recall((query @ gallery.T).tolist(), q2g.tolist())
    for key in ("r1", "r5", "r10", "meanr", "medr"):
        assert got[f"i2i_{key}"] == pytest.approx(ref[f"t2i_{key}"]), key
    assert (got["n_queries"], got["n_gallery"]) == (29, 31)


def test_bad_inputs_give_clear_errors():
    scores = torch.rand(4, 3)
    with pytest.raises(ValueError, match=r"text_to_image\[2\] = 3"):
        recall_at_k(scores, [0, 1, 3, 2])
    with pytest.raises(ValueError, match="one entry per query"):
        recall_at_k(scores, [0, 1, 2])
    with pytest.raises(ValueError, match="NaN \\(first in row 2\\)"):
        recall_at_k(torch.tensor([[1.0, 0, 0], [0, 1, 0], [0, float("nan"), 0], [1, 0, 0]]), [0, 1, 2, 0], chunk=2)
    with pytest.raises(ValueError, match="image_emb has non-finite values in 1 rows \\(first: row 1\\)"):
        recall_at_k_from_embeddings(torch.ones(4, 2), torch.tensor([[1.0, 0], [math.inf, 0]]), [0, 1, 0, 1])
    with pytest.raises(ValueError, match="dim"):
        recall_at_k_from_embeddings(torch.ones(4, 2), torch.ones(2, 3), [0, 1, 0, 1])

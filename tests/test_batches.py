"""Resumable batch order: deterministic, resumable, and cluster-aware (hard negatives)."""
import itertools

import pytest
import torch

from vlp.data.pairs import ResumableBatches


def _take(b, n):
    return [[i for i, _ in batch] for batch in itertools.islice(iter(b), n)]


def test_resume_continues_the_same_order():
    full = _take(ResumableBatches(50, 8, seed=3), 12)
    assert _take(ResumableBatches(50, 8, seed=3, start=5), 7) == full[5:]


def test_each_epoch_is_a_permutation_without_the_tail():
    batches = _take(ResumableBatches(50, 8, seed=1), 6)          # 6 full batches per epoch
    seen = [i for b in batches for i in b]
    assert len(set(seen)) == 48 and set(seen) <= set(range(50))


def test_clusters_stay_together_and_are_shuffled():
    clusters = [k // 4 for k in range(40)]                        # 10 clusters of 4 samples
    b = ResumableBatches(40, 8, seed=0, clusters=clusters)
    for epoch in range(3):
        order = [clusters[i] for i in b.permutation(epoch).tolist()]
        runs = [c for c, _ in itertools.groupby(order)]
        assert len(runs) == 10 and sorted(runs) == list(range(10))    # every cluster in one contiguous run
        assert sorted(b.permutation(epoch).tolist()) == list(range(40))
    assert b.permutation(0).tolist() != b.permutation(1).tolist()
    # each batch of 8 holds exactly two whole clusters
    for batch in _take(b, 5):
        assert len({clusters[i] for i in batch}) == 2


def test_cluster_size_cuts_clusters_into_random_chunks():
    clusters = [k // 6 for k in range(36)] + list(range(6, 18))   # 6 clusters of 6, then 12 singletons
    b = ResumableBatches(48, 8, seed=2, clusters=clusters, cluster_size=2)
    n_runs = 0
    for epoch in range(3):
        perm = b.permutation(epoch).tolist()
        assert sorted(perm) == list(range(48))
        runs = [(c, len(list(g))) for c, g in itertools.groupby(clusters[i] for i in perm)]
        for c in range(6):     # a 6-cluster comes as chunks of 2 (two chunks may fall side by side by chance)
            assert all(n % 2 == 0 for k, n in runs if k == c)
            n_runs += sum(1 for k, _ in runs if k == c)
    assert n_runs >= 2 * 6 * 3                                     # mostly apart: whole clusters would give 18
    # the chunks differ between epochs (members regrouped at random)
    pairs = lambda e: {frozenset(p) for p in zip(*[iter(i for i in b.permutation(e).tolist() if i < 36)] * 2)}
    assert pairs(0) != pairs(1)
    with pytest.raises(ValueError, match="cluster_size must be >= 0"):
        ResumableBatches(48, 8, seed=2, clusters=clusters, cluster_size=-1)


def test_without_clusters_the_order_is_unchanged():
    b = ResumableBatches(30, 6, seed=4)
    assert b.permutation(2).tolist() == torch.randperm(30, generator=torch.Generator().manual_seed(4 + 7919 * 2)).tolist()


def test_bad_cluster_list():
    with pytest.raises(ValueError, match="clusters has 3 ids for 10 samples"):
        ResumableBatches(10, 2, seed=0, clusters=[0, 1, 2])

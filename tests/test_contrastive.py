"""The multi-view InfoNCE against a naive per-row loop, including rows that share a group."""
import math

import torch

from vlp.objectives.contrastive import symmetric_info_nce


def naive_symmetric(a, b, ids, scale):
    def one_way(q, k):
        total = 0.0
        for i in range(len(q)):
            logits = [scale * float(q[i] @ k[j]) for j in range(len(k)) if j == i or ids[j] != ids[i]]
            pos = scale * float(q[i] @ k[i])
            total += -(pos - math.log(sum(math.exp(x) for x in logits)))
        return total / len(q)
    return 0.5 * (one_way(a, b) + one_way(b, a))


def test_matches_naive_with_shared_groups():
    g = torch.Generator().manual_seed(0)
    a = torch.nn.functional.normalize(torch.randn(9, 16, generator=g), dim=-1).double()
    b = torch.nn.functional.normalize(torch.randn(9, 16, generator=g), dim=-1).double()
    ids = torch.tensor([0, 1, 1, 2, 3, 3, 3, 4, 5])          # rows 1-2 and 4-6 are captions of one image
    scale = torch.tensor(7.0, dtype=torch.double)
    ours = symmetric_info_nce(a, b, ids, ids, scale)
    assert abs(float(ours) - naive_symmetric(a, b, ids.tolist(), 7.0)) < 1e-5


def test_shared_group_changes_loss():
    """Masking same-group rows must matter: with all-distinct ids the loss is larger (more negatives)."""
    g = torch.Generator().manual_seed(1)
    a = torch.nn.functional.normalize(torch.randn(6, 8, generator=g), dim=-1)
    b = a + 0.05 * torch.randn(6, 8, generator=g)
    scale = torch.tensor(10.0)
    shared = symmetric_info_nce(a, b, torch.tensor([0, 0, 0, 1, 1, 1]), torch.tensor([0, 0, 0, 1, 1, 1]), scale)
    distinct = symmetric_info_nce(a, b, torch.arange(6), torch.arange(6), scale)
    assert shared < distinct
    assert abs(float(distinct) - naive_symmetric(a.double(), b.double(), list(range(6)), 10.0)) < 1e-5

"""Run by tests/test_dist.py under torchrun: each rank holds half of a global batch."""
import sys

import torch

from vlp.objectives.contrastive import symmetric_info_nce
from vlp.train import dist


def main(out: str) -> None:
    dist.init()
    torch.manual_seed(0)
    layer = torch.nn.Linear(12, 8)                    # same init on every rank
    x = torch.randn(8, 12)
    y = torch.randn(8, 12)
    ids = torch.tensor([0, 1, 1, 2, 3, 4, 4, 5])       # rows 1-2 and 5-6 share a group
    n = 8 // dist.world()
    rows = slice(dist.rank() * n, (dist.rank() + 1) * n)
    a = torch.nn.functional.normalize(layer(x[rows]), dim=-1)
    b = torch.nn.functional.normalize(layer(y[rows]) * 0.5, dim=-1)
    loss = symmetric_info_nce(a, b, ids[rows], ids[rows], torch.tensor(5.0))
    loss.backward()
    for p in layer.parameters():                      # what DistributedDataParallel does
        torch.distributed.all_reduce(p.grad)
        p.grad /= dist.world()
    mean_loss = dist.all_reduce_mean(loss)
    if dist.is_main():
        torch.save({"loss": mean_loss, "grad_w": layer.weight.grad, "grad_b": layer.bias.grad}, out)
    dist.cleanup()


if __name__ == "__main__":
    main(sys.argv[1])

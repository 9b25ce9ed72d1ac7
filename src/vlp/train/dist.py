"""Distributed set-up in one place: torchrun env -> process group (gloo on CPU, nccl on GPU)."""
from __future__ import annotations

import os

import torch
import torch.distributed as td
import torch.distributed.nn.functional as tdf


def init() -> torch.device:
    """Join the process group when launched by torchrun; return this rank's device."""
    if "RANK" in os.environ and not td.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        td.init_process_group(backend)
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    if torch.cuda.is_available() and td.is_initialized():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def rank() -> int:
    return td.get_rank() if td.is_initialized() else 0


def world() -> int:
    return td.get_world_size() if td.is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if td.is_initialized():
        td.barrier()


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """(n, ...) per rank -> (world * n, ...), gradients flowing back to every rank's rows."""
    if world() == 1:
        return x
    return torch.cat(tdf.all_gather(x), dim=0)


def gather_nograd(x: torch.Tensor) -> torch.Tensor:
    if world() == 1:
        return x
    out = [torch.empty_like(x) for _ in range(world())]
    td.all_gather(out, x)
    return torch.cat(out, dim=0)


def broadcast_int(value: int) -> int:
    """Rank 0's value on every rank (e.g. a step count measured on rank 0's clock)."""
    if world() == 1:
        return value
    x = torch.tensor([value], dtype=torch.long, device=init())
    td.broadcast(x, src=0)
    return int(x.item())


def all_reduce_mean(x: torch.Tensor) -> torch.Tensor:
    if world() == 1:
        return x
    x = x.detach().clone()
    td.all_reduce(x)
    return x / world()


def cleanup() -> None:
    if td.is_initialized():
        td.destroy_process_group()

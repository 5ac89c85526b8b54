"""Runs under torchrun (docs/distributed.md): the process group from torchrun's environment, ranks, rank-0 output,
seed sharding, float64 sums and row gathers across ranks, and the guard that stops every rank when one fails.

A single process without torchrun's environment (no WORLD_SIZE, or WORLD_SIZE=1) makes no process group: every
helper here is then the identity, so one process behaves exactly as without this module.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


@dataclass(frozen=True)
class World:
    """This process's place in the job: global rank, number of processes, rank on this node."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    try:
        return int(os.environ.get(name, default))
    except ValueError:
        return default


def world() -> World:
    """The world from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK); one process without it."""
    size = _env_int("WORLD_SIZE", 1)
    if size <= 1:
        return World()
    return World(_env_int("RANK", 0), size, _env_int("LOCAL_RANK", 0))


def active() -> bool:
    """True when this process is one of several ranks with a process group."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def init() -> World:
    """Join the process group torchrun describes (once): gloo for CPU tensors, and nccl for CUDA tensors when
    this build has CUDA, one GPU per rank (LOCAL_RANK, made the current device so `cuda` means this rank's).
    Ranks other than 0 print nothing but their own failure (see `guard`)."""
    w = world()
    if w.size <= 1 or not dist.is_available() or dist.is_initialized():
        return w
    cuda = torch.cuda.is_available() and dist.is_nccl_available()
    if cuda:
        torch.cuda.set_device(w.local_rank % torch.cuda.device_count())
    dist.init_process_group(backend="cpu:gloo,cuda:nccl" if cuda else "gloo")
    if not w.main:
        from .commands.console import err, out

        err.quiet = out.quiet = True
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 (results are rank 0's; plain print() included)
    return w


def finish() -> None:
    """Leave the process group after a command that succeeded on every rank."""
    if active():
        dist.barrier()
        dist.destroy_process_group()


def is_main() -> bool:
    """Rank 0, or the only process: the one that writes shared files and prints."""
    return not active() or dist.get_rank() == 0


def rank_size() -> tuple[int, int]:
    """(rank, world size), (0, 1) without a process group."""
    return (dist.get_rank(), dist.get_world_size()) if active() else (0, 1)


def barrier() -> None:
    """Wait for every rank (nothing without a process group)."""
    if active():
        dist.barrier()


def _comm_device() -> torch.device:
    """Where collective tensors live: the current GPU under nccl, else the CPU (gloo)."""
    if active() and torch.cuda.is_available() and dist.is_nccl_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over ranks in float64 (so sums of statistics match one process to float error); returns a
    float64 tensor on the tensor's device."""
    if not active():
        return t
    buf = t.detach().to(device=_comm_device(), dtype=torch.float64).contiguous()
    dist.all_reduce(buf)
    return buf.to(t.device)


def all_mean_(tensors: Sequence[torch.Tensor]) -> None:
    """Average tensors (gradients) over ranks in place, each one in its own dtype."""
    if not active():
        return
    size = dist.get_world_size()
    for t in tensors:
        buf = t.detach().to(_comm_device()).contiguous()
        dist.all_reduce(buf)
        t.copy_(buf / size)


def average_gradients(grads: Sequence[torch.Tensor], rows: int, total: int) -> None:
    """Gradients of a mean loss over this rank's `rows` of a global batch of `total` rows, made the gradient of
    the mean over the whole batch on every rank (in place): each rank's share weighted by its rows, then summed,
    as DistributedDataParallel does for equal shares."""
    if not active():
        return
    weight = rows * dist.get_world_size() / total
    for g in grads:
        g.mul_(weight)
    all_mean_(grads)


def data_parallel(module: torch.nn.Module) -> torch.nn.Module:
    """The module wrapped in DistributedDataParallel under torchrun (its gradients averaged over ranks during
    backward), the module itself in one process. Parameters a forward leaves unused (a step or class embedding
    fed None) are allowed; on a GPU the module's own device is the rank's."""
    if not active():
        return module
    from torch.nn.parallel import DistributedDataParallel

    dev = next(module.parameters()).device
    ids = [dev] if dev.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=ids, find_unused_parameters=True)


def shard(items: Sequence[T]) -> list[T]:
    """This rank's contiguous share of `items` (seeds): rank r gets the r-th of `size` near-equal blocks, so
    concatenating the shares in rank order gives `items` back."""
    rank, size = rank_size()
    n = len(items)
    lo, hi = n * rank // size, n * (rank + 1) // size
    return list(items[lo:hi])


def gather_rows(t: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's rows in rank order (on the CPU, same dtype), on every rank; `t` itself without a
    process group. Ranks may hold different numbers of rows."""
    if not active():
        return t
    dev = _comm_device()
    n = torch.tensor([t.shape[0]], device=dev)
    counts = [torch.zeros_like(n) for _ in range(dist.get_world_size())]
    dist.all_gather(counts, n)
    most = int(max(int(c) for c in counts))
    pad = torch.zeros((most, *t.shape[1:]), dtype=t.dtype, device=dev)
    pad[: t.shape[0]] = t.to(dev)
    parts = [torch.empty_like(pad) for _ in counts]
    dist.all_gather(parts, pad)
    return torch.cat([p[: int(c)] for p, c in zip(parts, counts)]).cpu()


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's small JSON-like object (shard entries, names), in rank order, on every rank."""
    if not active():
        return [obj]
    got: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(got, obj)
    return got


def broadcast_object(obj: Any) -> Any:
    """Rank 0's small JSON-like object (a plan, a spec) on every rank."""
    if not active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def abort(message: str, code: int) -> None:
    """A failed rank under torchrun: print its message (with its rank) and leave now, with its exit status.
    torchrun sees the failure and stops the other ranks, which may be waiting in a collective for this one."""
    rank, size = rank_size() if active() else (world().rank, world().size)
    prefix = f"[rank {rank}/{size}] " if size > 1 else ""
    sys.stdout.flush()
    sys.stderr.write(prefix + message.rstrip("\n") + "\n")
    sys.stderr.flush()
    os._exit(code)

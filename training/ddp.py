"""Distributed data parallel: the same training loop on one process or many (torchrun).

Why so little: torchrun sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT;
we read them, pick gloo on CPU and nccl on GPU, and hand the loop a :class:`DistContext`.
Every rank trains on its shard of each global batch (see :func:`epoch_batches`) with
gradients averaged by DistributedDataParallel; every rank evaluates the full validation
set itself (identical parameters give identical decisions, so early stopping needs no
communication), and only rank 0 writes files.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DistributedSampler

from napari_dismm.errors import DismmError


@dataclass(frozen=True)
class DistContext:
    """Where this process stands: rank, world size, its device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Only the main process writes files and prints."""
        return self.rank == 0


SINGLE = DistContext()


def env_world_size() -> int:
    """WORLD_SIZE from the environment (1 outside torchrun)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise DismmError(f"WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not an integer") from None


def init_from_env(*, backend: str | None = None) -> DistContext:
    """Join the process group torchrun describes; a single process when WORLD_SIZE <= 1."""
    world = env_world_size()
    cuda = torch.cuda.is_available()
    if world <= 1:
        return DistContext(device=torch.device("cuda") if cuda else torch.device("cpu"))
    missing = [k for k in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise DismmError(f"WORLD_SIZE={world} but {', '.join(missing)} not set: start with torchrun")
    rank, local = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    backend = backend or ("nccl" if cuda else "gloo")
    if cuda:
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, rank=rank, world_size=world)
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    return DistContext(rank=rank, world_size=world, local_rank=local, device=device)


def shutdown(ctx: DistContext) -> None:
    if ctx.distributed and dist.is_initialized():
        dist.destroy_process_group()


@contextmanager
def distributed_from_env() -> Iterator[DistContext]:
    """``with distributed_from_env() as ctx:`` joins and always leaves the process group."""
    ctx = init_from_env()
    try:
        yield ctx
    finally:
        shutdown(ctx)


def barrier(ctx: DistContext) -> None:
    if ctx.distributed:
        dist.barrier()


def wrap(model: nn.Module, ctx: DistContext) -> nn.Module:
    """The model as the training step sees it: DDP-wrapped when distributed."""
    if not ctx.distributed:
        return model
    from torch.nn.parallel import DistributedDataParallel

    ids = [ctx.local_rank] if ctx.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids)


def epoch_batches(n: int, *, batch_size: int, seed: int, epoch: int, ctx: DistContext) -> list[list[int]]:
    """This rank's sample indices per step of one epoch.

    One seeded permutation per epoch (DistributedSampler's, so every rank agrees); the
    global batch of ``batch_size`` is split evenly: rank r takes every world-th index, so
    the union of the ranks' k-th local batches is the single-process k-th batch. The
    epoch is padded by repeating indices to a multiple of the world size (as the sampler
    does); a last partial batch is kept (all ranks get the same number of steps)."""
    world = ctx.world_size
    if batch_size % world:
        raise DismmError(f"batch_size {batch_size} must be a multiple of the {world} processes")
    sampler = DistributedSampler(range(n), num_replicas=world, rank=ctx.rank, shuffle=True, seed=seed)
    sampler.set_epoch(epoch)
    local = list(sampler)
    per_rank = batch_size // world
    return [local[i:i + per_rank] for i in range(0, len(local), per_rank)]


def all_reduce_mean(value: float, ctx: DistContext) -> float:
    """Mean of a float over ranks (for logging the training loss of the whole batch)."""
    if not ctx.distributed:
        return value
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return float(t.item()) / ctx.world_size

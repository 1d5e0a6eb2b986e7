"""Multi-process data-parallel training plumbing (`torchrun --nproc_per_node N -m ctseg train ...`).

torchrun sets RANK / WORLD_SIZE / LOCAL_RANK (and MASTER_ADDR / MASTER_PORT); `init_distributed` reads them
and opens a process group (nccl on CUDA, gloo on CPU). Each rank draws its own data stream (the data seed
includes the rank), gradients are averaged by `DistributedDataParallel`, and only rank 0 writes files or
shows progress. Without those variables everything here is a no-op for a single process.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ctseg.errors import CtsegError
from ctseg.runtime import resolve_device

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistContext:
    """Where this process stands: `rank` of `world_size`, `local_rank` on its node, its `device`."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    owns_group: bool = False  # True when `init_distributed` opened the process group (and must close it)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise CtsegError(f"environment variable {name}={value!r} is not an integer") from None


def init_distributed(device: str | torch.device | None = "auto") -> DistContext:
    """Read torchrun's environment; open the process group if WORLD_SIZE > 1 and none is open yet."""
    world_size = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", rank)
    dev = resolve_device(device, local_rank)
    if world_size <= 1:
        return DistContext(0, 1, 0, dev)
    if dist.is_initialized():
        return DistContext(dist.get_rank(), dist.get_world_size(), local_rank, dev, owns_group=False)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    backend = "nccl" if dev.type == "cuda" else "gloo"
    kwargs: dict[str, Any] = {"device_id": dev} if dev.type == "cuda" else {}
    dist.init_process_group(backend=backend, rank=rank, world_size=world_size, **kwargs)
    log.info("process group %s: rank %d of %d on %s", backend, rank, world_size, dev)
    return DistContext(rank, world_size, local_rank, dev, owns_group=True)


def shutdown(ctx: DistContext) -> None:
    """Close the process group if `init_distributed` opened it."""
    if ctx.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def barrier(ctx: DistContext) -> None:
    if ctx.enabled:
        dist.barrier()


def wrap_model(model: nn.Module, ctx: DistContext) -> nn.Module:
    """DistributedDataParallel around `model` (already on ctx.device) when world_size > 1.

    static_graph: the training graph is the same every step; it also lets DDP skip parameters that never
    get a gradient (e.g. nnU-Net's deep-supervision heads left unused).
    """
    if not ctx.enabled:
        return model
    from torch.nn.parallel import DistributedDataParallel

    ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids, static_graph=True)


def mean_over_ranks(value: float, ctx: DistContext) -> float:
    """Average a Python float over all ranks (identity for one process)."""
    if not ctx.enabled:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=ctx.device)
    dist.all_reduce(t)
    return float(t.item()) / ctx.world_size


def gather_objects(obj: object, ctx: DistContext) -> list:
    """Every rank's `obj` (picklable, small), in rank order, on every rank."""
    if not ctx.enabled:
        return [obj]
    out = [None] * ctx.world_size
    dist.all_gather_object(out, obj)
    return out


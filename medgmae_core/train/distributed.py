"""Multi-process training through ``torchrun``: NCCL on CUDA, gloo on CPU; only rank 0 writes.

``torchrun --nproc_per_node=G [--nnodes=N ...] -m medgmae_core.cli pretrain ...`` sets
``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``; without them everything runs in one process.
Data sharding is done by the crop stream itself (rank ``r`` of ``W`` reads case slots
``r, r+W, ...``; see :mod:`medgmae_core.data.datasets`), the DistributedSampler equivalent.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def resolve_device(spec: str = "auto", local_rank: int = 0) -> torch.device:
    """``auto`` -> this process's CUDA device if there is one, else CPU; ``cpu``; ``cuda`` / ``cuda:N``."""
    spec = str(spec or "auto").lower()
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    if spec.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError(f"--device {spec}: CUDA is not available on this machine (use --device cpu)")
        if spec == "cuda":
            return torch.device("cuda", local_rank % torch.cuda.device_count())
        return torch.device(spec)
    if spec != "cpu":
        raise ValueError(f"--device must be auto, cpu, cuda or cuda:N, got {spec!r}")
    return torch.device("cpu")


def init_distributed(device: torch.device) -> DistInfo:
    """Join the process group torchrun set up (no-op for a single process)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistInfo()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend=backend)
    log.info("rank %d/%d (local %d) joined with %s", rank, world_size, local_rank, backend)
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, backend=backend)


def cleanup_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def wrap_model(model: nn.Module, info: DistInfo, device: torch.device) -> nn.Module:
    """DistributedDataParallel around ``model`` when there are several processes."""
    if not info.enabled:
        return model
    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids)


def all_reduce_mean(value: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Mean of ``value`` over ranks (the value itself for one process)."""
    if not info.enabled:
        return value
    out = value.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out / info.world_size


def any_rank(flag: bool, info: DistInfo, device: torch.device) -> bool:
    """True on every rank if ``flag`` is True on any rank (e.g. a stop request)."""
    if not info.enabled:
        return bool(flag)
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()

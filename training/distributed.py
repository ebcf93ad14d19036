"""Multi-GPU and multi-node training through ``torchrun`` (DistributedDataParallel).

    torchrun --nproc_per_node 8 -m training.train_classifier -- --config densenet121_paper --run DIR
    torchrun --nnodes 2 --node_rank R --rdzv_endpoint HOST:PORT --nproc_per_node 8 -m ...

The ``--`` ends torchrun's own options: without it torchrun reads ``--run`` as its
``--run-path`` ("ambiguous option"). ``torchrun`` sets RANK, WORLD_SIZE and LOCAL_RANK; without them training runs in one
process. NCCL is used on GPUs, gloo on CPUs. The global batch stays the config's
``batch_size``: each of the W processes takes ``batch_size / W`` rows per step.
"""

from __future__ import annotations

import gc
import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init(device: torch.device | None = None) -> DistInfo:
    """Join the process group torchrun describes, or describe a single process.

    Args:
        device: Device for a single process; with torchrun each process takes
            ``cuda:LOCAL_RANK`` when CUDA is present, else the CPU.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return DistInfo(0, 1, 0, device or torch.device("cpu"))
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device, backend = torch.device("cuda", local_rank), "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, rank=rank, world_size=world_size)
    logger.info("process %d of %d on %s (%s)", rank, world_size, device, backend)
    return DistInfo(rank, world_size, local_rank, device)


def wrap(model: torch.nn.Module, info: DistInfo) -> torch.nn.Module:
    """The model in DistributedDataParallel when there are several processes."""
    if info.world_size == 1:
        return model
    ids = [info.device.index] if info.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if isinstance(model, DistributedDataParallel) else model


def mean_over_ranks(value: float, info: DistInfo) -> float:
    """Mean of a float over all processes (the value itself in one process)."""
    if info.world_size == 1:
        return value
    tensor = torch.tensor([value], dtype=torch.float64, device=info.device)
    dist.all_reduce(tensor)
    return float(tensor.item()) / info.world_size


def barrier(info: DistInfo) -> None:
    if info.world_size > 1:
        dist.barrier()


def close(info: DistInfo) -> None:
    """Leave the process group once every process has reached this point.

    Callers drop their DistributedDataParallel wrapper first (keep ``unwrap(model)``):
    a wrapper that outlives the group aborted its process at exit with "terminate called
    without an active exception" (gloo on CPU, about one run in ten). The wrapper's
    hooks form reference cycles, so it is collected here, before the group goes.
    """
    if info.world_size > 1 and dist.is_initialized():
        gc.collect()
        dist.barrier()
        dist.destroy_process_group()

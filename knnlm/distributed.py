"""Several processes under `torchrun`: process-group setup and the two collectives the pipeline uses.

Training (DDP) and datastore writing run on any number of ranks; with WORLD_SIZE unset everything is one process.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def setup_distributed() -> tuple[int, int, torch.device]:
    """(rank, world size, device). Under `torchrun` (WORLD_SIZE > 1) joins the process group: NCCL on GPUs, gloo on CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
        return dist.get_rank(), world, torch.device("cuda", local)
    # CPU ranks share the cores instead of each starting one thread per core
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", world))))
    return dist.get_rank(), world, torch.device("cpu")


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def gather_cat(x: torch.Tensor) -> torch.Tensor:
    """Concatenate equally shaped tensors of all ranks in rank order (identity on one process)."""
    if not is_distributed():
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)

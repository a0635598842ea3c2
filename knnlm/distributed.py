"""Several processes under `torchrun`: process-group setup, where work runs, and the collectives the pipeline uses.

Training (DDP), datastore writing and the evaluation's exact search (the store split across the ranks) run on any
number of ranks; with WORLD_SIZE unset everything is one process.
"""

from __future__ import annotations

import os

import numpy as np
import torch
import torch.distributed as dist


def default_device() -> torch.device:
    """knnlm's one rule for where work runs: this process's GPU when there is one, else the CPU."""
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def setup_distributed() -> tuple[int, int, torch.device]:
    """(rank, world size, device). Under `torchrun` (WORLD_SIZE > 1) joins the process group: NCCL on GPUs, gloo on CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, default_device()
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


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) of this process; (0, 1) outside a process group."""
    return (dist.get_rank(), dist.get_world_size()) if is_distributed() else (0, 1)


def collective_device() -> torch.device:
    """Where tensors must be for collectives: the GPU under NCCL, the CPU under gloo (or with no process group)."""
    return default_device() if is_distributed() and dist.get_backend() == "nccl" else torch.device("cpu")


def broadcast_array(x: np.ndarray | None, src: int = 0) -> np.ndarray:
    """Rank `src`'s array on every rank (the others pass None); the array itself outside a process group."""
    if not is_distributed():
        return x
    meta = [(x.shape, x.dtype.str) if dist.get_rank() == src else None]
    dist.broadcast_object_list(meta, src=src)
    shape, dtype = meta[0]
    dev = collective_device()
    if dist.get_rank() == src:
        t = torch.from_numpy(np.ascontiguousarray(x).view(np.uint8).reshape(-1)).to(dev)
    else:
        t = torch.empty(int(np.prod(shape)) * np.dtype(dtype).itemsize, dtype=torch.uint8, device=dev)
    dist.broadcast(t, src=src)
    return t.cpu().numpy().view(np.dtype(dtype)).reshape(shape)

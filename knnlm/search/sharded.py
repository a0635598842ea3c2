"""Exact search over a store split across the ranks of a process group (`torchrun`): a store larger than one GPU.

Shapes: n queries, N stored keys, k neighbours.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist

from ..distributed import collective_device, rank_and_world
from .base import merge_nearest


def shard_rows(n: int, rank: int, world: int) -> tuple[int, int]:
    """Rows [lo, hi) of an n-row store that rank `rank` of `world` holds: contiguous, sizes differing by at most 1."""
    return rank * n // world, (rank + 1) * n // world


class ShardedSearch:
    """An exact search over a store split across the ranks of a process group (`torchrun`).

    Rank r holds rows `shard_rows(N, r, world)` of the store and its own searcher over them (`make_local(rows)`,
    any exact backend: `bf16-exact` on its GPU, a CPU kernel, FAISS Flat). Every rank searches the same queries in
    its shard; the (distance, global id) answers of all ranks are gathered and the k nearest of them kept. Since
    every key lies in exactly one shard, that is the exact k nearest over the whole store, and only the answers
    (n × k per rank), never keys, cross between processes. Every rank must call `search` with the same queries.
    """

    auto_reason: str | None = None  # set by `auto` (search/auto.py)

    def __init__(self, keys: np.ndarray, make_local, rank: int | None = None, world: int | None = None):
        r, w = rank_and_world()
        self.rank, self.world = (r if rank is None else rank), (w if world is None else world)
        self.lo, self.hi = shard_rows(len(keys), self.rank, self.world)
        self.local = make_local(keys[self.lo : self.hi]) if self.hi > self.lo else None
        self.auto_reason = self.local.auto_reason if self.local is not None else None  # each rank's own choice

    def describe(self) -> str:
        local = self.local.describe() if self.local is not None else "no rows"
        return f"sharded over {self.world} ranks, each: {local}"

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        n, m = len(queries), min(k, self.hi - self.lo)
        d = np.full((n, k), np.inf, dtype=np.float32)  # a shard with fewer than k keys pads with (inf, -1)
        i = np.full((n, k), -1, dtype=np.int64)
        if m > 0:
            dl, il = self.local.search(queries, m)
            d[:, :m], i[:, :m] = dl, il + self.lo
        dev = collective_device()
        # every rank's (n, k) answer, side by side: (n, world·k), of which the k nearest are kept
        parts_d = [torch.empty((n, k), dtype=torch.float32, device=dev) for _ in range(self.world)]
        parts_i = [torch.empty((n, k), dtype=torch.int64, device=dev) for _ in range(self.world)]
        dist.all_gather(parts_d, torch.from_numpy(d).to(dev))
        dist.all_gather(parts_i, torch.from_numpy(i).to(dev))
        return merge_nearest(torch.cat(parts_d, 1).cpu().numpy(), torch.cat(parts_i, 1).cpu().numpy(), k)


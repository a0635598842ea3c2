"""What every search backend shares: the `Searcher` interface, and the pieces several backends and callers use
(exact distances of candidates, batch sizing, merging answers, searching a whole split, counting queries).

Shapes: n queries, N stored keys, d dimensions, k neighbours, C candidates per query.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np
import torch
from tqdm import tqdm


@runtime_checkable
class Searcher(Protocol):
    """A k-nearest-neighbour search over a datastore's keys (N, d) float16, by squared L2 distance."""

    auto_reason: str | None  # why `auto` chose this search (its probe's rates), None when it was named; meta.json keeps it

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """queries (n, d) fp32 -> distances (n, k) fp32 and row ids (n, k) int64, nearest first."""
        ...

    def describe(self) -> str:
        """Which search this is, in words, for the evaluation's record (summary.json's `search`)."""
        ...


def exact_sq_distances(queries: torch.Tensor, keys: np.ndarray | torch.Tensor, ids: torch.Tensor,
                       chunk_bytes: int = 2**28) -> torch.Tensor:
    """Exact fp32 squared L2 distances between each query (n, d) and its candidate rows ids (n, C) of keys.

    `keys` is the store itself (a memory-mapped array, read on the CPU) or a copy of it on the queries' device (a
    tensor of the same values); queries are taken in chunks so the gathered candidates stay near `chunk_bytes`."""
    n, C = ids.shape
    d = keys.shape[1]
    out = torch.empty((n, C), dtype=torch.float32, device=queries.device)
    rows = max(1, chunk_bytes // max(1, C * d * 4))
    for lo in range(0, n, rows):
        idx = ids[lo : lo + rows]  # (r, C)
        if isinstance(keys, torch.Tensor):
            cand = keys[idx.reshape(-1)].float().view(*idx.shape, d)  # (r, C, d)
        else:
            cand = torch.from_numpy(np.asarray(keys[idx.reshape(-1).cpu().numpy()], dtype=np.float32)).view(*idx.shape, d)
            cand = cand.to(queries.device)
        out[lo : lo + rows] = (cand - queries[lo : lo + rows, None, :]).pow(2).sum(-1)  # (r, C)
    return out


def query_rows(device: torch.device, block: int, share: float = 0.25, bytes_per_pair: int = 16,
               free: int | None = None) -> int:
    """How many queries a PyTorch search takes at a time: on a GPU, sized so that its (rows × block) temporaries
    (fp32 scores and what selection makes of them, `bytes_per_pair` in all) use at most `share` of the memory free
    now (several searches may share the GPU), between 64 and 16,384, a multiple of 64; 1,024 on a CPU."""
    if device.type != "cuda" and free is None:
        return 1024
    if free is None:
        free = torch.cuda.mem_get_info(device)[0]
    return int(min(16384, max(64, share * free // (block * bytes_per_pair) // 64 * 64)))


def merge_nearest(distances: np.ndarray, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k nearest of several answers laid side by side ((n, m) each, m >= k), ordered by distance, then row id."""
    order = np.lexsort((ids, distances))[:, :k]  # along each row: distance first, the id breaking ties
    return np.take_along_axis(distances, order, 1), np.take_along_axis(ids, order, 1)


def search_all(searcher: Searcher, queries: np.ndarray, k: int, batch: int = 4096, progress: bool = True,
               keep: int | None = None, each=None) -> tuple[np.ndarray, np.ndarray]:
    """k nearest rows for every query (n, d), in batches with a progress bar: distances (n, keep) fp32, ids
    (n, keep) int64, the `keep` nearest of the k (default all k). `each(lo, D, I)`, if given, sees every batch's
    whole (b, k) answer first (e.g. to reduce it to what is kept of the rest)."""
    n, keep = len(queries), k if keep is None else keep
    D = np.empty((n, keep), dtype=np.float32)
    I = np.empty((n, keep), dtype=np.int64)
    bar = tqdm(total=n, desc="search", unit="q", unit_scale=True, disable=not progress, dynamic_ncols=True)
    for lo in range(0, n, batch):
        d, i = searcher.search(queries[lo : lo + batch], k)
        if each is not None:
            each(lo, d, i)
        D[lo : lo + batch], I[lo : lo + batch] = d[:, :keep], i[:, :keep]
        bar.update(min(batch, n - lo))
    bar.close()
    return D, I


class CountingSearch:
    """A searcher that counts the queries sent to it (the evaluation records the count: one per token)."""

    def __init__(self, searcher: Searcher):
        self.searcher, self.queries = searcher, 0
        self.auto_reason = searcher.auto_reason

    def describe(self) -> str:
        return self.searcher.describe()

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        self.queries += len(queries)
        return self.searcher.search(queries, k)

"""One rank of a sharded exact search, launched by tests/test_knn.py under `torchrun --nproc_per_node=N`:

    python -m torch.distributed.run --standalone --nproc_per_node=2 tests/workers/sharded_search.py OUT BACKENDS KS

Every rank builds the same random LM-like store and queries, searches its shard through `ShardedSearch` with each
backend (comma-separated) and k (comma-separated), and saves the merged answers to OUT/rank<r>.npz (arrays
`<backend>_<k>_d` and `_i`) for the test to compare with a float64 brute force and with one process."""

import sys
from pathlib import Path

import numpy as np
import torch.distributed as dist

from knnlm.distributed import setup_distributed
from knnlm.search.key_geometry import lm_like_keys
from knnlm.search.registry import make_searcher
from knnlm.search.sharded import ShardedSearch


def main() -> None:
    out, backends, ks = Path(sys.argv[1]), sys.argv[2].split(","), [int(k) for k in sys.argv[3].split(",")]
    rank, world, _ = setup_distributed()
    store = lm_like_keys(3071, d=48, seed=0)
    keys = store[:3001]  # an odd size: shards of unequal length, off the kernels' tiles
    queries = store[3001:].astype(np.float32) + np.random.default_rng(1).normal(0, 0.05, (70, 48)).astype(np.float32)
    answers = {}
    for backend in backends:
        search = ShardedSearch(keys, lambda rows: make_searcher(rows, backend))
        for k in ks:
            answers[f"{backend}_{k}_d"], answers[f"{backend}_{k}_i"] = search.search(queries, k)
    np.savez(out / f"rank{rank}.npz", lo=search.lo, hi=search.hi, **answers)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

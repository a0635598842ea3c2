"""Per-key costs of the approximate index on this machine, to extrapolate to WikiText-103 (docs/wikitext-103.md).

    python benchmarks/index_costs.py [--n 200000] [--d 1024]

Builds `IVF{nlist},PQ64` over n synthetic clustered fp16 keys (memory-mapped, filled in chunks), and measures:
training time, add time per key, search time per query at nprobe=32 for k=1024, exact re-ranking time per query,
and recall@64 against exact search. Writes results/benchmarks/<machine>/index_costs.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from common import default_out
from knnlm.artifacts import write_json
from knnlm.search.faiss_index import FaissSearch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=200000)
    p.add_argument("--d", type=int, default=1024)
    p.add_argument("--nlist", type=int, default=1024)
    p.add_argument("--queries", type=int, default=500)
    p.add_argument("--out", default=default_out(), help="default: this machine's folder under results/benchmarks/")
    a = p.parse_args()

    rng = np.random.default_rng(0)
    centres = rng.standard_normal((2000, a.d)).astype(np.float32) * 2
    with tempfile.TemporaryDirectory() as tmp:
        keys = np.lib.format.open_memmap(Path(tmp) / "keys.npy", mode="w+", dtype=np.float16, shape=(a.n, a.d))
        for lo in range(0, a.n, 50000):
            m = min(50000, a.n - lo)
            keys[lo : lo + m] = centres[rng.integers(0, 2000, m)] + rng.standard_normal((m, a.d)).astype(np.float32)
        keys.flush()
        keys = np.load(Path(tmp) / "keys.npy", mmap_mode="r")
        queries = centres[rng.integers(0, 2000, a.queries)] + rng.standard_normal((a.queries, a.d)).astype(np.float32)

        factory = f"IVF{a.nlist},PQ64"
        import faiss

        t0 = time.time()
        index = faiss.index_factory(a.d, factory)
        sample = np.asarray(keys[np.sort(rng.choice(a.n, min(a.n, 64 * a.nlist), replace=False))], dtype=np.float32)
        index.train(sample)
        t_train = time.time() - t0
        t0 = time.time()
        for lo in range(0, a.n, 65536):
            index.add(np.asarray(keys[lo : lo + 65536], dtype=np.float32))
        t_add = time.time() - t0
        index.nprobe = 32
        t0 = time.time()
        index.search(queries, 1024)
        t_search = time.time() - t0
        approx = FaissSearch(keys, factory, nprobe=32, index=index, rerank_factor=1)
        t0 = time.time()
        _, ids = approx.search(queries, 1024)
        t_search_rerank = time.time() - t0
        exact = FaissSearch(keys, "Flat")
        t0 = time.time()
        _, eids = exact.search(queries, 64)
        t_flat = time.time() - t0
    recall = float(np.mean([len(set(x[:64]) & set(y)) / 64 for x, y in zip(ids, eids)]))
    res = {
        "n": a.n, "d": a.d, "factory": factory, "threads": faiss.omp_get_max_threads(), "train_points": len(sample),
        "train_seconds": t_train, "add_us_per_key": 1e6 * t_add / a.n,
        "search_ms_per_query_k1024": 1e3 * t_search / a.queries,
        "rerank_ms_per_query_k1024": 1e3 * (t_search_rerank - t_search) / a.queries,
        "flat_ms_per_query": 1e3 * t_flat / a.queries,
        "flat_ns_per_key_per_query": 1e9 * t_flat / a.queries / a.n,
        "recall_at_64_after_rerank": recall,
        "index_bytes_per_key": 64 + 8,
    }
    Path(a.out).mkdir(parents=True, exist_ok=True)
    write_json(Path(a.out) / "index_costs.json", res)
    md = ["| quantity | value |", "|---|---|"] + [f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |"
                                                  for k, v in res.items()]
    (Path(a.out) / "index_costs.md").write_text("\n".join(md) + "\n")
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()

"""A short check of the GPU code paths against references, and the exact search's rate on a WikiText-2-sized store.

    python benchmarks/gpu_check.py [--out results/benchmarks/<gpu>/gpu_check.json] [--n 2088628] [--queries 20000]

1. `TorchExactSearch` on the device (store resident there) against a float64 brute force: ids and distances;
2. `knn_logprob_grid` on the device against the same on the CPU;
3. queries/s of the exact search at k = 1024 over `--n` random LM-like keys (d = 256), and of FAISS Flat on the CPU
   when faiss is installed. Runs on a CPU too (smaller `--n`), which is how the test suite's machines check it.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from common import default_out
from knnlm.artifacts import write_json
from knnlm.knn import knn_logprob_grid
from knnlm.search.torch_search import TorchExactSearch
from knnlm.artifacts import cpu_name


def lm_like(rng, n, d):
    scale = rng.uniform(0.2, 3.0, d)  # uneven dimensions, a common offset: like a LayerNorm output
    return (2 + rng.standard_normal((n, d)) * scale).astype(np.float16)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=None, help="default: results/benchmarks/<this GPU>/gpu_check.json")
    p.add_argument("--n", type=int, default=2088628)
    p.add_argument("--queries", type=int, default=20000)
    a = p.parse_args()
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    rng = np.random.default_rng(0)
    report = {"device": torch.cuda.get_device_name() if dev == "cuda" else cpu_name(), "torch": torch.__version__}

    keys = lm_like(rng, 20011, 64)
    q = lm_like(rng, 300, 64).astype(np.float32)
    d, i = TorchExactSearch(keys, device=dev, block=4096).search(q, 257)
    d64 = ((q[:, None, :].astype(np.float64) - keys[None].astype(np.float64)) ** 2).sum(-1)
    bi = np.argsort(d64, axis=1, kind="stable")[:, :257]
    report["exact_search_ids_equal"] = float(np.mean([set(x) == set(y) for x, y in zip(i, bi)]))
    report["exact_search_max_rel_err"] = float(np.max(np.abs(d - np.take_along_axis(d64, bi, 1)) / np.take_along_axis(d64, bi, 1)))

    dists = np.sort(rng.uniform(0, 50, (500, 64)), axis=1).astype(np.float32)
    vals = rng.integers(0, 5, (500, 64)).astype(np.int32)
    tg = rng.integers(0, 5, 500).astype(np.int32)
    g_dev = knn_logprob_grid(dists, vals, tg, [8, 64], [0.5, 1.0, 10.0], device=dev)
    g_cpu = knn_logprob_grid(dists, vals, tg, [8, 64], [0.5, 1.0, 10.0])
    report["grid_max_abs_diff"] = float(max(np.nanmax(np.abs(np.where(np.isinf(g_dev[k]), 0, g_dev[k] - g_cpu[k]))) for k in g_cpu))

    store = lm_like(rng, a.n, 256)
    queries = lm_like(rng, a.queries, 256).astype(np.float32)
    t0 = time.time()
    s = TorchExactSearch(store, device=dev)
    report["index_seconds"] = time.time() - t0
    s.search(queries[:1024], 1024)  # warm-up
    if dev == "cuda":
        torch.cuda.synchronize()
    t0 = time.time()
    for lo in range(0, len(queries), 4096):
        s.search(queries[lo : lo + 4096], 1024)
    report["bf16_exact_queries_per_s_k1024"] = len(queries) / (time.time() - t0)
    report["store"] = {"n": a.n, "d": 256, "queries": a.queries}
    try:
        import faiss

        index = faiss.IndexFlatL2(256)
        index.add(store.astype(np.float32))
        t0 = time.time()
        index.search(queries[:2000], 1024)
        report["faiss_flat_cpu_queries_per_s_k1024"] = 2000 / (time.time() - t0)
    except ImportError:
        report["faiss_flat_cpu_queries_per_s_k1024"] = None
    print(json.dumps(report, indent=2))
    write_json(a.out or Path(default_out()) / "gpu_check.json", report)


if __name__ == "__main__":
    main()

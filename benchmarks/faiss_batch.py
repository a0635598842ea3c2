"""FAISS Flat's speed against the number of queries searched at once: what a fair comparison with it must use.

    python benchmarks/faiss_batch.py [--n 200000] [--run runs/wt2]

FAISS `IndexFlatL2` computes distances with BLAS (one matrix product per block of keys) only for batches it deems
large enough, and with a per-query loop below; in FAISS 1.15 the switch is at `distance_compute_blas_threshold`
(128,000) query floats, i.e. 500 queries at d = 256. A probe or a benchmark that searches a few hundred queries at a
time therefore times FAISS on its slow path, where the evaluation (batches of `eval.batch_size`, 4,096) runs the
fast one. For each store (isotropic Gaussian keys at d = 256 and 1024; with `--run`, the run's datastore and its
valid queries) and k, this times one search of each batch size (best of `--repeats`), with FAISS's own choice of
path and with BLAS forced (threshold 0), and the kernel `auto` would pick by default beside them for scale.
Writes OUT/faiss_batch.{json,md} (default: this machine's folder under results/benchmarks/).
"""

from __future__ import annotations

import argparse
import faiss
import numpy as np
import torch

from common import default_out, write_results
from knnlm.search.auto import probe_rate
from knnlm.search.cpu_kernels import CpuExactSearch, first_kernel
from search import flat_index

BATCHES = (32, 128, 256, 496, 512, 1024, 2048, 4096)


def rate(searcher, queries: np.ndarray, k: int, repeats: int) -> float:
    """Queries per second of one search of `queries`, best of `repeats` (`auto`'s probe timing, warm-up included)."""
    return max(probe_rate(searcher, queries, k) for _ in range(repeats))


def stores(a) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(0)
    out = {}
    for d in (256, 1024):
        both = rng.standard_normal((a.n + max(BATCHES), d)).astype(np.float16)
        out[f"isotropic Gaussian, {a.n:,} keys, d = {d}"] = (both[: a.n], both[a.n :].astype(np.float32))
    if a.run:
        keys = np.load(f"{a.run}/datastore/keys.npy", mmap_mode="r")
        q = np.load(f"{a.run}/eval/valid/query_keys.npy", mmap_mode="r")
        out[f"datastore of {a.run} ({len(keys):,} keys, d = {keys.shape[1]})"] = (
            keys, np.asarray(q[np.sort(rng.choice(len(q), max(BATCHES), replace=False))], dtype=np.float32))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=200_000, help="keys per synthetic store")
    p.add_argument("--run", help="a run folder whose datastore (and valid queries) to add")
    p.add_argument("--k", type=int, nargs="+", default=[64, 1024])
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--out", default=default_out(), help="default: this machine's folder under results/benchmarks/")
    a = p.parse_args()
    faiss.omp_set_num_threads(torch.get_num_threads())
    threshold = faiss.cvar.distance_compute_blas_threshold
    kernel = first_kernel()
    rows = []
    for name, (keys, queries) in stores(a).items():
        flat = flat_index(keys)
        ours = CpuExactSearch(keys, kernel) if kernel is not None else None
        for k in a.k:
            for b in BATCHES:
                q = queries[:b]
                row = {"store": name, "d": keys.shape[1], "k": k, "batch": b, "flat_qps": rate(flat, q, k, a.repeats)}
                try:
                    faiss.cvar.distance_compute_blas_threshold = 0
                    row["flat_blas_qps"] = rate(flat, q, k, a.repeats)
                finally:
                    faiss.cvar.distance_compute_blas_threshold = threshold
                if ours is not None:
                    row["kernel"], row["kernel_qps"] = ours.describe(), rate(ours, q, k, a.repeats)
                rows.append(row)
                print(f"{name} k={k} batch={b}: Flat {row['flat_qps']:.0f} q/s, BLAS forced {row['flat_blas_qps']:.0f}"
                      + (f", {row['kernel']} {row['kernel_qps']:.0f}" if ours is not None else ""), flush=True)
    md = [f"FAISS {faiss.__version__}, `distance_compute_blas_threshold` = {threshold:,}; {torch.get_num_threads()} "
          f"threads; queries/s of one search of each batch, best of {a.repeats}.", "",
          "| store | k | batch (queries) | batch × d | FAISS Flat q/s | Flat, BLAS forced | kernel q/s |",
          "|---|---|---|---|---|---|---|"]
    md += [f"| {r['store']} | {r['k']} | {r['batch']} | {r['batch'] * r['d']:,} | {r['flat_qps']:.0f} | "
           f"{r['flat_blas_qps']:.0f} | {r.get('kernel_qps', float('nan')):.0f} |" for r in rows]
    kernels = sorted({r["kernel"] for r in rows if "kernel" in r})
    md += ["", f"Kernel: {', '.join(kernels) or 'none on this machine'} (`CpuExactSearch` with its defaults)."]
    write_results(a.out, "faiss_batch", {"faiss": faiss.__version__, "blas_threshold": threshold, "rows": rows}, md)
    print("\n".join(md))


if __name__ == "__main__":
    main()

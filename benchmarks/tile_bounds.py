"""Can the pruned search skip whole tiles of work, or whole clusters of keys? Two cheaper first bounds, measured on
a run's datastore and its valid queries.

    python benchmarks/tile_bounds.py --run runs/wt2 [--queries 1024] [--k 1024] [--clusters 8192]

The pruned search (`knnlm/search/cpu_kernels.py`) scans tiles of Q queries x 16 keys (AVX2: Q = 4) over 64
projected directions. `benchmarks/bound_survivors.py` counts the keys a bound of m1 < 64 directions would leave,
key by key; a kernel can only skip the rest of a tile's directions when no pair of the tile survives. This measures,
with each query's final k-th exact distance as the threshold (the most any pass can skip):
1. tiles: the share of (query, key) pairs, of groups of 16 keys (Q = 1) and of tiles of 4 queries x 16 keys whose
   distance over the first m1 = 8, 16, 32 principal directions is below the threshold, with the keys in storage
   order or sorted by a k-means of their first 16 projected directions, and the queries in text order or sorted the
   same way;
2. clusters: the share of keys in k-means clusters (of the 64 projected directions) that the triangle-inequality
   bound (||q − c|| − R)² (R: the cluster's largest radius) cannot rule out.
All in float32 arithmetic from the keys' projections (no bf16 rounding): the bounds' power, not a kernel's speed.
The queries are `--queries` consecutive valid tokens (from token 10,000) for 1, and every 50th for 2. Writes
OUT/tile_bounds.{json,md} (default: this machine's folder under results/benchmarks/).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import faiss
import numpy as np
import torch

from common import default_out, write_results
from knnlm.search.key_geometry import centering_vector, principal_directions


def project(keys: np.ndarray, mean: torch.Tensor, basis: torch.Tensor, block: int = 262144) -> torch.Tensor:
    out = torch.empty((len(keys), basis.shape[1]))
    for lo in range(0, len(keys), block):
        out[lo : lo + block] = (torch.from_numpy(np.array(keys[lo : lo + block], dtype=np.float32)) - mean) @ basis
    return out


def kmeans_labels(x: np.ndarray, clusters: int, sample: int) -> tuple[np.ndarray, faiss.Kmeans]:
    km = faiss.Kmeans(x.shape[1], clusters, niter=8, seed=0, max_points_per_centroid=sample // clusters)
    km.train(np.ascontiguousarray(x[np.random.default_rng(0).choice(len(x), min(len(x), sample), replace=False)]))
    _, a = km.index.search(np.ascontiguousarray(x), 1)
    return a[:, 0], km


def tiles(P: torch.Tensor, Q: torch.Tensor, thr: torch.Tensor, clusters: int, dims=(8, 16, 32),
          chunk: int = 65536) -> list[dict]:
    N = len(P) - len(P) % 16
    labels, km = kmeans_labels(P[:, :16].numpy(), clusters, 32 * clusters)
    key_orders = {"storage": None, f"k-means of 16 directions ({clusters} clusters)": np.argsort(labels, kind="stable")}
    _, qa = km.index.search(np.ascontiguousarray(Q[:, :16].numpy()), 1)
    query_orders = {"text": None, "k-means": np.argsort(qa[:, 0], kind="stable")}
    rows, M = [], len(Q) - len(Q) % 4
    for kname, korder in key_orders.items():
        for qname, qorder in query_orders.items():
            Qo = Q[:M] if qorder is None else Q[qorder[qorder < M]]
            To = thr[:M] if qorder is None else thr[qorder[qorder < M]]
            count = {m: [0, 0, 0] for m in dims}
            for lo in range(0, N, chunk):
                idx = np.arange(lo, min(lo + chunk, N))
                Pk = P[torch.from_numpy(idx if korder is None else korder[idx])]
                acc, prev = torch.zeros((M, len(Pk))), 0
                for m in dims:
                    a, b = Qo[:, prev:m], Pk[:, prev:m]
                    acc += a.pow(2).sum(1, keepdim=True) + b.pow(2).sum(1)[None] - 2 * a @ b.T
                    prev = m
                    alive = acc < To[:, None]
                    group = alive.view(M, -1, 16).any(2)
                    tile = group.view(M // 4, 4, -1).any(1)
                    count[m][0] += int(alive.sum())
                    count[m][1] += int(group.sum())
                    count[m][2] += int(tile.sum())
            G = N // 16
            for m in dims:
                rows.append({"keys": kname, "queries": qname, "m1": m, "pairs": count[m][0] / (M * G * 16),
                             "groups_q1": count[m][1] / (M * G), "tiles_q4": count[m][2] / (M // 4 * G)})
                print(rows[-1], flush=True)
    return rows


def cluster_bounds(P: torch.Tensor, Q: torch.Tensor, thr: dict[int, np.ndarray], clusters: list[int]) -> list[dict]:
    rows, x = [], P.numpy()
    for C in clusters:
        labels, km = kmeans_labels(x, C, 32 * C)
        r = np.sqrt(np.maximum(((x - km.centroids[labels]) ** 2).sum(1), 0))
        R = np.zeros(C)
        np.maximum.at(R, labels, r)
        size = np.bincount(labels, minlength=C)
        dq = np.sqrt(((Q.numpy()[:, None, :] - km.centroids[None]) ** 2).sum(-1))  # (q, C)
        lower = np.maximum(dq - R[None], 0) ** 2
        for k, t in thr.items():
            alive = lower < t[:, None]
            rows.append({"clusters": C, "k": k, "clusters_alive": float(alive.mean()),
                         "keys_alive": float((alive * size[None]).sum(1).mean() / len(x)),
                         "median_radius": float(np.median(R)), "mean_sqrt_threshold": float(np.sqrt(t).mean())})
            print(rows[-1], flush=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run", type=Path, required=True, help="a run with a datastore and an evaluated valid split")
    p.add_argument("--queries", type=int, default=1024)
    p.add_argument("--k", type=int, default=1024)
    p.add_argument("--clusters", type=int, nargs="*", default=[1024, 8192])
    p.add_argument("--out", default=default_out(), help="default: this machine's folder under results/benchmarks/")
    a = p.parse_args()
    torch.set_num_threads(1)
    keys = np.load(a.run / "datastore" / "keys.npy", mmap_mode="r")
    valid = a.run / "eval" / "valid"
    qk, dist = np.load(valid / "query_keys.npy", mmap_mode="r"), np.load(valid / "distances.npy", mmap_mode="r")
    if dist.shape[1] < a.k:
        raise SystemExit(f"{valid}: {dist.shape[1]} neighbours stored, fewer than --k {a.k}")
    t0 = time.time()
    mean = centering_vector(keys)
    basis = principal_directions(keys, mean, 64)
    P = project(keys, mean, basis)
    lo = min(10000, len(qk) - a.queries)
    Q = project(qk[lo : lo + a.queries], mean, basis)
    thr = torch.from_numpy(np.array(dist[lo : lo + a.queries, a.k - 1], dtype=np.float32))
    tile_rows = tiles(P, Q, thr, max(a.clusters))
    sel = np.arange(0, len(qk), 50)[:1000]
    Qs = project(qk[sel], mean, basis)
    ks = sorted({64, a.k})
    cluster_rows = cluster_bounds(P, Qs, {k: np.array(dist[sel, k - 1], dtype=np.float64) for k in ks}, a.clusters)
    md = [f"Datastore of `{a.run}` ({len(keys):,} keys, d = {keys.shape[1]}), keys and queries projected onto 64 "
          f"principal directions; threshold: each query's final {a.k}-th exact distance. {time.time() - t0:.0f} s.", "",
          "### 1. Survivors of a bound of the first m1 directions: pairs, groups of 16 keys, tiles of 4 queries x 16 keys",
          "", "| keys | queries | m1 | pairs | groups (Q = 1) | tiles (Q = 4) |", "|---|---|---|---|---|---|"]
    md += [f"| {r['keys']} | {r['queries']} | {r['m1']} | {100 * r['pairs']:.1f} % | {100 * r['groups_q1']:.1f} % | "
           f"{100 * r['tiles_q4']:.1f} % |" for r in tile_rows]
    md += ["", "### 2. Keys a cluster's triangle bound (||q − c|| − R)² cannot rule out (every 50th valid query, "
               "first 1,000)", "", "| clusters | k | clusters alive | keys alive | median R | mean √threshold |",
           "|---|---|---|---|---|---|"]
    md += [f"| {r['clusters']} | {r['k']} | {100 * r['clusters_alive']:.1f} % | {100 * r['keys_alive']:.1f} % | "
           f"{r['median_radius']:.2f} | {r['mean_sqrt_threshold']:.2f} |" for r in cluster_rows]
    write_results(a.out, "tile_bounds", {"run": str(a.run), "k": a.k, "tiles": tile_rows, "clusters": cluster_rows}, md)


if __name__ == "__main__":
    main()

"""Exact k-NN search: knnlm's AMX search against FAISS IndexFlatL2 on the same keys, queries and threads.

    python benchmarks/search.py --run runs/wt2 [--queries 2048] [--scale 5]

Stores: the run's datastore (WikiText-2: 2.09M x 256 float16 keys), and a synthetic store `scale` times larger made
from it: every key repeated with Gaussian noise of 0.25 x the per-dimension spread, so the density of neighbours is
realistic. Queries: the run's valid-split query keys. For k = 64 and 1024: queries/s of both, their ratio, and
recall@k against FAISS and against a float64 brute force (the truth: FAISS's own fp32 rounding can swap near-ties).
Also an approximate FAISS index (IVF-PQ, re-ranked exactly) on the real store, with its recall against the truth.
Writes results/benchmarks/search.{json,md,png}.
"""

from __future__ import annotations

import argparse
import gc
import json
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np
import torch

from common import write_results
from knnlm.artifacts import atomic_path
from knnlm.fastsearch import AmxExactSearch
from knnlm.knn import FaissSearch


def truth(keys: np.ndarray, queries: np.ndarray, k: int, block: int = 262144) -> np.ndarray:
    """Ids of the k nearest keys in float64 arithmetic, block by block."""
    q = torch.from_numpy(queries.astype(np.float64))
    best_d = torch.full((len(q), 0), float("inf"), dtype=torch.float64)
    best_i = torch.zeros((len(q), 0), dtype=torch.long)
    for lo in range(0, len(keys), block):
        kb = torch.from_numpy(np.asarray(keys[lo : lo + block], dtype=np.float64))
        d = (q * q).sum(1, keepdim=True) + (kb * kb).sum(1)[None] - 2 * q @ kb.t()
        best_d, sel = torch.cat([best_d, d], 1).topk(min(k, best_d.shape[1] + d.shape[1]), 1, largest=False)
        best_i = torch.cat([best_i, torch.arange(lo, lo + len(kb)).expand(len(q), -1)], 1).gather(1, sel)
    return best_i.numpy()


def recall(found: np.ndarray, ref: np.ndarray) -> float:
    return float(np.mean([len(np.intersect1d(a, b)) / len(b) for a, b in zip(found, ref)]))


def timed(search, queries: np.ndarray, k: int) -> tuple[float, np.ndarray]:
    search(queries[:64], k)  # warm-up: first-touch page faults and thread start-up are not the steady state
    t = time.perf_counter()
    _, ids = search(queries, k)
    return len(queries) / (time.perf_counter() - t), ids


def bench_store(name: str, keys: np.ndarray, queries: np.ndarray, ks: list[int], n_truth: int, approx: str | None) -> dict:
    print(f"{name}: {keys.shape[0]:,} keys x {keys.shape[1]}", flush=True)
    full = truth(keys, queries[:n_truth], max(ks))  # nearest first, so each k is a prefix
    ref = {k: full[:, :k] for k in ks}
    rows = {k: {"k": k} for k in ks}
    t = time.perf_counter()
    flat = faiss.IndexFlatL2(keys.shape[1])
    for lo in range(0, len(keys), 262144):
        flat.add(np.asarray(keys[lo : lo + 262144], dtype=np.float32))
    build_faiss = time.perf_counter() - t
    for k in ks:
        qps, ids = timed(flat.search, queries, k)
        rows[k].update(faiss_qps=qps, faiss_recall_vs_float64=recall(ids[:n_truth], ref[k]))
        rows[k]["_faiss_ids"] = ids
        print(f"  FAISS Flat k={k}: {qps:.0f} q/s", flush=True)
    del flat
    gc.collect()
    t = time.perf_counter()
    amx = AmxExactSearch(keys)
    build_amx = time.perf_counter() - t
    for k in ks:
        qps, ids = timed(amx.search, queries, k)
        r = rows[k]
        r.update(knnlm_qps=qps, ratio=qps / r["faiss_qps"], knnlm_recall_vs_float64=recall(ids[:n_truth], ref[k]),
                 knnlm_recall_vs_faiss=recall(ids, r.pop("_faiss_ids")), candidates=amx.candidates(k))
        print(f"  knnlm amx-exact k={k}: {qps:.0f} q/s ({r['ratio']:.2f}x)", flush=True)
    del amx
    gc.collect()
    res = {"name": name, "N": int(keys.shape[0]), "d": int(keys.shape[1]), "queries": len(queries),
           "truth_queries": n_truth, "setup_seconds": {"faiss_flat_add": build_faiss, "knnlm_pack": build_amx},
           "rows": list(rows.values())}
    if approx:
        t = time.perf_counter()
        s = FaissSearch(keys, approx, nprobe=32, rerank_factor=2)
        build = time.perf_counter() - t
        res["approximate"] = []
        for k in ks:
            qps, ids = timed(s.search, queries, k)
            res["approximate"].append({"index": approx, "nprobe": 32, "rerank_factor": 2, "k": k, "qps": qps,
                                       "recall_vs_float64": recall(ids[:n_truth], ref[k]), "build_seconds": build})
            print(f"  FAISS {approx} (re-ranked) k={k}: {qps:.0f} q/s", flush=True)
    return res


def synthetic(keys: np.ndarray, scale: int, folder: Path, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    N, d = keys.shape
    spread = np.asarray(keys[rng.choice(N, min(N, 100000), replace=False)], dtype=np.float32).std(0)
    big = np.lib.format.open_memmap(folder / "keys.npy", mode="w+", dtype=np.float16, shape=(N * scale, d))
    for copy in range(scale):
        for lo in range(0, N, 262144):
            x = np.asarray(keys[lo : lo + 262144], dtype=np.float32)
            noise = 0 if copy == 0 else rng.standard_normal(x.shape, dtype=np.float32) * (0.25 * spread)
            big[copy * N + lo : copy * N + lo + len(x)] = x + noise
    big.flush()
    return np.load(folder / "keys.npy", mmap_mode="r")


def plot(stores: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(stores), figsize=(5 * len(stores), 3.6), squeeze=False)
    for ax, s in zip(axes[0], stores):
        ks = [r["k"] for r in s["rows"]]
        x = np.arange(len(ks))
        ax.bar(x - 0.2, [r["faiss_qps"] for r in s["rows"]], 0.4, label="FAISS IndexFlatL2")
        ax.bar(x + 0.2, [r["knnlm_qps"] for r in s["rows"]], 0.4, label="knnlm amx-exact")
        for xi, r in zip(x, s["rows"]):
            ax.text(xi + 0.2, r["knnlm_qps"], f"{r['ratio']:.1f}x", ha="center", va="bottom")
        ax.set_xticks(x, [f"k = {k}" for k in ks])
        ax.set_ylabel("queries / s")
        ax.set_title(f"{s['name']}: {s['N'] / 1e6:.1f}M keys x {s['d']}")
        ax.set_ylim(0, 1.15 * max(r["knnlm_qps"] for r in s["rows"]))
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=2, fontsize=8, frameon=False)
    fig.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png", dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run", default="runs/wt2", help="a run folder with datastore/ and eval/valid/query_keys.npy")
    p.add_argument("--queries", type=int, default=2048)
    p.add_argument("--truth-queries", type=int, default=64)
    p.add_argument("--scale", type=int, default=5)
    p.add_argument("--approx", default="IVF1024,PQ32")
    p.add_argument("--out", default="results/benchmarks")
    p.add_argument("--plot-only", action="store_true", help="redraw search.png from search.json")
    a = p.parse_args()
    if a.plot_only:
        plot(json.loads((Path(a.out) / "search.json").read_text())["stores"], Path(a.out) / "search.png")
        return
    threads = torch.get_num_threads()
    faiss.omp_set_num_threads(threads)
    keys = np.load(Path(a.run) / "datastore" / "keys.npy", mmap_mode="r")
    q_all = np.load(Path(a.run) / "eval" / "valid" / "query_keys.npy", mmap_mode="r")
    rng = np.random.default_rng(0)
    queries = np.asarray(q_all[np.sort(rng.choice(len(q_all), min(a.queries, len(q_all)), replace=False))], dtype=np.float32)
    ks = [64, 1024]
    stores = [bench_store("WikiText-2 datastore", keys, queries, ks, a.truth_queries, a.approx)]
    if a.scale > 1:
        with tempfile.TemporaryDirectory(dir=Path(a.run)) as tmp:
            big = synthetic(keys, a.scale, Path(tmp))
            stores.append(bench_store(f"synthetic {a.scale}x", big, queries, ks, a.truth_queries // 4, None))
            del big
    md = ["| store | k | FAISS Flat q/s | knnlm q/s | ratio | knnlm recall (vs float64 / vs FAISS) | FAISS recall vs float64 |",
          "|---|---|---|---|---|---|---|"]
    for s in stores:
        for r in s["rows"]:
            md.append(f"| {s['name']} ({s['N']:,} keys) | {r['k']} | {r['faiss_qps']:.0f} | {r['knnlm_qps']:.0f} | "
                      f"**{r['ratio']:.2f}x** | {r['knnlm_recall_vs_float64']:.4f} / {r['knnlm_recall_vs_faiss']:.5f} | "
                      f"{r['faiss_recall_vs_float64']:.4f} |")
    for s in stores:
        for r in s.get("approximate", []):
            md.append(f"\nApproximate, {s['name']}: FAISS `{r['index']}` nprobe {r['nprobe']}, {r['rerank_factor']}k "
                      f"candidates re-ranked exactly, k = {r['k']}: {r['qps']:.0f} q/s, recall vs float64 "
                      f"{r['recall_vs_float64']:.4f} (index built in {r['build_seconds']:.0f} s)")
    write_results(a.out, "search", {"threads": threads, "stores": stores}, md)
    plot(stores, Path(a.out) / "search.png")
    print("\n".join(md))


if __name__ == "__main__":
    main()

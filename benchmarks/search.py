"""Exact k-NN search: every exact backend this machine runs against FAISS IndexFlatL2, same keys, queries and threads.

    python benchmarks/search.py                        # a synthetic LM-like store (size picked for the CPU)
    python benchmarks/search.py --synthetic 2000000    # a given size
    python benchmarks/search.py --run runs/wt2 [--queries 2048] [--scale 5]   # a run's datastore, and 5x larger

Backends: FAISS `Flat` (the reference), knnlm's compiled CPU kernels that this CPU can run (`amx-exact`,
`avx512-exact`, `avx2-exact`, `knnlm/search/cpu_kernels.py`; each in both its searches: its default, and the other one as
"(margin)" or "(pruned)") and the PyTorch bf16 path (`bf16-exact`, `TorchExactSearch`, on
the CPU here unless a GPU is present). For k = 64 and 1024: queries/s of each, its ratio to FAISS, and recall@k
against a float64 brute force on a sample of queries (the truth: FAISS's own fp32 rounding can swap near-ties) and
against FAISS on all queries. Backends are timed in turns, `--repeats` rounds, best round kept, so a machine's
other load falls on all of them alike.

Stores: by default a synthetic LM-like store (`knnlm.search.key_geometry.lm_like_keys`: large common offset, a few strong directions
of unequal scale, weak noise; held-out samples of the same distribution as queries), 2M keys where the CPU has AMX
and 256k otherwise, so the run takes a few minutes. With `--run`: the run's datastore (WikiText-2: 2.09M x 256
float16 keys) with its valid-split query keys, and a synthetic store `scale` times larger made from it (every key
repeated with Gaussian noise of 0.25 x the per-dimension spread), plus an approximate FAISS index (IVF-PQ, re-ranked
exactly) on the real store. The record names the CPU, its flags, the thread count and torch's fp32 and bf16
matrix-product rates (FAISS Flat runs at its BLAS's fp32 rate: a weak BLAS shows as a large ratio).
Writes OUT/search.{json,md,png} (default results/benchmarks).
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

from common import default_out, bf16_matmul_tflops, brute_force, machine, write_results
from knnlm.artifacts import atomic_path
from knnlm.search.cpu_kernels import KERNELS, CpuExactSearch, available, available_memory, cpu_flags, cpu_has_amx
from knnlm.search.faiss_index import FaissSearch
from knnlm.search.key_geometry import lm_like_keys
from knnlm.search.registry import BACKENDS


def truth(keys: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """Ids of the k nearest keys in float64 arithmetic (`common.brute_force`)."""
    return brute_force(keys, queries, k)[1]


def recall(found: np.ndarray, ref: np.ndarray) -> float:
    return float(np.mean([len(np.intersect1d(a, b)) / len(b) for a, b in zip(found, ref)]))


def flat_index(keys: np.ndarray):
    flat = faiss.IndexFlatL2(keys.shape[1])
    for lo in range(0, len(keys), 262144):
        flat.add(np.asarray(keys[lo : lo + 262144], dtype=np.float32))
    return flat


def backends() -> dict:
    """name -> builder (keys -> an object with .search(queries, k)) for every exact backend of knnlm's registry
    (`knnlm.search.registry.BACKENDS`) this machine runs, each compiled kernel in both its searches; FAISS Flat
    first, as a bare FAISS index: it is the reference of every ratio."""
    out = {"Flat": flat_index}
    kernels = {k.index: k for k in KERNELS.values()}
    for b in BACKENDS.values():
        if not b.exact or b.name == "Flat" or not b.runs_here():
            continue
        out[b.name] = b.build
        if b.name in kernels:
            other = not kernels[b.name].prune_by_default  # the kernel's other search beside its default one
            out[f"{b.name} ({'pruned' if other else 'margin'})"] = \
                lambda keys, name=kernels[b.name].name, other=other: CpuExactSearch(keys, name, prune=other)
    return out


def bytes_needed(keys: np.ndarray, names: list[str]) -> int:
    """Memory of all the backends' copies of the keys at once: fp32 for FAISS, bf16 (+ norms) for the others."""
    N, d = keys.shape
    return sum(N * d * 4 if name == "Flat" else N * (d * 2 + 4) for name in names)


def timed(search, queries: np.ndarray, k: int) -> tuple[float, np.ndarray]:
    search(queries[:64], k)  # warm-up: first-touch page faults and thread start-up are not the steady state
    t = time.perf_counter()
    _, ids = search(queries, k)
    return len(queries) / (time.perf_counter() - t), ids


def bench_store(name: str, keys: np.ndarray, queries: np.ndarray, ks: list[int], n_truth: int, approx: str | None,
                repeats: int) -> dict:
    print(f"{name}: {keys.shape[0]:,} keys x {keys.shape[1]}, {len(queries)} queries", flush=True)
    full = truth(keys, queries[:n_truth], max(ks))  # nearest first, so each k is a prefix
    ref = {k: full[:, :k] for k in ks}
    build = backends()
    free = available_memory()
    together = free is None or bytes_needed(keys, list(build)) < 0.6 * free
    # All backends built at once and timed in turns where memory allows; otherwise one after another.
    groups = [list(build)] if together else [[b] for b in build]
    setup, qps, ids = {}, {}, {}
    for group in groups:
        searchers = {}
        for b in group:
            t = time.perf_counter()
            searchers[b] = build[b](keys)
            setup[b] = time.perf_counter() - t
        for k in ks:
            for _ in range(repeats):
                for b, s in searchers.items():
                    rate, found = timed(s.search, queries, k)
                    if rate > qps.get((b, k), 0):
                        qps[b, k], ids[b, k] = rate, found
        del searchers
        gc.collect()
    rows = []
    for k in ks:
        flat_ids = ids["Flat", k]
        row = {"k": k, "faiss_qps": qps["Flat", k], "faiss_recall_vs_float64": recall(flat_ids[:n_truth], ref[k]),
               "faiss_tflops": qps["Flat", k] * 2 * keys.shape[0] * keys.shape[1] / 1e12,  # its product's rate
               "backends": {}}
        for b in build:
            if b == "Flat":
                continue
            row["backends"][b] = {"qps": qps[b, k], "ratio": qps[b, k] / qps["Flat", k],
                                  "recall_vs_float64": recall(ids[b, k][:n_truth], ref[k]),
                                  "recall_vs_faiss": recall(ids[b, k], flat_ids)}
            print(f"  k={k:5d} {b:13s} {qps[b, k]:8.0f} q/s  {qps[b, k] / qps['Flat', k]:5.2f}x FAISS Flat "
                  f"({qps['Flat', k]:.0f} q/s)  recall vs float64 {row['backends'][b]['recall_vs_float64']:.4f}",
                  flush=True)
        rows.append(row)
    res = {"name": name, "N": int(keys.shape[0]), "d": int(keys.shape[1]), "queries": len(queries),
           "truth_queries": n_truth, "timed_in_turns": together, "repeats": repeats, "setup_seconds": setup,
           "rows": rows}
    if approx:
        t = time.perf_counter()
        s = FaissSearch(keys, approx, nprobe=32, rerank_factor=2)
        seconds = time.perf_counter() - t
        res["approximate"] = []
        for k in ks:
            rate, found = timed(s.search, queries, k)
            res["approximate"].append({"index": approx, "nprobe": 32, "rerank_factor": 2, "k": k, "qps": rate,
                                       "recall_vs_float64": recall(found[:n_truth], ref[k]), "build_seconds": seconds})
            print(f"  FAISS {approx} (re-ranked) k={k}: {rate:.0f} q/s", flush=True)
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


def _backend_rows(row: dict) -> dict:
    """A row's backends, also from records written before there was more than one (`knnlm_qps`: amx-exact)."""
    if "backends" in row:
        return {b: {**v, "recall": v.get("recall_vs_float64")} for b, v in row["backends"].items()}
    return {"amx-exact": {"qps": row["knnlm_qps"], "ratio": row["ratio"], "recall": row.get("knnlm_recall_vs_float64")}}


def plot(stores: list[dict], path: Path, machine: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(stores), figsize=(5 * len(stores), 3.6), squeeze=False)
    for ax, s in zip(axes[0], stores):
        ks = [r["k"] for r in s["rows"]]
        names = list(_backend_rows(s["rows"][0]))
        width = 0.8 / (1 + len(names))
        x = np.arange(len(ks))
        ax.bar(x - 0.4 + width / 2, [r["faiss_qps"] for r in s["rows"]], width, label="FAISS IndexFlatL2")
        for j, b in enumerate(names, start=1):
            xs = x - 0.4 + width * (j + 0.5)
            vals = [_backend_rows(r)[b] for r in s["rows"]]
            ax.bar(xs, [v["qps"] for v in vals], width, label=f"knnlm {b}")
            for xi, v in zip(xs, vals):
                recall_note = f"\nr={v['recall']:.3f}" if v.get("recall") is not None else ""
                ax.text(xi, v["qps"], f"{v['ratio']:.1f}x{recall_note}", ha="center", va="bottom", fontsize=7)
        ax.set_xticks(x, [f"k = {k}" for k in ks])
        ax.set_ylabel("queries / s")
        ax.set_title(f"{s['name']}: {s['N'] / 1e6:.2f}M keys x {s['d']}")
        top = max([r["faiss_qps"] for r in s["rows"]] + [v["qps"] for r in s["rows"] for v in _backend_rows(r).values()])
        ax.set_ylim(0, 1.15 * top)
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=2, fontsize=8, frameon=False)
    fig.suptitle(f"Exact k-NN search, queries/s (higher is better; label: speed-up over FAISS, r = recall@k vs a float64 "
                 f"brute force)\n{machine}", fontsize=9)
    fig.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png", dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run", default=None, help="a run folder with datastore/ and eval/valid/query_keys.npy")
    p.add_argument("--synthetic", type=int, default=0,
                   help="keys of the synthetic store (default without --run: 2M on AMX CPUs, 256k otherwise)")
    p.add_argument("--dim", type=int, default=256, help="dimensions of the synthetic store")
    p.add_argument("--queries", type=int, default=0, help="default: 2048 (--run), 512 (synthetic, no AMX)")
    p.add_argument("--truth-queries", type=int, default=64)
    p.add_argument("--ks", default="64,1024")
    p.add_argument("--repeats", type=int, default=2, help="timing rounds per backend and k; the best one is kept")
    p.add_argument("--scale", type=int, default=5, help="with --run: also a store this many times larger")
    p.add_argument("--approx", default="IVF1024,PQ32", help="with --run: an approximate index on the real store")
    p.add_argument("--out", default=default_out(), help="default: this machine's folder under results/benchmarks/")
    p.add_argument("--plot-only", action="store_true", help="redraw search.png from search.json")
    a = p.parse_args()
    if a.plot_only:
        record = json.loads((Path(a.out) / "search.json").read_text())
        where = f"{record['machine']['cpu']}, {record.get('threads', record['machine'].get('torch_threads'))} threads"
        plot(record["stores"], Path(a.out) / "search.png", where)
        return
    threads = torch.get_num_threads()
    faiss.omp_set_num_threads(threads)
    ks = [int(k) for k in a.ks.split(",")]
    rng = np.random.default_rng(0)
    stores = []
    if a.run:
        keys = np.load(Path(a.run) / "datastore" / "keys.npy", mmap_mode="r")
        q_all = np.load(Path(a.run) / "eval" / "valid" / "query_keys.npy", mmap_mode="r")
        n_q = min(a.queries or 2048, len(q_all))
        queries = np.asarray(q_all[np.sort(rng.choice(len(q_all), n_q, replace=False))], dtype=np.float32)
        stores.append(bench_store("WikiText-2 datastore", keys, queries, ks, a.truth_queries, a.approx, a.repeats))
        if a.scale > 1:
            with tempfile.TemporaryDirectory(dir=Path(a.run)) as tmp:
                big = synthetic(keys, a.scale, Path(tmp))
                stores.append(bench_store(f"synthetic {a.scale}x", big, queries, ks, a.truth_queries // 4, None,
                                          a.repeats))
                del big
    if a.synthetic or not a.run:
        amx = cpu_has_amx()
        n = a.synthetic or (2_000_000 if amx else 262_144)
        n_q = a.queries or (2048 if amx else 512)
        both = lm_like_keys(n + n_q, a.dim)  # the last n_q: held-out samples of the same distribution
        keys, queries = both[:n], both[n:].astype(np.float32)
        stores.append(bench_store("synthetic LM-like", keys, queries, ks, a.truth_queries, None, a.repeats))
    md = ["| store | k | FAISS Flat q/s | backend | q/s | ratio | recall vs float64 / vs FAISS | FAISS recall vs float64 |",
          "|---|---|---|---|---|---|---|---|"]
    for s in stores:
        for r in s["rows"]:
            for b, v in r["backends"].items():
                md.append(f"| {s['name']} ({s['N']:,} keys) | {r['k']} | {r['faiss_qps']:.0f} | `{b}` | {v['qps']:.0f} | "
                          f"**{v['ratio']:.2f}x** | {v['recall_vs_float64']:.4f} / {v['recall_vs_faiss']:.5f} | "
                          f"{r['faiss_recall_vs_float64']:.4f} |")
    for s in stores:
        for r in s.get("approximate", []):
            md.append(f"\nApproximate, {s['name']}: FAISS `{r['index']}` nprobe {r['nprobe']}, {r['rerank_factor']}k "
                      f"candidates re-ranked exactly, k = {r['k']}: {r['qps']:.0f} q/s, recall vs float64 "
                      f"{r['recall_vs_float64']:.4f} (index built in {r['build_seconds']:.0f} s)")
    # the machine's matrix-product rates: FAISS Flat runs at its BLAS's fp32 rate, which may be well below torch's
    rates = bf16_matmul_tflops()
    md.append(f"\nMatrix products on this machine (torch, {threads} threads): fp32 {rates['float32']:.2f} TFLOP/s, "
              f"bf16 {rates['bfloat16']:.2f} TFLOP/s")
    cpu = {"flags": sorted(cpu_flags()), "threads": threads, "matmul_tflops": rates,
           "kernels": {k.index: available(k.name) for k in KERNELS.values()}}
    write_results(a.out, "search", {"threads": threads, "cpu": cpu, "stores": stores}, md)
    plot(stores, Path(a.out) / "search.png", f"{machine()['cpu']}, {threads} threads")
    print("\n".join(md))


if __name__ == "__main__":
    main()

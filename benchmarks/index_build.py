"""What `auto`'s choice of a search costs before the first query: building each candidate on the store, then timing it.

    python benchmarks/index_build.py --run runs/wt2 [--queries 1024] [--k 1024] [--out DIR]

The index step of an evaluation (`knnlm evaluate`, `seconds.index` in its summary) is `auto`'s probe
(`knnlm/search/auto.py`): every candidate search is built on the whole store and times one search of the split's
queries. This measures, on a run's datastore and its valid query keys:

1. the builds side by side, in alternating rounds, at the block of rows knnlm converts and packs at a time before
   (262,144) and now (`cpu_kernels.BUILD_ROWS`): the margin search, the default pruned search and FAISS Flat; each
   pair's stores (packed keys and norms; Flat's neighbours of 64 queries) are checked equal;
2. each of `auto`'s candidates on this machine: its build time and its rate on `--queries` queries at `--k` (each
   timed in full here; `auto` drops a candidate after an eighth of the queries when it is under half the best rate
   so far).

Writes OUT/index_build.{json,md} (default: this machine's folder under results/benchmarks/).
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from common import default_out, write_results
from knnlm.search.auto import auto_candidates, probe_rate
from knnlm.search.cpu_kernels import BUILD_ROWS, CpuExactSearch, first_kernel
from knnlm.search.faiss_index import FaissSearch

BEFORE = 262144  # the block of rows before BUILD_ROWS


def build_pairs(keys: np.ndarray, queries: np.ndarray, rounds: int) -> tuple[dict, dict]:
    """Seconds of each build at BEFORE and at BUILD_ROWS rows a block, `rounds` times in turn; and whether each
    pair built the same store."""
    kernel = first_kernel()
    builds = {"FAISS Flat": lambda rows: FaissSearch(keys, "Flat", chunk=rows)}
    if kernel is not None:
        builds = {f"{kernel}-exact, margin": lambda rows: CpuExactSearch(keys, kernel, prune=False, block=rows),
                  f"{kernel}-exact, pruned": lambda rows: CpuExactSearch(keys, kernel, prune=True, block=rows),
                  **builds}
    seconds = {name: {str(rows): [] for rows in (BEFORE, BUILD_ROWS)} for name in builds}
    same = {}
    for _ in range(rounds):
        for name, build in builds.items():
            made = []
            for rows in (BEFORE, BUILD_ROWS):
                t = time.perf_counter()
                searcher = build(rows)
                seconds[name][str(rows)].append(time.perf_counter() - t)
                made.append(searcher.index.search(queries[:64], 16)[1] if isinstance(searcher, FaissSearch)
                            else searcher.store[:3])
                del searcher
            a, b = made
            same[name] = bool(np.array_equal(a, b)) if isinstance(a, np.ndarray) else all(
                np.array_equal(x, y) for x, y in zip(a, b))
            print(f"{name}: " + ", ".join(f"{rows} rows {seconds[name][str(rows)][-1]:.1f} s"
                                          for rows in (BEFORE, BUILD_ROWS)) + f"; same store: {same[name]}", flush=True)
    return seconds, same


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", required=True, help="a run folder with datastore/ and eval/valid/query_keys.npy")
    p.add_argument("--queries", type=int, default=1024, help="probe queries (auto's default: 1,024)")
    p.add_argument("--k", type=int, default=1024)
    p.add_argument("--rounds", type=int, default=2, help="rounds of the side-by-side builds")
    p.add_argument("--out", default=default_out(), help="default: this machine's folder under results/benchmarks/")
    a = p.parse_args()
    keys = np.load(f"{a.run}/datastore/keys.npy", mmap_mode="r")
    q = np.load(f"{a.run}/eval/valid/query_keys.npy", mmap_mode="r")
    queries = np.ascontiguousarray(q[:: max(1, len(q) // a.queries)][: a.queries], dtype=np.float32)
    float(np.asarray(keys[:: max(1, len(keys) // 4096)], dtype=np.float32).sum())  # touch the store's file
    seconds, same = build_pairs(keys, queries, a.rounds)
    candidates = []
    for name, build in auto_candidates(keys).items():
        t = time.perf_counter()
        searcher = build()
        built = time.perf_counter() - t
        rate = probe_rate(searcher, queries, a.k)
        del searcher
        candidates.append({"search": name, "build_seconds": built, "queries_per_s": rate,
                           "probe_seconds": len(queries) / rate})
        print(f"{name}: build {built:.1f} s, {rate:,.0f} q/s ({len(queries) / rate:.1f} s for the probe)", flush=True)
    data = {"run": a.run, "N": int(len(keys)), "d": int(keys.shape[1]), "k": a.k, "queries": len(queries),
            "build_seconds_by_block": seconds, "same_store": same, "candidates": candidates}
    built, probed = sum(c["build_seconds"] for c in candidates), sum(c["probe_seconds"] for c in candidates)
    md = [f"Store: {a.run}/datastore, {len(keys):,} × {keys.shape[1]} float16; probe: {len(queries)} of its valid "
          f"query keys at k = {a.k}.", "",
          f"| build | {BEFORE:,} rows a block (before) | {BUILD_ROWS:,} (now) | best before / best now | same store |",
          "|---|---|---|---|---|",
          *[f"| {name} | {', '.join(f'{x:.1f}' for x in by[str(BEFORE)])} s | "
            f"{', '.join(f'{x:.1f}' for x in by[str(BUILD_ROWS)])} s | "
            f"**{min(by[str(BEFORE)]) / min(by[str(BUILD_ROWS)]):.2f}×** | {same[name]} |" for name, by in seconds.items()],
          "", "Each round builds every search at both blocks in turn (seconds listed round by round).", "",
          "| `auto`'s candidate | build | probe rate | probe time |", "|---|---|---|---|",
          *[f"| {c['search']} | {c['build_seconds']:.1f} s | {c['queries_per_s']:,.0f} q/s | {c['probe_seconds']:.1f} s |"
            for c in candidates],
          "", f"Builds in all: **{built:.1f} s**; probes, each timed in full: {probed:.1f} s (`auto` times a "
          "candidate on an eighth of the queries first and in full only if it is within half the best rate so far, "
          "so its probes cost at most this). The search chosen is kept; the others' builds are spent."]
    write_results(a.out, "index_build", data, md)


if __name__ == "__main__":
    main()

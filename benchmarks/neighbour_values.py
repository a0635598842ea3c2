"""What reading a saved search's neighbours' values costs before tuning: numpy's fancy indexing against knnlm's
`neighbour_values` (torch's `index_select`), side by side.

    python benchmarks/neighbour_values.py --run runs/wt2 [--rows 50000] [--rounds 3] [--out DIR]

Tuning (`knnlm evaluate` on valid, `seconds.tuning` in its summary) starts by looking up the value (next token) of
every stored neighbour of every token: (n, K) ids into the datastore's values. This times that lookup both ways on a
run's saved valid search, in alternating rounds, checks both give the same array, and for scale times once the
p_kNN grid that tuning computes next from the same neighbours (`knn_logprob_grid` over the run's k and temperature
grid). Writes OUT/neighbour_values.{json,md} (default: this machine's folder under results/benchmarks/).
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from common import default_out, write_results
from knnlm.config import read_run_config
from knnlm.datastore import neighbour_values
from knnlm.evaluate import tuning_grid
from knnlm.knn import knn_logprob_grid


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", required=True, help="a run folder with datastore/ and an evaluated eval/valid/")
    p.add_argument("--rows", type=int, default=0, help="tokens of the saved search to read (0: all)")
    p.add_argument("--rounds", type=int, default=3, help="rounds of the side-by-side lookups")
    p.add_argument("--out", default=default_out(), help="default: this machine's folder under results/benchmarks/")
    a = p.parse_args()
    folder = f"{a.run}/eval/valid"
    ids = np.load(f"{folder}/neighbors.npy", mmap_mode="r")
    ids = np.ascontiguousarray(ids[: a.rows or len(ids)])  # read once: both ways gather from memory
    vals = np.load(f"{a.run}/datastore/vals.npy", mmap_mode="r")
    int(np.asarray(vals).sum())  # the values' file in the page cache, as tuning finds it after the search
    ways = {"numpy fancy indexing (vals[ids])": lambda: np.asarray(vals)[ids],
            "neighbour_values (torch index_select)": lambda: neighbour_values(vals, ids)}
    seconds = {name: [] for name in ways}
    answers = {}
    for _ in range(a.rounds):
        for name, way in ways.items():
            t = time.perf_counter()
            answers[name] = way()
            seconds[name].append(time.perf_counter() - t)
        print(", ".join(f"{name} {s[-1]:.2f} s" for name, s in seconds.items()), flush=True)
    same = bool(np.array_equal(*answers.values()))
    best = {name: min(s) for name, s in seconds.items()}
    numpy_s, ours_s = best.values()

    cfg = read_run_config(a.run)
    ks, temperatures = tuning_grid(cfg)
    ks = [k for k in ks if k <= ids.shape[1]]
    distances = np.load(f"{folder}/distances.npy", mmap_mode="r")[: len(ids)]
    targets = np.load(f"{folder}/targets.npy")[: len(ids)]
    t = time.perf_counter()
    knn_logprob_grid(distances, answers["neighbour_values (torch index_select)"], targets, ks, temperatures)
    grid_s = time.perf_counter() - t

    data = {"run": a.run, "rows": int(len(ids)), "neighbours": int(ids.shape[1]), "ids_dtype": str(ids.dtype),
            "datastore_rows": int(len(vals)), "seconds": seconds, "same": same, "speedup": numpy_s / ours_s,
            "grid": {"k": ks, "temperatures": temperatures, "seconds": grid_s}}
    md = [f"Saved search: {folder}, {len(ids):,} tokens × {ids.shape[1]:,} neighbours ({ids.dtype}) into "
          f"{len(vals):,} values; {a.rounds} alternating rounds (seconds listed round by round).", "",
          "| lookup | seconds | best |", "|---|---|---|",
          *[f"| {name} | {', '.join(f'{x:.2f}' for x in s)} | {min(s):.2f} s |" for name, s in seconds.items()], "",
          f"`neighbour_values` is **{numpy_s / ours_s:.1f}×** numpy's indexing (best against best); the same array "
          f"both ways: {same}.", "",
          f"For scale: the p_kNN grid tuning computes next from these neighbours ({len(ks)} k × {len(temperatures)} "
          f"temperatures) took {grid_s:.1f} s."]
    write_results(a.out, "neighbour_values", data, md)


if __name__ == "__main__":
    main()

"""What tuning costs after the search, part by part, each way side by side: looking up the saved neighbours' values,
then the p_kNN grid.

    python benchmarks/tuning_step.py --run runs/wt2 [--rows 50000] [--rounds 3] [--out DIR]

Tuning (`knnlm evaluate` on valid, `seconds.tuning` in its summary) reads the split's saved search and first looks up
the value (next token) of every stored neighbour of every token, (n, K) ids into the datastore's values; then it
computes log p_kNN(target) of every token at every (k, temperature) of the grid (`knn_logprob_grid`), from which
the λ tuning is cheap. On a run's saved valid search, in alternating rounds, this times:

1. the lookup by numpy's fancy indexing (before) and by `neighbour_values` (torch's `index_select`, now);
2. the grid with every exponent passed to exp as it is (before) and raised to `knn.MIN_EXPONENT` first (now).

Each pair's answers are compared to the bit. Writes OUT/tuning_step.{json,md} (default: this machine's folder under
results/benchmarks/).
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from common import default_out, write_results
from knnlm.config import read_run_config
from knnlm.datastore import neighbour_values
from knnlm.evaluate import tuning_grid
from knnlm.knn import MIN_EXPONENT, knn_logprob_grid


def side_by_side(ways: dict, rounds: int) -> tuple[dict[str, list[float]], dict]:
    """Seconds of each way, `rounds` times in turn, and each way's last answer."""
    seconds, answers = {name: [] for name in ways}, {}
    for _ in range(rounds):
        for name, way in ways.items():
            t = time.perf_counter()
            answers[name] = way()
            seconds[name].append(time.perf_counter() - t)
        print(", ".join(f"{name} {s[-1]:.2f} s" for name, s in seconds.items()), flush=True)
    return seconds, answers


def rows_of(seconds: dict[str, list[float]]) -> list[str]:
    return [f"| {name} | {', '.join(f'{x:.2f}' for x in s)} | {min(s):.2f} s |" for name, s in seconds.items()]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", required=True, help="a run folder with datastore/ and an evaluated eval/valid/")
    p.add_argument("--rows", type=int, default=0, help="tokens of the saved search to read (0: all)")
    p.add_argument("--rounds", type=int, default=3, help="rounds of each side-by-side comparison")
    p.add_argument("--out", default=default_out(), help="default: this machine's folder under results/benchmarks/")
    a = p.parse_args()
    folder = f"{a.run}/eval/valid"
    ids = np.load(f"{folder}/neighbors.npy", mmap_mode="r")
    n = a.rows or len(ids)
    ids = np.ascontiguousarray(ids[:n])  # read once: both ways gather from memory
    vals = np.load(f"{a.run}/datastore/vals.npy", mmap_mode="r")
    int(np.asarray(vals).sum())  # the values' file in the page cache, as tuning finds it after the search
    lookup_s, looked_up = side_by_side({
        "numpy fancy indexing, vals[ids] (before)": lambda: np.asarray(vals)[ids],
        "neighbour_values, torch index_select (now)": lambda: neighbour_values(vals, ids)}, a.rounds)
    lookup_same = bool(np.array_equal(*looked_up.values()))
    values = looked_up["neighbour_values, torch index_select (now)"]

    cfg = read_run_config(a.run)
    ks, temperatures = tuning_grid(cfg)
    ks = [k for k in ks if k <= ids.shape[1]]
    distances = np.ascontiguousarray(np.load(f"{folder}/distances.npy", mmap_mode="r")[:n])
    targets = np.load(f"{folder}/targets.npy")[:n]
    grid = lambda floor: knn_logprob_grid(distances, values, targets, ks, temperatures, min_exponent=floor)
    grid_s, grids = side_by_side({"every exponent as it is (before)": lambda: grid(None),
                                  f"exponents raised to {MIN_EXPONENT:g} (now)": lambda: grid(MIN_EXPONENT)}, a.rounds)
    before, now = grids.values()
    grid_same = all(np.array_equal(before[key], now[key]) for key in before)
    finite = [np.isfinite(before[key]) for key in before]
    grid_diff = max(float(np.max(np.abs(before[key][f] - now[key][f]), initial=0.0)) for key, f in zip(before, finite))

    speedup = lambda s: min(s[0]) / min(s[1])
    data = {"run": a.run, "rows": int(n), "neighbours": int(ids.shape[1]), "ids_dtype": str(ids.dtype),
            "datastore_rows": int(len(vals)),
            "lookup": {"seconds": lookup_s, "same": lookup_same, "speedup": speedup(list(lookup_s.values()))},
            "grid": {"k": ks, "temperatures": temperatures, "min_exponent": MIN_EXPONENT, "seconds": grid_s,
                     "same_to_the_bit": grid_same, "max_abs_difference": grid_diff,
                     "speedup": speedup(list(grid_s.values()))}}
    md = [f"Saved search: {folder}, {n:,} tokens × {ids.shape[1]:,} neighbours ({ids.dtype}) into {len(vals):,} "
          f"values; grid {len(ks)} k × {len(temperatures)} temperatures; {a.rounds} alternating rounds of each pair "
          "(seconds listed round by round).", "",
          "| step | seconds | best |", "|---|---|---|", *rows_of(lookup_s), *rows_of(grid_s), "",
          f"The lookup: **{data['lookup']['speedup']:.1f}×** (best against best), the same array both ways: "
          f"{lookup_same}.",
          f"The grid: **{data['grid']['speedup']:.2f}×**, the same log-probabilities to the bit: {grid_same} "
          f"(largest difference {grid_diff:.1e})."]
    write_results(a.out, "tuning_step", data, md)


if __name__ == "__main__":
    main()

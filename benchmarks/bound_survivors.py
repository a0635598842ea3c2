"""How many keys does a projected-distance bound leave to check, for each number of principal directions?

    python benchmarks/bound_survivors.py [--n 200000] [--queries 256] [--run runs/wt2 ...] [--out DIR]

The pruned exact search (`knnlm/search/cpu_kernels.py`) scans every key projected onto the keys' m leading
principal directions (m = 64 of d = 256): the projected distance never exceeds the true one, so only keys whose
projected distance is below the query's k-th exact distance need their exact distance. A cheaper first bound
(issue 36) would scan fewer directions first and the 64 only for the keys that survive it. Whether that pays depends
on the keys: this measures, on each store of `benchmarks/key_distributions.py` (and on run datastores), the share of
keys that survive a bound of m directions, for m from 4 to 128, against

- the final k-th exact distance: the fewest keys any pruned pass with that bound can check;
- the running threshold: the guess the pruned search starts from (`CpuExactSearch._speculative`: a little beyond the
  k-th distance among every 16th key), lowered to the k-th exact distance among the keys scanned so far, as the
  kernels do;
- the guess held all the way: the most such a pass checks (the share of queries whose guess falls short, searched
  again from +inf, is recorded too);

and from the running shares a cost model of the work per key, in directions read: one stage of m2 = 64 costs
`64 + s(64) · d` (the projected scan, then the exact distances of its survivors); two stages cost
`m1 + s(m1) · 64 + s(64) · d`. The model counts arithmetic only: a second stage reads its survivors' 64 directions
out of order, which costs more per direction than the first stage's stream. All in float32 (no bf16 rounding: the
bound's power, not a kernel's speed). The shares are properties of the keys, not of the machine; the record still
names it. A run's queries are its valid split's own query keys (every n/queries-th), which the datastore does not
hold.
Writes OUT/bound_survivors.{json,md} (default: this machine's folder under results/benchmarks/).
"""

from __future__ import annotations

import argparse
import math

import numpy as np
import torch

from common import default_out, write_results
from key_distributions import stores
from knnlm.search.key_geometry import centering_vector, principal_directions, variance_dims

DIMS = (4, 8, 16, 24, 32, 48, 64, 96, 128)
SECOND = 64  # the pruned search's projection today (project_dims(256))


def survivors(keys: np.ndarray, queries: np.ndarray, k: int, dims=DIMS, block: int = 131072,
              sample: int = 16, running_block: int = 4096) -> dict:
    """Mean share of keys whose distance projected onto the first m principal directions is below a threshold, for
    each m in dims, with three thresholds:
    - `final`: the query's final k-th exact distance (the fewest keys any pass with this bound checks);
    - `guess`: the pruned search's first guess of it, held all the way (the most such a pass checks);
    - `running`: the guess, lowered to the k-th exact distance among the keys scanned so far once that is smaller, as
      the kernels keep it, updated every `running_block` keys in storage order (the kernels split the store
      between threads, each with its own running k-th: their work lies between `running` and `guess`)."""
    dims = [m for m in dims if m <= keys.shape[1]]
    mean = centering_vector(keys)
    basis = principal_directions(keys, mean, max(dims))  # (d, M): the leading directions, strongest first
    q = torch.from_numpy(np.asarray(queries, dtype=np.float32)) - mean
    qp = q @ basis  # (n, M)
    sq = lambda a, b: (a.pow(2).sum(1, keepdim=True) + b.pow(2).sum(1)[None] - 2 * a @ b.T).clamp_min(0)  # (n, b)
    best = torch.empty((len(q), 0))
    # pass 1: each query's exact k nearest distances. Pass 2 computes the exact distances again (for the running
    # threshold): the final k-th must be known before its first block is counted, and keeping n × N distances
    # between the passes would not fit in memory for a real store
    for lo in range(0, len(keys), block):
        x = torch.from_numpy(np.asarray(keys[lo : lo + block], dtype=np.float32)) - mean
        best = torch.cat([best, sq(q, x)], 1).topk(min(k, best.shape[1] + len(x)), 1, largest=False).values
    kth = best[:, -1]
    # the pruned search's guess (`CpuExactSearch._speculative`): the ks-th distance among every 16th key, a little
    # beyond the k-th in expectation; where it falls short the search runs again from +inf (`fallbacks`)
    xs = torch.from_numpy(np.asarray(keys[::sample], dtype=np.float32)) - mean
    ks = min(len(xs), math.ceil(1.5 * k / sample + 3 * math.sqrt(k / sample)))
    guess = sq(q, xs).topk(ks, 1, largest=False).values[:, -1]
    count = {which: {m: 0.0 for m in dims} for which in ("final", "guess", "running")}
    seen, threshold = torch.empty((len(q), 0)), guess.clone()
    for lo in range(0, len(keys), running_block):  # pass 2: projected distances, a running sum over the directions
        x = torch.from_numpy(np.asarray(keys[lo : lo + running_block], dtype=np.float32)) - mean
        xp = x @ basis  # (b, M)
        acc, start = torch.zeros((len(q), len(xp))), 0
        for m in dims:
            acc += sq(qp[:, start:m], xp[:, start:m])
            start = m
            count["final"][m] += float((acc < kth[:, None]).sum())
            count["guess"][m] += float((acc < guess[:, None]).sum())
            count["running"][m] += float((acc < threshold[:, None]).sum())
        seen = torch.cat([seen, sq(q, x)], 1)  # the running k nearest exact distances, then the threshold
        seen = seen.topk(min(k, seen.shape[1]), 1, largest=False).values
        if seen.shape[1] == k:
            threshold = torch.minimum(guess, seen[:, -1])
    total = len(q) * len(keys)
    return {**{which: {m: c / total for m, c in by_m.items()} for which, by_m in count.items()},
            "guess_below_kth": float((guess < kth).float().mean())}  # queries the search would search again


def work(share: dict[int, float], d: int) -> dict[str, float]:
    """Directions read per key: one stage of SECOND directions, and two stages m1 then SECOND for each m1 < SECOND."""
    out = {f"one stage, m = {SECOND}": SECOND + share[SECOND] * d}
    for m1 in [m for m in share if m < SECOND]:
        out[f"two stages, m1 = {m1}"] = m1 + share[m1] * SECOND + share[SECOND] * d
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=200_000, help="keys per synthetic store")
    p.add_argument("--queries", type=int, default=256)
    p.add_argument("--k", type=int, nargs="+", default=[64, 1024])
    p.add_argument("--run", nargs="*", help="run folders whose datastores to add")
    p.add_argument("--hf", help="a local Hugging Face causal LM whose hidden states to add")
    p.add_argument("--synthetic", action=argparse.BooleanOptionalAction, default=True,
                   help="include the synthetic stores (--no-synthetic: the runs' datastores only)")
    p.add_argument("--out", default=default_out(), help="default: this machine's folder under results/benchmarks/")
    a = p.parse_args()
    rows, lines = [], []
    runs, a.run = a.run or [], None  # a run's own valid query keys, not perturbed stored keys (key_distributions.py's)
    made = stores(a) if a.synthetic or a.hf else {}
    for run in runs:
        keys = np.load(f"{run}/datastore/keys.npy", mmap_mode="r")
        q = np.load(f"{run}/eval/valid/query_keys.npy", mmap_mode="r")
        queries = np.asarray(q[:: max(1, len(q) // a.queries)][: a.queries], dtype=np.float32)
        made[f"datastore of {run} ({len(keys):,} keys, d = {keys.shape[1]}; its valid query keys)"] = (keys, queries)
    for name, (keys, queries) in made.items():
        if not a.synthetic and name.startswith(("isotropic", "clustered")):
            continue
        m90, held = variance_dims(keys)
        for k in a.k:
            s = survivors(keys, queries, k)
            costs = work(s["running"], keys.shape[1])
            rows.append({"store": name, "n": len(keys), "d": keys.shape[1], "k": k, "variance_dims_90": m90,
                         "survivors": s, "directions_per_key_running": costs})
            best = min(costs, key=costs.get)
            one = costs[f"one stage, m = {SECOND}"]
            line = (f"| {name} | {k} | " + " | ".join(f"{100 * s['final'][m]:.2f} / {100 * s['running'][m]:.2f} / "
                                                       f"{100 * s['guess'][m]:.2f}"
                                                       for m in (8, 16, 32, 64) if m in s["final"])
                    + f" | {100 * s['guess_below_kth']:.1f} | {one:.1f} | {best}: {costs[best]:.1f} ({costs[best] / one:.2f}×) |")
            lines.append(line)
            print(line, flush=True)
    md = ["### Keys left by a bound of m principal directions (% of the store, against the final k-th distance / the "
          "running threshold / the first guess held)", "",
          "| store | k | m = 8 | m = 16 | m = 32 | m = 64 | guess short (% of queries) | directions read per key, one "
          "stage of 64 | best two-stage (× one stage) |", "|---|---|---|---|---|---|---|---|---|", *lines, "",
          "From the final k-th distance: the fewest keys any pass with the bound checks; running: the first guess, "
          "lowered to the k-th exact distance among the keys scanned so far (every 4,096 keys, in storage order); "
          "guess held: the most. Directions read per key (from the running shares): m1 + s(m1)·64 + s(64)·d for two "
          "stages, 64 + s(64)·d for one."]
    write_results(a.out, "bound_survivors", {"rows": rows}, md)


if __name__ == "__main__":
    main()

"""How deep must k go? The kNN-LM perplexity at every k up to the whole datastore (k = N), by brute force on a sample
of an evaluated run's valid tokens.

A whole-split evaluation searches each token's k_max nearest keys and tunes k ≤ k_max; where the tuned k is the
grid's largest, the optimum may lie beyond it, and searching every token deeper costs hours on a CPU. This scores a
sample instead, exactly: each sampled token's squared L2 distance to every key (fp32, ‖q‖² + ‖k‖² − 2 q·k),
sorted, and log p_kNN(target) at every k = 8, 16, …, 2^j < N and k = N (`knn_logprob_grid`'s formula: running
sums from the nearest key, every exp ≤ 1), at every temperature asked. Then, per k, the best perplexity of
λ p_kNN + (1 − λ) p_LM with temperature and λ tuned at that k, and at temperature 1 with λ tuned (the two protocols'
curves). Chosen on the sample it reports, so each figure is a little optimistic; what it is for is the curve's
shape and the comparison of runs on the same tokens.

Reads RUN/datastore (keys, values) and RUN/eval/valid (query_keys.npy, targets.npy, lm_logprobs.npy). The time is
mostly the exps, N × |temperatures| per token: with the 18 default temperatures, 0.27 s a token at N = 500,000 and
1.1 s at N = 2.09 M on 2 idle Zen 3 cores (results/memorizing/k_depth*.json).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ..artifacts import UserError, cpu_name
from ..knn import interpolate, perplexities

TEMPERATURES = (0.1, 0.316, 1.0, 2.15, 3.16, 4.64, 6.81, 10.0, 14.7, 21.5, 31.6, 46.4, 68.1, 100.0, 147.0, 215.0,
                316.0, 1000.0)
LAMBDAS = tuple(round(0.05 * i, 2) for i in range(1, 21))  # 0.05 … 1


def depth_ks(n: int) -> list[int]:
    """k = 8, 16, …, the powers of two below n, and n itself."""
    return [2**j for j in range(3, 64) if 2**j < n] + [n]


def all_keys_logprobs(keys: np.ndarray, vals: np.ndarray, queries: np.ndarray, targets: np.ndarray, ks: list[int],
                      temperatures=TEMPERATURES, block: int = 32, progress: bool = False) -> np.ndarray:
    """(n, len(temperatures), len(ks)) float64: log p_kNN(target) of each query over its k nearest keys, for every k
    of `ks` (at most len(keys)), by brute force over every key; −inf where none of the k carries the target."""
    keys_t = torch.from_numpy(np.asarray(keys, dtype=np.float32))
    vals_t = torch.from_numpy(np.asarray(vals).astype(np.int64))
    key_sq = keys_t.pow(2).sum(1)
    at = torch.tensor([k - 1 for k in ks])
    out = np.empty((len(queries), len(temperatures), len(ks)))
    bar = tqdm(total=len(queries), desc="k depth", unit="tok", disable=not progress, dynamic_ncols=True)
    for lo in range(0, len(queries), block):
        q = torch.from_numpy(np.asarray(queries[lo : lo + block], dtype=np.float32))
        d = (q.pow(2).sum(1, keepdim=True) + key_sq[None] - 2 * q @ keys_t.T).clamp_min_(0)
        d, order = torch.sort(d, dim=1)
        match = vals_t[order] == torch.from_numpy(np.asarray(targets[lo : lo + block]).astype(np.int64))[:, None]
        gap = d[:, :1] - d  # ≤ 0: the nearest key's weight is 1, the sums are ≥ 1
        for j, t in enumerate(temperatures):
            w = torch.exp(gap / t)
            total = torch.cumsum(w, 1, dtype=torch.float64)[:, at]
            hit = torch.cumsum(w * match, 1, dtype=torch.float64)[:, at]
            out[lo : lo + block, j] = (torch.log(hit) - torch.log(total)).numpy()
        bar.update(len(q))
    bar.close()
    return out


def best_choice(lm: np.ndarray, knn: np.ndarray, temperatures) -> tuple[float, float, float, np.ndarray]:
    """(perplexity, temperature, λ, per-token log-probabilities) of the best mixture over the temperatures (knn:
    n × len(temperatures)) and λ (`knnlm.knn.perplexities`: every λ of a temperature at once)."""
    best = (np.inf, np.nan, np.nan, 0)
    for j, t in enumerate(temperatures):
        for lam, ppl in zip(LAMBDAS, perplexities(lm, knn[:, j], list(LAMBDAS))):
            if ppl < best[0]:
                best = (ppl, float(t), lam, j)
    ppl, t, lam, j = best
    return ppl, t, lam, interpolate(lm, knn[:, j], lam)


def sample_positions(n_evaluated: int, tokens: int) -> np.ndarray:
    """`tokens` evenly spaced positions of an evaluated split of n_evaluated tokens (all of them if fewer)."""
    return np.unique(np.linspace(0, n_evaluated - 1, min(tokens, n_evaluated)).round().astype(np.int64))


def k_depth(run: Path, tokens: int, temperatures=TEMPERATURES, keep_logprobs: bool = False,
            progress: bool = True) -> dict:
    """The k-depth record of one evaluated run (see the module's docstring): per k, [perplexity, temperature, λ]
    tuned at that k, and the perplexity at temperature 1 (λ tuned), on `tokens` evenly spaced valid tokens.
    `keep_logprobs`: also "mixed_logprobs", {k: the tokens' log-probabilities at that k's choice}."""
    run, valid = Path(run), Path(run) / "eval" / "valid"
    need = [run / "datastore" / "keys.npy", run / "datastore" / "vals.npy",
            *(valid / f"{a}.npy" for a in ("query_keys", "targets", "lm_logprobs"))]
    if missing := [str(p) for p in need if not p.is_file()]:
        raise UserError(f"k depth: {missing[0]} is missing (an evaluated run with its datastore is needed)")
    keys = np.load(need[0], mmap_mode="r")
    vals = np.load(need[1], mmap_mode="r")
    targets_all = np.load(need[3], mmap_mode="r")
    sel = sample_positions(len(targets_all), tokens)
    queries = np.asarray(np.load(need[2], mmap_mode="r")[sel], dtype=np.float32)
    targets = np.asarray(targets_all[sel])
    lm = np.asarray(np.load(need[4], mmap_mode="r")[sel], dtype=np.float64)
    ks = depth_ks(len(keys))
    t0 = time.time()
    knn = all_keys_logprobs(np.asarray(keys), np.asarray(vals), queries, targets, ks, temperatures, progress=progress)
    t1 = list(temperatures).index(1.0) if 1.0 in temperatures else None
    by_k, t1_by_k, mixed = {}, {}, {}
    for i, k in enumerate(ks):
        *by_k[str(k)], mixed[str(k)] = best_choice(lm, knn[:, :, i], temperatures)
        if t1 is not None:
            t1_by_k[str(k)] = best_choice(lm, knn[:, t1 : t1 + 1, i], [1.0])[0]
    best = min(by_k, key=lambda k: by_k[k][0])
    return {**({"mixed_logprobs": mixed} if keep_logprobs else {}), "tokens": int(len(sel)),
            "of_evaluated_tokens": int(len(targets_all)), "datastore_size": int(len(keys)),
            "lm_ppl": float(np.exp(-lm.mean())), "temperatures": list(temperatures), "by_k": by_k, "t1_by_k": t1_by_k,
            "best_k": int(best), "seconds": time.time() - t0, "cpu": cpu_name()}

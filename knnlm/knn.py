"""The kNN-LM's mathematics: the kNN distribution p_kNN from a search's answers, and its interpolation with the LM.

p_kNN: with d the squared distance of each of a query's k nearest stored keys and w the token that followed it,
p_kNN(w) = Σ_{neighbours with value w} softmax(−d / temperature). Evaluation needs only the target's probability,
O(N·k), never a vector over the vocabulary (`knn_logprob`, `knn_logprob_grid`); next-token distributions
(`knnlm.api`) need the whole vector, (B, V) (`knn_logprobs_full`). The search that finds the neighbours lives in
`knnlm.search`.

Shapes: n tokens (one query each), K neighbours stored per token, k of them used, B queries, V vocabulary.
"""

from __future__ import annotations

import math

import numpy as np
import torch


# The smallest exponent the p_kNN grid's exps are given. exp(−708) ≈ 3.3e-308 is about the smallest normal double;
# below it exp makes a subnormal or 0 by a slower path (raised to it, the grid runs 1.34× faster on a Zen 3). Every
# sum those terms enter also holds the nearest neighbour's term exp(0) = 1 (the running totals; a target's sum, its
# nearest match's), so raising them to 3.3e-308 moves a sum ≥ 1 by at most K·3.3e-308, far under its half ulp
# (1.1e-16): the log-probabilities are as without it (the same to the bit on a saved WikiText-2 search,
# `benchmarks/tuning_step.py`).
MIN_EXPONENT = -708.0


def knn_logprob(distances: np.ndarray, neighbor_vals: np.ndarray, targets: np.ndarray, k: int, temperature: float) -> np.ndarray:
    """log p_kNN(target) per token: (n, K) distances, (n, K) neighbour values, (n,) targets -> (n,) float64.

    Uses the k nearest of the K stored neighbours; −inf where no neighbour carries the target.
    """
    return knn_logprob_grid(distances, neighbor_vals, targets, [k], [temperature])[(k, temperature)]


def knn_logprob_grid(distances: np.ndarray, neighbor_vals: np.ndarray, targets: np.ndarray, ks: list[int],
                     temperatures: list[float], rows: int = 0, device: torch.device | str = "cpu",
                     min_exponent: float | None = MIN_EXPONENT) -> dict[tuple[int, float], np.ndarray]:
    """`knn_logprob` for every (k, temperature) of a grid, reading the neighbours once per temperature.

    Neighbours come sorted by distance, so the sums over the first k of every k in the grid are running sums:
        log p_kNN = log Σ_{matching j<k} exp((d_m − d_j)/τ) − log Σ_{j<k} exp((d_0 − d_j)/τ) + (d_0 − d_m)/τ
    with d_0 the nearest distance and d_m the nearest matching one, so every exp is ≤ 1 and the sums ≥ 1 where
    they are not empty (no overflow, no underflow of the leading term). Rows are processed in blocks of `rows`
    (default: about 8 MB of float64 distances). Exponents below `min_exponent` are raised to it (`MIN_EXPONENT`;
    None: not), which leaves every sum as it was (see there) and the exps several times faster.
    """
    ks = sorted(set(ks))
    K, n = ks[-1], len(targets)
    if K > distances.shape[1]:
        raise ValueError(f"k = {K} is more than the {distances.shape[1]} stored neighbours")
    out = {(k, tau): np.empty(n) for k in ks for tau in temperatures}
    bounds = [0, *ks]
    device = torch.device(device)
    k_ends = torch.tensor(ks, device=device)
    rows = rows or max(1, (2**24 if device.type == "cuda" else 2**20) // K)  # ~8 MB blocks on a CPU: faster than one block or tiny ones
    for lo in range(0, n, rows):
        d = torch.from_numpy(np.array(distances[lo : lo + rows, :K], dtype=np.float64)).to(device)  # (r, K), a copy
        if bool((d[:, 1:] < d[:, :-1]).any()):
            raise ValueError("neighbour distances must be sorted in ascending order")
        # (r, K): which neighbours carry the target
        match = torch.from_numpy(np.asarray(neighbor_vals[lo : lo + rows, :K]) == targets[lo : lo + rows, None]).to(device)
        first = match.to(torch.uint8).argmax(1, keepdim=True)  # nearest matching column (0 if none)
        d0, dm = d[:, :1], d.gather(1, first)  # (r, 1) each
        gap = d0 - d  # ≤ 0
        # the matching neighbours are a few of the K: their terms are taken one by one (row, column), each added
        # into its row's bucket of columns [k_{i-1}, k_i), instead of an exp over every column of a masked copy
        r, c = match.nonzero(as_tuple=True)
        gap_match = dm[r, 0] - d[r, c]  # ≤ 0
        slot = r * len(ks) + torch.searchsorted(k_ends, c, right=True)
        buf = torch.empty_like(d)
        for tau in temperatures:
            torch.div(gap, tau, out=buf)
            if min_exponent is not None:
                buf.clamp_(min=min_exponent)
            buf.exp_()
            # (r, len(ks)): running sums over the columns [0, k) of every k of the grid
            total = torch.stack([buf[:, a:b].sum(1) for a, b in zip(bounds, bounds[1:])], 1).cumsum_(1)
            hit = d.new_zeros(len(d) * len(ks)).index_add_(0, slot, (gap_match / tau).exp_()).view(len(d), -1).cumsum_(1)
            logp = (torch.log(hit) - torch.log(total) + (d0 - dm) / tau).cpu()  # log 0 = −inf: no match among the first k
            for i, k in enumerate(ks):
                out[(k, tau)][lo : lo + rows] = logp[:, i].numpy()
    return out


class KnnScores:
    """What tuning reads of one split's search: log p_kNN(target) of each token at any k (up to the K neighbours
    stored) and any temperature, from the neighbours' distances (n, K), sorted, their values (n, K) and the
    targets (n,). Arrays may be memory maps: they are read a block of rows at a time."""

    def __init__(self, distances: np.ndarray, values: np.ndarray, targets: np.ndarray):
        self.distances, self.values, self.targets = distances, values, targets

    def __len__(self) -> int:
        return len(self.targets)

    @property
    def stored(self) -> int:
        """Neighbours stored per token: the largest k these scores answer for."""
        return self.distances.shape[1]

    def rows(self, lo: int, hi: int) -> KnnScores:
        """The scores of tokens [lo, hi) (e.g. one half of valid)."""
        return KnnScores(self.distances[lo:hi], self.values[lo:hi], self.targets[lo:hi])

    def at(self, pairs: list[tuple[int, float]],
           device: torch.device | str = "cpu") -> dict[tuple[int, float], np.ndarray]:
        """{(k, temperature): log p_kNN (n,)} for each pair, in one pass over the neighbours (`knn_logprob_grid`)."""
        grid = knn_logprob_grid(self.distances, self.values, self.targets, sorted({k for k, _ in pairs}),
                                sorted({t for _, t in pairs}), device=device) if pairs else {}
        return {p: grid[p] for p in pairs}

    def logprob(self, k: int, temperature: float) -> np.ndarray:
        """log p_kNN (n,) at one setting."""
        return knn_logprob(self.distances, self.values, self.targets, k, temperature)

    def target_in_neighbors(self, k: int) -> float:
        """Share of tokens whose target some neighbour among the k nearest carries."""
        return float((np.asarray(self.values[:, :k]) == self.targets[:, None]).any(1).mean())

    def answers(self, k: int, temperature: float) -> bool:
        """Whether these scores hold (k, temperature)."""
        return 1 <= k <= self.stored


def grid_table(distances: np.ndarray, values: np.ndarray, targets: np.ndarray, ks: list[int],
               temperatures: list[float], device: torch.device | str = "cpu") -> tuple[np.ndarray, np.ndarray]:
    """What `KnnTable` keeps of a block of tokens' K neighbours: log p_kNN(target) at every (k, temperature) of a
    grid, (n, len(ks), len(temperatures)) float64 (`knn_logprob_grid`'s values, bit for bit), and the rank of each
    token's nearest neighbour that carries its target, (n,) int32 (K where none does)."""
    g = knn_logprob_grid(distances, values, targets, ks, temperatures, device=device)
    table = np.stack([np.stack([g[(k, tau)] for tau in temperatures], -1) for k in ks], 1)
    match = np.asarray(values) == np.asarray(targets)[:, None]
    rank = np.where(match.any(1), match.argmax(1), match.shape[1]).astype(np.int32)
    return table, rank


class KnnTable(KnnScores):
    """`KnnScores` of an evaluation that kept log p_kNN(target) at every (k, temperature) of its tuning grid
    (`grid_table`, from all k_max neighbours) but stored only the K nearest neighbours of each token: a whole split at
    a large k_max costs (n, |k|, |T|) numbers instead of (n, k_max) neighbours. Settings on the grid are read from the
    table; others are computed from the stored neighbours where k ≤ K."""

    def __init__(self, table: np.ndarray, ks: list[int], temperatures: list[float], rank: np.ndarray, k_max: int,
                 distances: np.ndarray, values: np.ndarray, targets: np.ndarray):
        super().__init__(distances, values, targets)
        self.table, self.ks, self.temperatures, self.rank, self.k_max = table, list(ks), list(temperatures), rank, k_max
        self._k, self._t = {k: i for i, k in enumerate(self.ks)}, {t: j for j, t in enumerate(self.temperatures)}

    @property
    def stored(self) -> int:
        return self.k_max

    def rows(self, lo: int, hi: int) -> KnnTable:
        return KnnTable(self.table[lo:hi], self.ks, self.temperatures, self.rank[lo:hi], self.k_max,
                        self.distances[lo:hi], self.values[lo:hi], self.targets[lo:hi])

    def answers(self, k: int, temperature: float) -> bool:
        return (k in self._k and temperature in self._t) or 1 <= k <= self.distances.shape[1]

    def logprob(self, k: int, temperature: float) -> np.ndarray:
        if k in self._k and temperature in self._t:
            return np.asarray(self.table[:, self._k[k], self._t[temperature]], dtype=np.float64)
        if not self.answers(k, temperature):
            raise ValueError(f"k = {k} at temperature {temperature:g}: not in the saved grid, and more than the "
                             f"{self.distances.shape[1]} neighbours stored")
        return super().logprob(k, temperature)

    def at(self, pairs: list[tuple[int, float]],
           device: torch.device | str = "cpu") -> dict[tuple[int, float], np.ndarray]:
        off = [p for p in pairs if not (p[0] in self._k and p[1] in self._t)]
        if bad := [p for p in off if not self.answers(*p)]:
            raise ValueError(f"(k, temperature) = {bad[0]}: not in the saved grid, and k is more than the "
                             f"{self.distances.shape[1]} neighbours stored")
        extra = super().at(off, device)
        return {p: extra[p] if p in extra else self.logprob(*p) for p in pairs}

    def target_in_neighbors(self, k: int) -> float:
        return float((self.rank < k).mean())


def knn_logprobs_full(distances: np.ndarray, neighbor_vals: np.ndarray, vocab_size: int,
                      temperature: float) -> torch.Tensor:
    """log p_kNN(w) for every w of the vocabulary: (B, k) distances, (B, k) neighbour values -> (B, V) float64;
    −inf for the tokens no neighbour carries. A value of −1 (a padded answer, `datastore.neighbour_values`) counts as
    no neighbour."""
    w = torch.softmax(-torch.from_numpy(np.asarray(distances)).double() / temperature, 1)  # (B, k)
    vals = torch.from_numpy(np.asarray(neighbor_vals).astype(np.int64))  # (B, k)
    pad = vals < 0
    w, vals = w.masked_fill(pad, 0.0), vals.masked_fill(pad, 0)
    p = torch.zeros((len(w), vocab_size), dtype=torch.float64).scatter_add_(1, vals, w)  # (B, V)
    return p.log()


def interpolate(lm_logprob: np.ndarray, knn_lp: np.ndarray, lmbda: float) -> np.ndarray:
    """log(λ p_kNN + (1 − λ) p_LM) in log space; λ = 0 returns the LM's log-probabilities exactly."""
    if lmbda == 0:
        return lm_logprob.astype(np.float64)
    if lmbda == 1:
        return knn_lp.astype(np.float64)
    return np.logaddexp(math.log(lmbda) + knn_lp, math.log1p(-lmbda) + lm_logprob.astype(np.float64))


def perplexity(logprobs: np.ndarray) -> float:
    return float(np.exp(-np.mean(logprobs, dtype=np.float64)))


def perplexities(lm_logprob: np.ndarray, knn_lp: np.ndarray, lambdas: list[float], rows: int = 2**18) -> list[float]:
    """`perplexity(interpolate(lm, knn, λ))` for every λ at once: with m = max(lm, knn) per token,
    log(λ p_kNN + (1 − λ) p_LM) = m + log(λ e^{knn − m} + (1 − λ) e^{lm − m}), two exps a token for the whole list
    and one log per λ, instead of a logaddexp per λ (a tuning grid has 21 λ). λ = 0 and 1 take `interpolate`'s
    exact path."""
    lm64 = torch.from_numpy(np.asarray(lm_logprob, dtype=np.float64))
    knn64 = torch.from_numpy(np.asarray(knn_lp, dtype=np.float64))
    inner = [lam for lam in lambdas if 0 < lam < 1]
    sums = torch.zeros(len(inner), dtype=torch.float64)
    if inner:
        lam = torch.tensor(inner, dtype=torch.float64)[:, None]
        for lo in range(0, len(lm64), rows):  # ~40 MB of float64 at a time for 21 λ
            lm, knn = lm64[lo : lo + rows], knn64[lo : lo + rows]
            m = torch.maximum(lm, knn)  # the LM's log-probability is finite, so m is
            a, b = (knn - m).exp(), (lm - m).exp()
            sums += torch.log(lam * a + (1 - lam) * b).sum(1) + m.sum()
    n, out, it = len(lm64), [], iter(sums.tolist())
    for lam in lambdas:
        out.append(perplexity(interpolate(lm_logprob, knn_lp, lam)) if lam in (0, 1) else math.exp(-next(it) / n))
    return out

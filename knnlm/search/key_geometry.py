"""What the searches learn from a store's keys before searching: a centering vector, principal directions, how many
of them hold most of the variance; and a synthetic store shaped like LM keys, for calibration, tests and benchmarks.

Shapes: N stored keys of d dimensions, m principal directions.
"""

from __future__ import annotations

import numpy as np
import torch


def centering_vector(keys: np.ndarray, rows: int = 65536) -> torch.Tensor:
    """The mean of up to `rows` evenly spaced keys, fp32 (d,): what the low-precision searches subtract from keys
    and queries. Any vector leaves distances unchanged; one near the mean makes the vectors, and so their rounding
    errors, small. A sample spares a second pass over a large store."""
    step = max(1, len(keys) // rows)
    return torch.from_numpy(np.asarray(keys[::step], dtype=np.float64).mean(0).astype(np.float32))


def max_norm_bound(x: torch.Tensor) -> float:
    """An upper bound of the largest row norm of x (n, d), from fp32 norms: an fp32 sum of d squares is within
    γ_d = d u/(1 − d u) of the exact sum, in any order (u = 2^-24), and the square root adds u, so the exact norm is
    at most the computed one times (1 + u)/sqrt(1 − γ_d) < 1 + (d + 2) u; the factor used is twice that excess.
    What the pruned searches' rounding bounds need, without a float64 copy of every block (several times slower)."""
    if len(x) == 0:
        return 0.0
    computed = float(torch.linalg.vector_norm(x.float(), dim=1).max())
    return computed * (1 + 2 * (x.shape[1] + 2) * 2.0**-24)


def principal_directions(keys: np.ndarray, mean: torch.Tensor, m: int, rows: int = 65536) -> torch.Tensor:
    """An orthonormal basis (d, m) fp32 of the m directions in which up to `rows` evenly spaced keys vary most."""
    step = max(1, len(keys) // rows)
    x = torch.from_numpy(np.asarray(keys[::step], dtype=np.float64)) - mean.double()
    _, vectors = torch.linalg.eigh(x.T @ x)  # ascending eigenvalues
    return vectors[:, -m:].flip(1).float().contiguous()


def variance_dims(keys: np.ndarray, share: float = 0.9, rows: int = 65536, multiple: int = 16) -> tuple[int, float]:
    """The fewest principal directions (a multiple of `multiple`, at most d) that hold `share` of the keys' variance
    about their mean, measured on up to `rows` evenly spaced keys; and the share they hold. Steep spectra (LM keys:
    64 of 256 directions hold 88 % on WikiText-2) need few; flat ones many, where pruning pays less."""
    d = keys.shape[1]
    step = max(1, len(keys) // rows)
    x = np.asarray(keys[::step], dtype=np.float64)
    x = x - x.mean(0)
    eig = np.linalg.eigvalsh(x.T @ x)[::-1].clip(min=0)  # descending
    held = np.cumsum(eig) / max(eig.sum(), 1e-300)
    m = int(np.searchsorted(held, share - 1e-12) + 1)
    m = min(d, -(-m // multiple) * multiple)
    return m, float(held[m - 1])


def project_dims(d: int) -> int:
    """How many principal directions the pruned search projects onto: all of a small d; a quarter of a large one
    (at least 64). On WikiText-2's keys (d = 256) 64 directions hold 88 % of the variance, and the projected bound
    leaves about 0.5 % of the keys to test exactly at k = 1024."""
    return d if d <= 64 else max(64, d // 4)


def staged_dims(m: int) -> int:
    """How many of m projected directions a staged scan tests first (0: too few to split): half of them, at least 8,
    even. Whether the staged scan pays on a store is `auto`'s probe's to say (it times both)."""
    first = max(8, m // 2 // 2 * 2)
    return first if first < m else 0


def lm_like_keys(n: int, d: int = 256, rank: int = 32, seed: int = 0, chunk: int = 262144) -> np.ndarray:
    """A synthetic float16 store (n, d) shaped like LM activations: a large common offset, a few strong directions
    of very unequal scale (a random rank-`rank` Gaussian) and weak isotropic noise. For calibration and benchmarks."""
    rng = np.random.default_rng(seed)
    basis = rng.standard_normal((rank, d)).astype(np.float32) * np.exp(rng.uniform(-1.5, 1.5, (rank, 1)))
    offset = (4 + rng.standard_normal(d)).astype(np.float32)
    keys = np.empty((n, d), dtype=np.float16)
    for lo in range(0, n, chunk):
        m = min(chunk, n - lo)
        z = rng.standard_normal((m, rank), dtype=np.float32)
        keys[lo : lo + m] = offset + z @ basis / np.sqrt(rank) + 0.1 * rng.standard_normal((m, d), dtype=np.float32)
    return keys



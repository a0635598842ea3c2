"""knnlm's exact searches written with PyTorch ops, for GPUs (tensor cores); they run on CPUs too.

- `bf16-exact` (`TorchExactSearch`): low-precision products pick `k + margin` candidates, exact fp32 distances
  re-rank them; what `auto` picks on a GPU.
- `bf16-pruned` (`TorchPrunedSearch`): the pruned search of the CPU kernels (`cpu_kernels.CpuExactSearch`), with
  the same proven bound; not yet measured on a GPU.

Shapes: n queries, N stored keys, d dimensions, m principal directions, b keys in a block, k neighbours,
C candidates per query.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ..distributed import default_device
from .base import exact_sq_distances, query_rows
from .key_geometry import centering_vector, max_norm_bound, principal_directions, project_dims


class TorchExactSearch:
    """Blocked exact search in PyTorch, for GPUs: low-precision candidate distances, exact fp32 re-ranking of
    `k + margin` candidates, everything on the device.

    The store is copied to the device twice, as float16 each (N × d × 2 bytes apiece): keys centered on a sampled
    mean and rounded to the product precision for the candidate pass (centering leaves distances unchanged and
    shrinks rounding errors with the norms), and the stored keys themselves, whose fp32 differences with the query
    give the exact distances of the re-ranking. Products take fp16 inputs on GPUs (tensor cores; 10 mantissa bits
    against bf16's 7) and bf16 on CPUs, and are summed and returned in fp32 (`product_fp32`); fp16 falls back to fp32
    where a product could overflow it (a PyTorch whose CUDA matmul has no fp32 output). On a CPU (`resident=False`, its default there) the
    re-ranking reads the candidates from the memory-mapped store instead of a second copy.
    """

    auto_reason: str | None = None  # set by `auto` (search/auto.py)

    def __init__(self, keys: np.ndarray, device: str | torch.device | None = None, block: int = 65536,
                 margin: int = 32, dtype: torch.dtype | None = None, resident: bool | None = None):
        self.device = torch.device(device) if device is not None else default_device()
        self.block, self.margin = block, margin
        self.dtype = dtype or (torch.float16 if self.device.type == "cuda" else torch.bfloat16)
        self.mean = centering_vector(keys)
        N, d = keys.shape
        resident = self.device.type == "cuda" if resident is None else resident
        self.kb = torch.empty((N, d), dtype=self.dtype, device=self.device)
        self.norms = torch.empty((N,), dtype=torch.float32, device=self.device)
        store_dtype = torch.from_numpy(np.empty(0, dtype=keys.dtype)).dtype  # float16 for a knnlm datastore
        self.keys = torch.empty((N, d), dtype=store_dtype, device=self.device) if resident else keys
        self.max_norm = 0.0
        mean = self.mean.to(self.device)
        for lo in range(0, N, block):  # one block of the (memory-mapped) store at a time
            raw = torch.from_numpy(np.array(keys[lo : lo + block])).to(self.device)  # a writable copy of the block
            if resident:
                self.keys[lo : lo + len(raw)] = raw
            x = raw.float() - mean
            self.max_norm = max(self.max_norm, float(x.norm(dim=1).max()))
            self.kb[lo : lo + len(raw)] = x.to(self.dtype)
            self.norms[lo : lo + len(raw)] = self.kb[lo : lo + len(raw)].float().pow(2).sum(1)  # of the rounded keys
        self.mean = mean

    def describe(self) -> str:
        return f"bf16-exact on {self.device}, margin (k + max({self.margin}, k/8) candidates re-ranked)"

    def search(self, queries: np.ndarray, k: int, rows: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """k nearest keys of each query; `rows` queries at a time (default: `query_rows`, sized to free memory), so
        that a (rows × block) fp32 distance block is the largest temporary: several searches can share one GPU."""
        rows = rows or query_rows(self.device, self.block)
        if len(queries) > rows:
            parts = [self.search(queries[lo : lo + rows], k, rows) for lo in range(0, len(queries), rows)]
            return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
        q = torch.from_numpy(np.asarray(queries, dtype=np.float32)).to(self.device)
        C = min(k + max(self.margin, k // 8), len(self.kb))
        qc = q - self.mean
        dtype = self.dtype
        if dtype == torch.float16 and float(qc.norm(dim=1).max()) * self.max_norm > 30000:
            dtype = torch.float32  # |q·k| could exceed fp16's range (65504)
        qb = qc.to(dtype)
        best_d = torch.full((len(q), 0), math.inf, device=self.device)
        best_i = torch.zeros((len(q), 0), dtype=torch.long, device=self.device)
        for lo in range(0, len(self.kb), self.block):
            kb = self.kb[lo : lo + self.block].to(dtype)
            approx = self.norms[lo : lo + len(kb)][None, :] - 2 * product_fp32(qb, kb)  # (n, b); ||q||² is constant
            d, i = approx.topk(min(C, approx.shape[1]), dim=1, largest=False)
            best_d, sel = torch.cat([best_d, d], 1).topk(min(C, best_d.shape[1] + d.shape[1]), dim=1, largest=False)
            best_i = torch.cat([best_i, i + lo], 1).gather(1, sel)
        exact = exact_sq_distances(q, self.keys, best_i)  # (n, C) fp32 from the stored fp16 values
        d, order = exact.topk(k, dim=1, largest=False)
        return d.cpu().numpy(), best_i.gather(1, order).cpu().numpy()


class TorchPrunedSearch:
    """The pruned exact search (`cpu_kernels.CpuExactSearch`'s, see there for the bound) in PyTorch, for GPUs:
    `bf16-pruned`. Resident on the device: the keys projected onto their m principal directions (fp16 on a GPU,
    bf16 on a CPU; N × m) with their fp32 norms, and the stored float16 keys (N × d) for exact distances.

    Per batch of queries: (1) a guess of each query's k-th distance, from approximate distances to every 16th key;
    (2) one pass over the store in blocks: projected scores (low-precision products summed in fp32), the keys whose
    bound could lie at or below the guess get their exact fp32 distance, those at or below the guess are kept;
    (3) each query's k nearest among them, ties by id. A query with fewer than k kept keys had a guess below its
    k-th distance and is searched again with the guess doubled. Every key that could be among the k nearest is
    tested, so the answer is exact on every query; the guess only sets how many keys are tested.
    """

    auto_reason: str | None = None  # set by `auto` (search/auto.py)

    SAMPLE = 16

    def __init__(self, keys: np.ndarray, device: str | torch.device | None = None, block: int = 65536,
                 dims: int | None = None):
        self.device = torch.device(device) if device is not None else default_device()
        self.block = block
        self.dtype = torch.float16 if self.device.type == "cuda" else torch.bfloat16
        self.unit = 2.0**-11 if self.dtype == torch.float16 else 2.0**-8  # the product inputs' unit roundoff
        N, self.d = keys.shape
        self.mean = centering_vector(keys)
        self.m = min(self.d, dims or project_dims(self.d))
        self.basis = principal_directions(keys, self.mean, self.m)
        self.kp = torch.empty((N, self.m), dtype=self.dtype, device=self.device)
        self.kp_norm = torch.empty((N,), dtype=torch.float32, device=self.device)
        self.keys = torch.empty((N, self.d), dtype=torch.float16, device=self.device)
        self.max_kp_norm = self.max_centered_norm = 0.0
        mean, basis = self.mean.to(self.device), self.basis.to(self.device)
        for lo in range(0, N, block):
            raw = torch.from_numpy(np.array(keys[lo : lo + block])).to(self.device)  # a writable copy of the block
            self.keys[lo : lo + len(raw)] = raw
            x = raw.float() - mean
            self.max_centered_norm = max(self.max_centered_norm, max_norm_bound(x))
            xp = (x @ basis).to(self.dtype)
            self.kp[lo : lo + len(raw)] = xp
            self.kp_norm[lo : lo + len(raw)] = xp.float().pow(2).sum(1)
            self.max_kp_norm = max(self.max_kp_norm, max_norm_bound(xp))
        self.mean, self.basis = mean, basis
        self.sample = torch.arange(0, N, self.SAMPLE, device=self.device)
        self.fallbacks = 0

    def describe(self) -> str:
        return f"bf16-pruned on {self.device} (keys projected onto {self.m} of {self.d} principal directions)"

    def search(self, queries: np.ndarray, k: int, rows: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """k nearest keys of each query, `rows` queries at a time (default: `query_rows`, sized to free memory; a
        rows × block fp32 score block is the largest temporary). `fallbacks`: how many queries needed a wider guess."""
        rows = rows or query_rows(self.device, self.block)
        if not 0 < k <= len(self.kp):
            raise ValueError(f"k: expected 1..{len(self.kp)}, got {k}")
        self.fallbacks = 0
        parts = [self._search_rows(queries[lo : lo + rows], k) for lo in range(0, len(queries), rows)]
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])

    def _search_rows(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        q = torch.from_numpy(np.asarray(queries, dtype=np.float32)).to(self.device)
        qc = q - self.mean
        qp = (qc @ self.basis).to(self.dtype)
        a = qp.double().norm(dim=1)
        u = self.unit / (1 - self.unit)
        gamma_d, gamma_m = (self.d + 4) * 2.0**-24, 2 * (self.m + 4) * 2.0**-24
        b = self.max_kp_norm
        sqrt_slack = u * (a + b) + gamma_d * self.m**0.5 * (qc.double().norm(dim=1) + self.max_centered_norm)
        add_slack = gamma_m * (a + b) ** 2 + 1e-30
        guess = self._guess(q, k)
        D = torch.full((len(q), k), math.inf, device=self.device)
        I = torch.full((len(q), k), -1, dtype=torch.long, device=self.device)
        todo, first = torch.arange(len(q), device=self.device), True
        while len(todo):
            # the projected score below which a key could lie at or below the guess (cpu_kernels.CpuExactSearch.bounds)
            r = torch.sqrt(guess[todo].double() * (1 + 1e-4)) + sqrt_slack[todo]
            score_thr = (r * r + add_slack[todo] - a[todo] ** 2).float()
            score_thr = torch.nextafter(score_thr, torch.full_like(score_thr, math.inf))  # rounded up, never tighter
            d, i, found = self._pass(q[todo], qp[todo], score_thr, guess[todo], k)
            done = found >= k
            D[todo[done]], I[todo[done]] = d[done], i[done]
            todo = todo[~done]
            self.fallbacks += len(todo) if first else 0
            first = False
            guess[todo] = guess[todo] * 2 + 1  # too small for these queries: wider, until k keys are within it
        return D.cpu().numpy(), I.cpu().numpy()

    def _guess(self, q: torch.Tensor, k: int) -> torch.Tensor:
        """Each query's guessed k-th distance: the ks-th smallest approximate (fp32 norm-expansion) distance to every
        SAMPLE-th key, ks a little beyond k/SAMPLE; +inf where the sample is too small."""
        ks = math.ceil(1.5 * k / self.SAMPLE + 3 * math.sqrt(k / self.SAMPLE))
        if len(self.sample) < 4 * ks:
            return torch.full((len(q),), math.inf, device=self.device)
        best = torch.empty((len(q), 0), device=self.device)
        qn = q.pow(2).sum(1, keepdim=True)
        for lo in range(0, len(self.sample), self.block):
            x = self.keys[self.sample[lo : lo + self.block]].float()
            d = torch.cat([best, qn + x.pow(2).sum(1)[None] - 2 * q @ x.t()], 1)
            best = d.topk(min(ks, d.shape[1]), dim=1, largest=False).values
        return best[:, -1].clamp_min(0) * (1 + 1e-3)

    def _pass(self, q: torch.Tensor, qp: torch.Tensor, score_thr: torch.Tensor, guess: torch.Tensor, k: int,
              chunk: int = 262144) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One pass over the store: the k nearest of the keys whose exact distance is at or below each query's guess
        ((n, k) distances and ids, +inf/-1 past the end), and how many such keys each query has."""
        qs, ids, ds = [], [], []
        for lo in range(0, len(self.kp), self.block):
            scores = self.kp_norm[lo : lo + self.block][None] - 2 * product_fp32(qp, self.kp[lo : lo + self.block], True)
            qi, ki = (scores < score_thr[:, None]).nonzero(as_tuple=True)
            for c in range(0, len(qi), chunk):  # exact fp32 distances of the survivors, a chunk of pairs at a time
                a, b = qi[c : c + chunk], ki[c : c + chunk] + lo
                d = (self.keys[b].float() - q[a]).pow(2).sum(1)
                keep = d <= guess[a]
                qs.append(a[keep]), ids.append(b[keep]), ds.append(d[keep])
        n = len(q)
        qi, ki, d = (torch.cat(x) if x else torch.empty(0, dtype=t, device=self.device)
                     for x, t in ((qs, torch.long), (ids, torch.long), (ds, torch.float32)))
        found = torch.bincount(qi, minlength=n)
        for key in range(3):  # stable sorts, least significant first: by query, then distance, then id
            order = torch.argsort((ki, d, qi)[key], stable=True)
            qi, ki, d = qi[order], ki[order], d[order]
        rank = torch.arange(len(qi), device=self.device) - (torch.cumsum(found, 0) - found)[qi]
        sel = rank < k
        D = torch.full((n, k), math.inf, device=self.device)
        I = torch.full((n, k), -1, dtype=torch.long, device=self.device)
        D[qi[sel], rank[sel]], I[qi[sel], rank[sel]] = d[sel], ki[sel]
        return D, I, found


def product_fp32(a: torch.Tensor, b: torch.Tensor, strict: bool = False) -> torch.Tensor:
    """a @ b.T of low-precision inputs with the products summed and returned in fp32. A plain half-precision matmul
    returns its result rounded to half precision (2^-8 relative for bf16): that rounding, not the inputs', is what
    can swap near neighbours. CUDA multiplies with fp32 output (`out_dtype`); elsewhere the inputs are upcast.
    Where a PyTorch has no `out_dtype` for CUDA, `strict` upcasts too (a proven bound needs fp32 sums); otherwise
    the half-precision product is taken, rounded."""
    if a.device.type == "cuda" and a.dtype != torch.float32:
        try:
            return torch.mm(a, b.t(), out_dtype=torch.float32)
        except (TypeError, RuntimeError, NotImplementedError):  # a PyTorch without out_dtype for this device
            return a.float() @ b.float().t() if strict else (a @ b.t()).float()
    return a.float() @ b.float().t()


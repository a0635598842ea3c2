"""Nearest-neighbour search over the datastore, and the kNN distribution p_kNN.

Search backends, one interface (`search(queries, k) -> (distances, ids)`, squared L2, nearest first):
- `amx-exact`: knnlm's exact search on CPUs with AMX (`fastsearch.py`): bf16 tile products with fp32 accumulation
  pick `k + margin` candidates per query, fused with the selection; exact fp32 distances re-rank them.
  about 9x FAISS Flat at k = 64 and 5x at k = 1024 on WikiText-2's 2.09M keys (`benchmarks/search.py`).
- `bf16-exact`: the same two passes written with PyTorch ops, for GPUs (tensor cores).
- `Flat`, `IVF4096,PQ32`, ... : any FAISS `index_factory` string (FAISS is imported here only);
  approximate indexes are re-ranked with exact distances read from the stored keys, as kNN-LM found helpful.
- `auto` (the default): `bf16-exact` on a GPU, `amx-exact` on a CPU that has AMX and a C++ compiler, else FAISS
  `Flat`.

p_kNN: with d the squared distance, p_kNN(w) = Σ_{neighbours with value w} softmax(−d / temperature).
Only the target's probability is computed, O(N·k), never a vector over the vocabulary.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from .artifacts import UserError
from .fastsearch import AmxExactSearch, available as amx_available, centering_vector


EXACT = ("Flat", "bf16-exact", "amx-exact")  # searches whose neighbours and distances are the exact ones


def resolve_index(name: str) -> str:
    name = name.strip()
    if name == "auto":
        return "bf16-exact" if torch.cuda.is_available() else "amx-exact" if amx_available() else "Flat"
    if name == "amx-exact" and not amx_available():
        raise UserError("eval.index: 'amx-exact' needs a CPU with AMX (amx_bf16) and a C++ compiler; use 'auto' or 'Flat'")
    return name


def exact_sq_distances(queries: torch.Tensor, keys: np.ndarray, ids: torch.Tensor) -> torch.Tensor:
    """Exact fp32 squared L2 distances between each query (n, d) and its candidate rows ids (n, C) of keys."""
    cand = torch.from_numpy(np.asarray(keys[ids.reshape(-1).numpy()], dtype=np.float32)).view(*ids.shape, -1)
    return (cand - queries[:, None, :]).pow(2).sum(-1)


class TorchExactSearch:
    """Blocked search in PyTorch, for GPUs: low-precision candidate distances, exact fp32 re-ranking of `k + margin`.

    Products are fp16 on GPUs (tensor cores; 10 mantissa bits in and out, against bf16's 7, since PyTorch returns a
    half-precision product in half precision) and bf16 on CPUs; keys are centered on a sampled mean first, which
    leaves distances unchanged and shrinks rounding errors with the norms. fp16 falls back to fp32 where a product
    could overflow it."""

    def __init__(self, keys: np.ndarray, device: str | None = None, block: int = 65536, margin: int = 32,
                 dtype: torch.dtype | None = None):
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.keys = keys  # (N, d) float16, memory-mapped: the exact values for re-ranking
        self.block, self.margin = block, margin
        self.dtype = dtype or (torch.float16 if self.device.type == "cuda" else torch.bfloat16)
        self.mean = centering_vector(keys)
        kb, norms, self.max_norm = [], [], 0.0
        for lo in range(0, len(keys), block):  # one block of the (memory-mapped) store in fp32 at a time
            x = torch.from_numpy(np.asarray(keys[lo : lo + block], dtype=np.float32)) - self.mean
            self.max_norm = max(self.max_norm, float(x.norm(dim=1).max()))
            kb.append(x.to(self.dtype))  # 2 bytes per dimension in memory
            norms.append(kb[-1].float().pow(2).sum(1))  # of the rounded keys the products use
        self.kb = torch.cat(kb).to(self.device)  # (N, d)
        self.norms = torch.cat(norms).to(self.device)  # (N,)
        self.mean = self.mean.to(self.device)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
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
            approx = self.norms[lo : lo + len(kb)][None, :] - 2 * (qb @ kb.t()).float()  # (n, b); ||q||² is constant
            d, i = approx.topk(min(C, approx.shape[1]), dim=1, largest=False)
            best_d, sel = torch.cat([best_d, d], 1).topk(min(C, best_d.shape[1] + d.shape[1]), dim=1, largest=False)
            best_i = torch.cat([best_i, i + lo], 1).gather(1, sel)
        exact = exact_sq_distances(q.cpu(), self.keys, best_i.cpu())  # (n, C) fp32 from the stored fp16 keys
        d, order = exact.topk(k, dim=1, largest=False)
        return d.numpy(), best_i.cpu().gather(1, order).numpy()


class FaissSearch:
    """A FAISS index built from an `index_factory` string, for stores of any size.

    Approximate indexes (IVF, PQ, ...) are trained on a random sample of the keys and filled chunk by chunk from the
    memory-mapped store, so memory holds the index plus one chunk, never the keys. Their answers are re-ranked with
    exact distances read from the stored keys: `rerank_factor * k` candidates are fetched and the k nearest kept.
    With `faiss-gpu` installed and a GPU present, the index is searched on all GPUs.
    """

    def __init__(self, keys: np.ndarray, factory: str, nprobe: int = 32, train_size: int = 262144, chunk: int = 262144,
                 seed: int = 0, rerank_factor: int = 2, index=None):
        import faiss

        self.keys, self.factory, self.rerank_factor = keys, factory, rerank_factor
        self.exact = factory.strip() == "Flat"
        self.index = index if index is not None else self.build(keys, factory, train_size, chunk, seed)
        try:
            faiss.ParameterSpace().set_index_parameter(self.index, "nprobe", nprobe)
        except RuntimeError:
            pass  # not an IVF index
        if torch.cuda.is_available() and hasattr(faiss, "index_cpu_to_all_gpus"):
            self.index = faiss.index_cpu_to_all_gpus(self.index)

    @staticmethod
    def build(keys: np.ndarray, factory: str, train_size: int = 262144, chunk: int = 262144, seed: int = 0):
        import faiss

        N, d = keys.shape
        try:
            index = faiss.index_factory(d, factory, faiss.METRIC_L2)
        except RuntimeError as e:
            raise UserError(f"eval.index: FAISS cannot build {factory!r} ({str(e).splitlines()[0]})") from None
        if not index.is_trained:
            rng = np.random.default_rng(seed)
            sample = np.sort(rng.choice(N, size=min(N, train_size), replace=False))
            index.train(np.asarray(keys[sample], dtype=np.float32))
        for lo in range(0, N, chunk):
            index.add(np.asarray(keys[lo : lo + chunk], dtype=np.float32))
        return index

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        q = np.ascontiguousarray(queries, dtype=np.float32)
        if self.exact or self.rerank_factor == 0:  # Flat is exact; rerank_factor 0: the index's own distances
            return self.index.search(q, k)
        _, i = self.index.search(q, min(k * self.rerank_factor, self.index.ntotal))
        missing = i < 0  # an IVF probe that found fewer candidates pads with -1
        exact = exact_sq_distances(torch.from_numpy(q), self.keys, torch.from_numpy(np.where(missing, 0, i)))
        exact[torch.from_numpy(missing)] = math.inf
        d, order = exact.topk(k, dim=1, largest=False)
        return d.numpy(), np.take_along_axis(i, order.numpy(), 1)


def load_or_build_index(ds_folder: Path, keys: np.ndarray, factory: str, model_sha256: str, **build) -> object:
    """A trained, filled approximate index for a datastore, saved under DATASTORE/indexes/ and reused.

    Building IVF-PQ over a large store takes hours: it is written once (FAISS's own format, no pickle) with a
    meta.json naming the factory string and the datastore it indexes, and read back on later evaluations."""
    import faiss

    from .artifacts import atomic_dir, read_json, write_json

    folder = Path(ds_folder) / "indexes" / "".join(c if c.isalnum() else "_" for c in factory)
    meta_path = folder / "meta.json"
    if meta_path.is_file():
        meta = read_json(meta_path, "index meta")
        if meta.get("factory") == factory and meta.get("model_sha256") == model_sha256 and meta.get("N") == len(keys):
            return faiss.read_index(str(folder / "index.faiss"))
    t0 = time.time()
    index = FaissSearch.build(keys, factory, **build)
    with atomic_dir(folder) as tmp:
        faiss.write_index(index, str(tmp / "index.faiss"))
        write_json(tmp / "meta.json", {"factory": factory, "N": len(keys), "d": keys.shape[1],
                                       "model_sha256": model_sha256, "seconds": time.time() - t0})
    return index


def make_searcher(keys: np.ndarray, index: str, nprobe: int = 32, ds_folder: Path | None = None,
                  model_sha256: str = "", rerank_factor: int = 2):
    """The searcher an `eval.index` string names; approximate FAISS indexes are cached beside the datastore.
    `rerank_factor` 0 keeps an approximate index's own (e.g. PQ) distances."""
    name = resolve_index(index)
    if name == "bf16-exact":
        return TorchExactSearch(keys)
    if name == "amx-exact":
        return AmxExactSearch(keys)
    if name != "Flat" and ds_folder is not None:
        built = load_or_build_index(ds_folder, keys, name, model_sha256)
        return FaissSearch(keys, name, nprobe=nprobe, index=built, rerank_factor=rerank_factor)
    return FaissSearch(keys, name, nprobe=nprobe, rerank_factor=rerank_factor)


def search_all(searcher, queries: np.ndarray, k: int, batch: int = 4096, progress: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """k nearest rows for every query, in batches with a progress bar: distances (n, k) fp32, ids (n, k) int64."""
    n = len(queries)
    D = np.empty((n, k), dtype=np.float32)
    I = np.empty((n, k), dtype=np.int64)
    bar = tqdm(total=n, desc="search", unit="q", unit_scale=True, disable=not progress, dynamic_ncols=True)
    for lo in range(0, n, batch):
        D[lo : lo + batch], I[lo : lo + batch] = searcher.search(queries[lo : lo + batch], k)
        bar.update(min(batch, n - lo))
        SEARCHED[0] += min(batch, n - lo)
    bar.close()
    return D, I


SEARCHED = [0]  # queries sent to a search backend by this process: evaluation records it, benchmarks check it


def knn_logprob(distances: np.ndarray, neighbor_vals: np.ndarray, targets: np.ndarray, k: int, temperature: float) -> np.ndarray:
    """log p_kNN(target) per token: (n, K) distances, (n, K) neighbour values, (n,) targets -> (n,) float64.

    Uses the k nearest of the K stored neighbours; −inf where no neighbour carries the target.
    """
    return knn_logprob_grid(distances, neighbor_vals, targets, [k], [temperature])[(k, temperature)]


def knn_logprob_grid(distances: np.ndarray, neighbor_vals: np.ndarray, targets: np.ndarray, ks: list[int],
                     temperatures: list[float], rows: int = 0) -> dict[tuple[int, float], np.ndarray]:
    """`knn_logprob` for every (k, temperature) of a grid, reading the neighbours once per temperature.

    Neighbours come sorted by distance, so the sums over the first k of every k in the grid are running sums:
        log p_kNN = log Σ_{matching j<k} exp((d_m − d_j)/τ) − log Σ_{j<k} exp((d_0 − d_j)/τ) + (d_0 − d_m)/τ
    with d_0 the nearest distance and d_m the nearest matching one, so every exp is ≤ 1 and the sums ≥ 1 where
    they are not empty (no overflow, no underflow of the leading term). Rows are processed in blocks of `rows`
    (default: about 8 MB of float64 distances).
    """
    ks = sorted(set(ks))
    K, n = ks[-1], len(targets)
    if K > distances.shape[1]:
        raise ValueError(f"k = {K} is more than the {distances.shape[1]} stored neighbours")
    out = {(k, tau): np.empty(n) for k in ks for tau in temperatures}
    bounds = [0, *ks]
    rows = rows or max(1, 2**20 // K)  # blocks of ~8 MB per float64 array: faster than one block or tiny ones
    for lo in range(0, n, rows):
        d = torch.from_numpy(np.array(distances[lo : lo + rows, :K], dtype=np.float64))  # a writable copy
        if bool((d[:, 1:] < d[:, :-1]).any()):
            raise ValueError("neighbour distances must be sorted in ascending order")
        match = torch.from_numpy(np.asarray(neighbor_vals[lo : lo + rows, :K]) == targets[lo : lo + rows, None])
        first = match.to(torch.uint8).argmax(1, keepdim=True)  # nearest matching column (0 if none)
        d0, dm = d[:, :1], d.gather(1, first)
        gap = d0 - d  # ≤ 0
        gap_match = (dm - d).masked_fill_(~match, -math.inf)  # ≤ 0 where matching (columns before `first` do not)
        buf = torch.empty_like(d)
        for tau in temperatures:
            sums = []
            for g in (gap, gap_match):
                torch.div(g, tau, out=buf).exp_()
                sums.append(torch.stack([buf[:, a:b].sum(1) for a, b in zip(bounds, bounds[1:])], 1).cumsum_(1))
            total, hit = sums
            logp = torch.log(hit) - torch.log(total) + (d0 - dm) / tau  # log 0 = −inf: no match among the first k
            for i, k in enumerate(ks):
                out[(k, tau)][lo : lo + rows] = logp[:, i].numpy()
    return out


def interpolate(lm_logprob: np.ndarray, knn_lp: np.ndarray, lmbda: float) -> np.ndarray:
    """log(λ p_kNN + (1 − λ) p_LM) in log space; λ = 0 returns the LM's log-probabilities exactly."""
    if lmbda == 0:
        return lm_logprob.astype(np.float64)
    if lmbda == 1:
        return knn_lp.astype(np.float64)
    return np.logaddexp(math.log(lmbda) + knn_lp, math.log1p(-lmbda) + lm_logprob.astype(np.float64))


def perplexity(logprobs: np.ndarray) -> float:
    return float(np.exp(-np.mean(logprobs, dtype=np.float64)))

"""Nearest-neighbour search over the datastore, and the kNN distribution p_kNN.

Search backends, one interface (`search(queries, k) -> (distances, ids)`, squared L2, nearest first):
- `amx-exact`, `avx512-exact`, `avx2-exact`: knnlm's exact search on CPUs (`fastsearch.py`): the AVX kernels prune
  with a proven lower bound (keys projected onto their principal directions; only keys that could be among the k
  nearest get an exact distance), AMX picks `k + margin` candidates by bf16 products and re-ranks them exactly.
  On WikiText-2's 2.09M keys at k = 1024: `amx-exact` 5x FAISS Flat (Intel, 2 cores), `avx512-exact` 7x (AMD
  Zen 5, 2 cores) (`benchmarks/search.py`).
- `bf16-exact`: the margin search written with PyTorch ops, for GPUs (tensor cores); `bf16-pruned`: the pruned
  search in PyTorch (`TorchPrunedSearch`; not yet measured on a GPU, so not what `auto` picks).
- `Flat`, `IVF4096,PQ32`, ... : any FAISS `index_factory` string (FAISS is imported here only);
  approximate indexes are re-ranked with exact distances read from the stored keys, as kNN-LM found helpful.
- `ShardedSearch`: under `torchrun`, an exact search over a store split across the ranks (each rank holds and
  searches its share; the exact global k nearest are merged with a collective): a store larger than one GPU.
- `auto` (the default): over a datastore, the fastest of the exact searches this machine has on those keys at that
  k, chosen by a timed probe and remembered beside the datastore with its reason (`choose_exact_search`): on a CPU
  the first compiled kernel's pruned search (projected onto its default number of principal directions, and onto as
  many as hold 90 % of the keys' variance), its margin search and FAISS `Flat`; on a GPU `bf16-exact` and
  `bf16-pruned`. Without a datastore folder (`resolve_index`): `bf16-exact` on a GPU; on a CPU `amx-exact`, else
  `avx512-exact`, else `avx2-exact` where it was measured faster than FAISS `Flat` on synthetic keys; else `Flat`.

p_kNN: with d the squared distance, p_kNN(w) = Σ_{neighbours with value w} softmax(−d / temperature).
Only the target's probability is computed, O(N·k), never a vector over the vocabulary.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from .artifacts import UserError, atomic_dir, cpu_name, read_json, write_json
from .data import cache_root
from .distributed import collective_device, default_device, rank_and_world
from .fastsearch import (KERNELS, CpuExactSearch, available, best_kernel, centering_vector, cpu_flags, first_kernel,
                         principal_directions, project_dims, variance_dims)

CPU_EXACT = {k.index: k.name for k in KERNELS.values()}  # "avx512-exact" -> the "avx512" kernel
EXACT = ("Flat", "bf16-exact", "bf16-pruned", *CPU_EXACT)  # searches whose neighbours and distances are the exact ones


def resolve_index(name: str) -> str:
    name = name.strip()
    if name == "auto":
        if default_device().type == "cuda":
            return "bf16-exact"
        kernel = best_kernel()
        return KERNELS[kernel].index if kernel else "Flat"
    if name in CPU_EXACT and not available(CPU_EXACT[name]):
        kernel = KERNELS[CPU_EXACT[name]]
        missing = sorted(kernel.cpu_flags - cpu_flags())
        raise UserError(f"eval.index: {name!r} needs a CPU with {', '.join(sorted(kernel.cpu_flags))} and a C++ "
                        f"compiler" + (f" (this CPU lacks {', '.join(missing)})" if missing else "")
                        + "; use 'auto' or 'Flat'")
    return name


def exact_sq_distances(queries: torch.Tensor, keys: np.ndarray | torch.Tensor, ids: torch.Tensor,
                       chunk_bytes: int = 2**28) -> torch.Tensor:
    """Exact fp32 squared L2 distances between each query (n, d) and its candidate rows ids (n, C) of keys.

    `keys` is the store itself (a memory-mapped array, read on the CPU) or a copy of it on the queries' device (a
    tensor of the same values); queries are taken in chunks so the gathered candidates stay near `chunk_bytes`."""
    n, C = ids.shape
    d = keys.shape[1]
    out = torch.empty((n, C), dtype=torch.float32, device=queries.device)
    rows = max(1, chunk_bytes // max(1, C * d * 4))
    for lo in range(0, n, rows):
        idx = ids[lo : lo + rows]
        if isinstance(keys, torch.Tensor):
            cand = keys[idx.reshape(-1)].float().view(*idx.shape, d)
        else:
            cand = torch.from_numpy(np.asarray(keys[idx.reshape(-1).cpu().numpy()], dtype=np.float32)).view(*idx.shape, d)
            cand = cand.to(queries.device)
        out[lo : lo + rows] = (cand - queries[lo : lo + rows, None, :]).pow(2).sum(-1)
    return out


def query_rows(device: torch.device, block: int, share: float = 0.25, bytes_per_pair: int = 16,
               free: int | None = None) -> int:
    """How many queries a PyTorch search takes at a time: on a GPU, sized so that its (rows × block) temporaries
    (fp32 scores and what selection makes of them, `bytes_per_pair` in all) use at most `share` of the memory free
    now (several searches may share the GPU), between 64 and 16,384, a multiple of 64; 1,024 on a CPU."""
    if device.type != "cuda" and free is None:
        return 1024
    if free is None:
        free = torch.cuda.mem_get_info(device)[0]
    return int(min(16384, max(64, share * free // (block * bytes_per_pair) // 64 * 64)))


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
    """The pruned exact search (`fastsearch.CpuExactSearch`'s, see there for the bound) in PyTorch, for GPUs:
    `bf16-pruned`. Resident on the device: the keys projected onto their m principal directions (fp16 on a GPU,
    bf16 on a CPU; N × m) with their fp32 norms, and the stored float16 keys (N × d) for exact distances.

    Per batch of queries: (1) a guess of each query's k-th distance, from approximate distances to every 16th key;
    (2) one pass over the store in blocks: projected scores (low-precision products summed in fp32), the keys whose
    bound could lie at or below the guess get their exact fp32 distance, those at or below the guess are kept;
    (3) each query's k nearest among them, ties by id. A query with fewer than k kept keys had a guess below its
    k-th distance and is searched again with the guess doubled. Every key that could be among the k nearest is
    tested, so the answer is exact on every query; the guess only sets how many keys are tested.
    """

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
            self.max_centered_norm = max(self.max_centered_norm, float(x.double().norm(dim=1).max()))
            xp = (x @ basis).to(self.dtype)
            self.kp[lo : lo + len(raw)] = xp
            self.kp_norm[lo : lo + len(raw)] = xp.float().pow(2).sum(1)
            self.max_kp_norm = max(self.max_kp_norm, float(xp.double().norm(dim=1).max()))
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
            # the projected score below which a key could lie at or below the guess (fastsearch.CpuExactSearch.bounds)
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


def gpu_faiss(faiss) -> bool:
    """Whether this FAISS build can search on a GPU: faiss-cpu on a CUDA machine has the GPU names but no GPUs."""
    try:
        return faiss.get_num_gpus() > 0
    except AttributeError:
        return False


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
        if gpu_faiss(faiss):
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

    def describe(self) -> str:
        if self.exact:
            return "FAISS Flat"
        return f"FAISS {self.factory}" + (f", {self.rerank_factor}k candidates re-ranked exactly" if self.rerank_factor else "")

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        q = np.ascontiguousarray(queries, dtype=np.float32)
        if self.exact or self.rerank_factor == 0:  # Flat is exact; rerank_factor 0: the index's own distances
            return self.index.search(q, k)
        _, i = self.index.search(q, min(k * self.rerank_factor, self.index.ntotal))
        missing = i < 0  # an IVF probe that found fewer candidates pads with -1
        exact = exact_sq_distances(torch.from_numpy(q), self.keys, torch.from_numpy(np.where(missing, 0, i).astype(np.int64)))
        exact[torch.from_numpy(missing)] = math.inf
        d, order = exact.topk(k, dim=1, largest=False)
        return d.numpy(), np.take_along_axis(i, order.numpy(), 1)


def load_or_build_index(ds_folder: Path, keys: np.ndarray, factory: str, model_sha256: str, **build) -> object:
    """A trained, filled approximate index for a datastore, saved under DATASTORE/indexes/ and reused.

    Building IVF-PQ over a large store takes hours: it is written once (FAISS's own format, no pickle) with a
    meta.json naming the factory string and the datastore it indexes, and read back on later evaluations."""
    import faiss

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
    if name == "bf16-pruned":
        return TorchPrunedSearch(keys)
    if name in CPU_EXACT:
        return CpuExactSearch(keys, CPU_EXACT[name])
    if name != "Flat" and ds_folder is not None:
        built = load_or_build_index(ds_folder, keys, name, model_sha256)
        return FaissSearch(keys, name, nprobe=nprobe, index=built, rerank_factor=rerank_factor)
    return FaissSearch(keys, name, nprobe=nprobe, rerank_factor=rerank_factor)


def auto_candidates(keys: np.ndarray) -> dict[str, object]:
    """The exact searches `auto` chooses among on this machine, by name, each as a function that builds it: on a GPU
    the margin and pruned PyTorch searches; on a CPU the first compiled kernel's pruned search (projected onto its
    default number of principal directions, and onto as many as hold 90 % of the keys' variance), its margin search,
    and FAISS Flat."""
    if default_device().type == "cuda":
        return {"bf16-exact": lambda: TorchExactSearch(keys), "bf16-pruned": lambda: TorchPrunedSearch(keys)}
    out: dict[str, object] = {}
    kernel = first_kernel()
    if kernel is not None:
        index = KERNELS[kernel].index
        for m in sorted({project_dims(keys.shape[1]), variance_dims(keys)[0]}):
            out[f"{index}, pruned, m = {m}"] = lambda m=m: CpuExactSearch(keys, kernel, prune=True, dims=m)
        out[f"{index}, margin"] = lambda: CpuExactSearch(keys, kernel, prune=False)
    out["Flat"] = lambda: FaissSearch(keys, "Flat")
    return out


def probe_rate(searcher, queries: np.ndarray, k: int) -> float:
    """Queries per second of one search of `queries` (after a short warm-up)."""
    searcher.search(queries[: min(16, len(queries))], k)
    t = time.perf_counter()
    searcher.search(queries, k)
    return len(queries) / max(time.perf_counter() - t, 1e-9)


def choose_exact_search(keys: np.ndarray, k: int, folder: Path | None = None, model_sha256: str = "",
                        queries: int = 256, measure=probe_rate):
    """`eval.index = "auto"`: the fastest exact search on these keys at this k, chosen by a timed probe and
    remembered with the reason, e.g. "avx2-exact, pruned, m = 64: 1,180 q/s; margin 640; Flat 130 (64 directions
    hold 88 % of the variance)", in `folder` if given, else in knnlm's cache ($KNNLM_CACHE/ext), under a name made
    from the store's identity (model, N, d, k, CPU, threads, candidates); the evaluation records it too.

    Every candidate (`auto_candidates`) is built on the whole store and times one search of `queries` stored keys
    (evenly spaced: held-out text's queries look like them) at k; FAISS Flat is among them, so `auto` is never slower
    than Flat on the store it serves, up to the probe's noise. A record made for other keys, k, CPU or thread count
    is measured again."""
    k = min(k, len(keys))
    candidates = auto_candidates(keys)
    m_var, held = variance_dims(keys)
    identity = {"N": int(len(keys)), "d": int(keys.shape[1]), "model_sha256": model_sha256, "k": int(k),
                "candidates": sorted(candidates), "cpu": cpu_name(), "threads": torch.get_num_threads(),
                "device": default_device().type}
    # remembered in knnlm's cache (not in the datastore, an artifact with digests), keyed by everything it depends on
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
    record = (Path(folder) if folder is not None else cache_root() / "ext") / f"auto-search-{digest}.json"
    if record.is_file():
        saved = read_json(record, "auto search choice")
        if isinstance(saved, dict) and saved.get("identity") == identity and saved.get("choice") in candidates:
            chosen = candidates[saved["choice"]]()
            chosen.auto_reason = saved.get("reason", "")
            return chosen
    step = max(1, len(keys) // queries)
    probe = np.asarray(keys[::step][:queries], dtype=np.float32)
    rates, best, best_searcher = {}, None, None
    for name, build in candidates.items():
        searcher = build()
        rates[name] = measure(searcher, probe, k)
        if best is None or rates[name] > rates[best]:
            best, best_searcher = name, searcher
        del searcher
    others = "; ".join(f"{n} {r:,.0f}" for n, r in rates.items() if n != best)
    reason = (f"{best}: {rates[best]:,.0f} q/s; {others} (probe of {len(probe)} stored keys at k = {k}; "
              f"{m_var} principal directions hold {100 * held:.0f} % of the variance)")
    try:
        write_json(record, {"identity": identity, "choice": best, "queries_per_s": rates, "reason": reason})
    except OSError:
        pass  # a read-only cache: the choice is made again next time
    best_searcher.auto_reason = reason  # the evaluation's record keeps why (meta.json's "search_choice")
    return best_searcher


def shard_rows(n: int, rank: int, world: int) -> tuple[int, int]:
    """Rows [lo, hi) of an n-row store that rank `rank` of `world` holds: contiguous, sizes differing by at most 1."""
    return rank * n // world, (rank + 1) * n // world


def merge_nearest(distances: np.ndarray, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k nearest of several answers laid side by side ((n, m) each, m >= k), ordered by distance, then row id."""
    order = np.lexsort((ids, distances))[:, :k]  # along each row: distance first, the id breaking ties
    return np.take_along_axis(distances, order, 1), np.take_along_axis(ids, order, 1)


class ShardedSearch:
    """An exact search over a store split across the ranks of a process group (`torchrun`).

    Rank r holds rows `shard_rows(N, r, world)` of the store and its own searcher over them (`make_local(rows)`,
    any exact backend: `bf16-exact` on its GPU, a CPU kernel, FAISS Flat). Every rank searches the same queries in
    its shard; the (distance, global id) answers of all ranks are gathered and the k nearest of them kept. Since
    every key lies in exactly one shard, that is the exact k nearest over the whole store, and only the answers
    (n × k per rank), never keys, cross between processes. Every rank must call `search` with the same queries.
    """

    def __init__(self, keys: np.ndarray, make_local, rank: int | None = None, world: int | None = None):
        r, w = rank_and_world()
        self.rank, self.world = (r if rank is None else rank), (w if world is None else world)
        self.lo, self.hi = shard_rows(len(keys), self.rank, self.world)
        self.local = make_local(keys[self.lo : self.hi]) if self.hi > self.lo else None

    def describe(self) -> str:
        local = self.local.describe() if hasattr(self.local, "describe") else type(self.local).__name__
        return f"sharded over {self.world} ranks, each: {local}"

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        n, m = len(queries), min(k, self.hi - self.lo)
        d = np.full((n, k), np.inf, dtype=np.float32)  # a shard with fewer than k keys pads with (inf, -1)
        i = np.full((n, k), -1, dtype=np.int64)
        if m > 0:
            dl, il = self.local.search(queries, m)
            d[:, :m], i[:, :m] = dl, il + self.lo
        dev = collective_device()
        parts_d = [torch.empty((n, k), dtype=torch.float32, device=dev) for _ in range(self.world)]
        parts_i = [torch.empty((n, k), dtype=torch.int64, device=dev) for _ in range(self.world)]
        dist.all_gather(parts_d, torch.from_numpy(d).to(dev))
        dist.all_gather(parts_i, torch.from_numpy(i).to(dev))
        return merge_nearest(torch.cat(parts_d, 1).cpu().numpy(), torch.cat(parts_i, 1).cpu().numpy(), k)


def search_all(searcher, queries: np.ndarray, k: int, batch: int = 4096, progress: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """k nearest rows for every query, in batches with a progress bar: distances (n, k) fp32, ids (n, k) int64."""
    n = len(queries)
    D = np.empty((n, k), dtype=np.float32)
    I = np.empty((n, k), dtype=np.int64)
    bar = tqdm(total=n, desc="search", unit="q", unit_scale=True, disable=not progress, dynamic_ncols=True)
    for lo in range(0, n, batch):
        D[lo : lo + batch], I[lo : lo + batch] = searcher.search(queries[lo : lo + batch], k)
        bar.update(min(batch, n - lo))
    bar.close()
    return D, I


class CountingSearch:
    """A search backend that counts the queries sent to it (the evaluation records the count: one per token)."""

    def __init__(self, searcher):
        self.searcher, self.queries = searcher, 0

    def describe(self) -> str:
        return self.searcher.describe() if hasattr(self.searcher, "describe") else type(self.searcher).__name__

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        self.queries += len(queries)
        return self.searcher.search(queries, k)


def knn_logprob(distances: np.ndarray, neighbor_vals: np.ndarray, targets: np.ndarray, k: int, temperature: float) -> np.ndarray:
    """log p_kNN(target) per token: (n, K) distances, (n, K) neighbour values, (n,) targets -> (n,) float64.

    Uses the k nearest of the K stored neighbours; −inf where no neighbour carries the target.
    """
    return knn_logprob_grid(distances, neighbor_vals, targets, [k], [temperature])[(k, temperature)]


def knn_logprob_grid(distances: np.ndarray, neighbor_vals: np.ndarray, targets: np.ndarray, ks: list[int],
                     temperatures: list[float], rows: int = 0,
                     device: torch.device | str = "cpu") -> dict[tuple[int, float], np.ndarray]:
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
    device = torch.device(device)
    k_ends = torch.tensor(ks, device=device)
    rows = rows or max(1, (2**24 if device.type == "cuda" else 2**20) // K)  # ~8 MB blocks on a CPU: faster than one block or tiny ones
    for lo in range(0, n, rows):
        d = torch.from_numpy(np.array(distances[lo : lo + rows, :K], dtype=np.float64)).to(device)  # a writable copy
        if bool((d[:, 1:] < d[:, :-1]).any()):
            raise ValueError("neighbour distances must be sorted in ascending order")
        match = torch.from_numpy(np.asarray(neighbor_vals[lo : lo + rows, :K]) == targets[lo : lo + rows, None]).to(device)
        first = match.to(torch.uint8).argmax(1, keepdim=True)  # nearest matching column (0 if none)
        d0, dm = d[:, :1], d.gather(1, first)
        gap = d0 - d  # ≤ 0
        # the matching neighbours are a few of the K: their terms are taken one by one (row, column), each added
        # into its row's bucket of columns [k_{i-1}, k_i), instead of an exp over every column of a masked copy
        r, c = match.nonzero(as_tuple=True)
        gap_match = dm[r, 0] - d[r, c]  # ≤ 0
        slot = r * len(ks) + torch.searchsorted(k_ends, c, right=True)
        buf = torch.empty_like(d)
        for tau in temperatures:
            torch.div(gap, tau, out=buf).exp_()
            total = torch.stack([buf[:, a:b].sum(1) for a, b in zip(bounds, bounds[1:])], 1).cumsum_(1)
            hit = d.new_zeros(len(d) * len(ks)).index_add_(0, slot, (gap_match / tau).exp_()).view(len(d), -1).cumsum_(1)
            logp = (torch.log(hit) - torch.log(total) + (d0 - dm) / tau).cpu()  # log 0 = −inf: no match among the first k
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

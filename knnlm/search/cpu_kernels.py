"""knnlm's exact search on CPUs: low-precision products pick candidates, exact fp32 distances rank them.

FAISS's exact index (`IndexFlatL2`) runs at the fp32 matrix-product rate and spends much of a large-k search
keeping heaps. The kernels in `csrc/` fuse the passes that matter, in one of two ways (`CpuExactSearch`):

- pruned (the default of AVX-512 and AVX2; AMX has it, its default waits for a measurement): keys and queries projected onto the keys' m principal directions
  (m = 64 of d = 256), bf16 products with fp32 accumulation; a projected distance never exceeds the true one, so
  only keys whose projected distance, less a proven bound on the rounding, is below the query's running k-th exact
  distance get their exact distance (from the stored float16 keys). Exact on every query. Staged (`first`, the
  AVX-512 kernel): the first m1 directions' part of the projected distance is itself a lower bound, so each tile
  of 8 queries x 32 keys computes it first and carries on to all m only for the queries with a key below it.
- margin (AMX's default): bf16 products of the full vectors, filtered against each query's running threshold while still in
  registers; each query keeps its `k + margin` best candidates, which exact fp32 distances re-rank.

One kernel per instruction set, each its own shared library compiled with its own flags (`csrc/exact_search.h`
holds their common part: candidate buffers, threads, exact distances):
- `amx` (`amx-exact`): AMX tile products of bf16 keys and queries (Intel Sapphire Rapids and later);
- `avx512` (`avx512-exact`): AVX-512 BF16 dot products (`vdpbf16ps`) of bf16 keys and queries (AMD Zen 4 and
  later, Intel Cooper Lake);
- `avx2` (`avx2-exact`): fp32 FMAs of fp32 queries and bf16 keys widened to fp32 (any x86-64 CPU since 2013).

Keys and queries are centered on the (sampled) mean key before rounding to bf16 (distances do not change; rounding
errors shrink with the vectors' norms). `tests/test_knn.py` checks every search of every kernel against a float64
brute force, and `benchmarks/search.py` reports recall against FAISS and a float64 brute force.

A kernel is compiled on first use with the system's C++ compiler (about 2 s) and cached under `$KNNLM_CACHE/ext/`,
named by a digest of its sources and flags (`library_path`: an edit recompiles, a move does not); where the CPU lacks its instructions (/proc/cpuinfo) or there is no compiler, `available(kernel)` is False and
the registry (`registry.py`) uses another kernel or FAISS. `KNNLM_NO_AMX=1` (`KNNLM_NO_AVX512`, `KNNLM_NO_AVX2`) turns one off.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import json
import math
import os
import shutil
import subprocess
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..artifacts import UserError, cpu_name, cpuinfo_fields, write_json
from ..data import cache_root
from .faiss_index import faiss_installed, import_faiss
from .key_geometry import centering_vector, lm_like_keys, max_norm_bound, principal_directions, project_dims

CSRC = Path(__file__).with_name("csrc")
COMMON_FLAGS = ("-O3", "-std=c++17", "-shared", "-fPIC", "-pthread")


@dataclass(frozen=True)
class Kernel:
    """One compiled variant of the search: what it is built from and with, and what it needs of the CPU."""

    name: str  # "avx512": eval.index "avx512-exact", C functions knnlm_avx512_{init,search}
    source: str  # in csrc/, beside the shared exact_search.h
    flags: tuple[str, ...]  # instruction sets it is compiled for: only these, so each builds with its own
    cpu_flags: frozenset[str]  # what /proc/cpuinfo must report for the library to be loaded at all
    dim_multiple: int  # dimensions padded to a multiple of this (AMX tiles are 32 bf16 wide)
    bf16_queries: bool  # queries rounded to bf16 (AMX, AVX-512 BF16) or kept fp32 (AVX2)
    prune_by_default: bool  # the pruned search is the default (measured faster on LM keys: results/benchmarks/*/search.md)
    timed_against_flat: bool = False  # not faster than FAISS Flat everywhere: `auto` without a store checks first
    staged: bool = False  # has the staged pruned scan (a bound of the first directions before the rest: `first`)

    @property
    def index(self) -> str:
        return f"{self.name}-exact"


KERNELS = {k.name: k for k in (  # fastest first: `auto` takes the first one the CPU runs
    Kernel("amx", "amx_search.cpp", ("-mavx512f", "-mavx512bf16", "-mf16c", "-mamx-tile", "-mamx-bf16"),
           frozenset({"amx_tile", "amx_bf16", "avx512f", "avx512_bf16", "f16c"}), 32, True, True),
    Kernel("avx512", "avx512_search.cpp", ("-mavx512f", "-mavx512bw", "-mavx512bf16", "-mf16c", "-mfma"),
           frozenset({"avx512f", "avx512bw", "avx512_bf16", "f16c", "fma"}), 2, True, True, staged=True),
    Kernel("avx2", "avx2_search.cpp", ("-mavx2", "-mfma", "-mf16c"), frozenset({"avx2", "fma", "f16c"}), 2, False,
           True, timed_against_flat=True),
)}

# knnlm_<kernel>_search(queries, M, D, packed, norms, Np, qf32, keys16, N, Dx, k, C, nthreads, qblock, kchunk,
# out_d, out_i): one C signature for every kernel (exact_search.h, KNNLM_ENTRY_POINTS; tests/test_knn.py compares).
_p, _i64 = ctypes.c_void_p, ctypes.c_int64
SEARCH_ARGTYPES = (_p, _i64, _i64, _p, _p, _i64, _p, _p, _i64, _i64, _i64, _i64, ctypes.c_int, _i64, _i64, _p, _p)
# knnlm_<kernel>_pruned(queries, M, D, packed, norms, Np, qf32, keys16, N, Dx, k, qnorm2, sqrt_slack, add_slack,
# rel, norms_first, first_pairs, qnorm2_first, start, nthreads, qblock, kchunk, out_d, out_i): the pruned search.
PRUNED_ARGTYPES = (_p, _i64, _i64, _p, _p, _i64, _p, _p, _i64, _i64, _i64, _p, _p, _p, ctypes.c_double, _p, _i64, _p,
                   _p, ctypes.c_int, _i64, _i64, _p, _p)
BF16_UNIT = 2.0**-8  # bf16's unit roundoff (8 significant bits, round to nearest)
FP32_UNIT = 2.0**-24
# Keys converted, projected and packed this many at a time when a search is built: 16 MB of fp32 temporaries a block
# at d = 256. Blocks of 262,144 rows built the same stores 1.7-3.9x slower on Zen 3 (benchmarks/index_build.py)
BUILD_ROWS = 16384


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The instruction-set flags Linux reports for this CPU."""
    return frozenset(cpuinfo_fields().get("flags", "").split())


def cpu_has_amx() -> bool:
    return KERNELS["amx"].cpu_flags <= cpu_flags()


def _cache_dir() -> Path:
    return cache_root() / "ext"


@functools.cache
def kernel_sources(folder: Path) -> dict[str, bytes]:
    """The kernels' sources in `folder` (file name -> bytes) as this process first read them: at import, for CSRC.
    The library's name and the compiler's input both come from these bytes, so a kernel compiled at first use is the
    one this module's argument lists were written for, even if the files are edited while a job runs."""
    return {f.name: f.read_bytes() for f in sorted(folder.iterdir()) if f.suffix in (".cpp", ".h")}


kernel_sources(CSRC)


def library_path(kernel: Kernel) -> Path:
    """Where the compiled kernel is cached: named by a digest of its sources and flags, so an edit recompiles (in a
    new process: `kernel_sources`)."""
    sources = kernel_sources(CSRC)
    text = sources[kernel.source] + sources["exact_search.h"]
    digest = hashlib.sha256(text + " ".join(COMMON_FLAGS + kernel.flags).encode()).hexdigest()[:16]
    return _cache_dir() / f"{Path(kernel.source).stem}-{digest}.so"


@functools.cache
def load_library(name: str = "amx") -> ctypes.CDLL | None:
    """The compiled kernel, or None where this machine cannot run it (CPU without its instructions, no compiler,
    no permission, or turned off by KNNLM_NO_<NAME>)."""
    kernel = KERNELS[name]
    if os.environ.get(f"KNNLM_NO_{name.upper()}") or not kernel.cpu_flags <= cpu_flags():
        return None
    cxx = shutil.which(os.environ.get("CXX", "g++"))
    if cxx is None:
        return None
    so = library_path(kernel)
    if not so.is_file():
        try:
            so.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=so.parent) as tmp:  # compile aside, then rename: never half a library
                out = Path(tmp) / so.name
                for file in (kernel.source, "exact_search.h"):  # the sources as read at import, not as they are now
                    (Path(tmp) / file).write_bytes(kernel_sources(CSRC)[file])
                done = subprocess.run([cxx, *COMMON_FLAGS, *kernel.flags, str(Path(tmp) / kernel.source), "-o",
                                       str(out)], capture_output=True, text=True)
                if done.returncode != 0:
                    warnings.warn(f"knnlm: could not compile {kernel.source}, not using {kernel.index}: "
                                  f"{done.stderr.strip()[:300]}")
                    return None
                os.replace(out, so)
        except OSError as e:  # a read-only or full cache folder
            warnings.warn(f"knnlm: could not build {so}, not using {kernel.index}: {e}")
            return None
    lib = ctypes.CDLL(str(so))
    if getattr(lib, f"knnlm_{name}_init")() != 1:  # AMX: Linux's permission; others: the CPU's own report
        return None
    for entry, argtypes in (("search", SEARCH_ARGTYPES), ("pruned", PRUNED_ARGTYPES)):  # every kernel has both
        f = getattr(lib, f"knnlm_{name}_{entry}")
        f.argtypes, f.restype = list(argtypes), None
    return lib


def available(kernel: str = "amx") -> bool:
    return load_library(kernel) is not None


def available_memory() -> int | None:
    """Bytes of memory available to new allocations (Linux's MemAvailable), or None where unknown."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _ptr(a: np.ndarray) -> int:
    return a.ctypes.data


def _bf16_bits(x: torch.Tensor) -> np.ndarray:
    """bf16 (round to nearest even) of an fp32 tensor, as the uint16 bit patterns the kernel reads."""
    return x.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)


class CpuExactSearch:
    """Exact k-NN over a float16 key store (N, d) with one of the compiled kernels (`KERNELS`: "amx", "avx512",
    "avx2"), with the `Searcher` interface (`base.py`). Two searches, both returning the fp32 distances from the
    stored keys:

    - pruned (the default of the AVX-512 and AVX2 kernels; AMX has it too, not yet measured): the kernel scans keys and queries projected onto
      the keys' m = `project_dims(d)` principal directions. A projected distance never exceeds the true one, so
      a key whose projected distance, less a proven bound on the rounding of everything that computed it, is at or
      above the query's k-th exact distance so far cannot be among the k nearest and is skipped; every other key
      gets its exact distance at once. Exact on every query, with no margin to choose. Memory: the projected keys
      in bf16 (m/d of a full copy). The pruning starts from a guess of the k-th distance, checked
      (`_speculative`).
    - margin (`prune=False`): bf16 products of the full vectors pick `k + margin` candidates, re-ranked exactly. Memory: a bf16 copy of the keys.
    The float16 keys are read in place (a memory map stays a memory map)."""

    auto_reason: str | None = None  # set by `auto` (search/auto.py)

    def __init__(self, keys: np.ndarray, kernel: str = "amx", margin: int = 32, margin_fraction: float = 1 / 16,
                 block: int = BUILD_ROWS, query_block: int = 1024, key_chunk: int = 1024, prune: bool | None = None,
                 dims: int | None = None, first: int | None = None):
        if kernel not in KERNELS:
            raise ValueError(f"kernel: expected one of {', '.join(KERNELS)}, got {kernel!r}")
        self.kernel = KERNELS[kernel]
        lib = load_library(kernel)
        if lib is None:
            raise RuntimeError(f"{self.kernel.index} search is not available on this machine")
        self.prune = self.kernel.prune_by_default if prune is None else prune
        self._search = getattr(lib, f"knnlm_{kernel}_{'pruned' if self.prune else 'search'}")
        if keys.dtype != np.float16 or keys.ndim != 2:
            raise ValueError(f"keys: expected a 2-d float16 array, got {keys.dtype} {keys.shape}")
        self.N, self.d = keys.shape
        self.margin, self.margin_fraction = margin, margin_fraction
        self.query_block, self.key_chunk = query_block, key_chunk
        self.mean = centering_vector(keys)
        self.m = min(self.d, dims or project_dims(self.d)) if self.prune else self.d  # dimensions the kernel scans
        self.basis = principal_directions(keys, self.mean, self.m) if self.prune else None
        self.D = -(-self.m // self.kernel.dim_multiple) * self.kernel.dim_multiple  # padded dimensions
        if first is not None and not (self.prune and self.kernel.staged and 0 < first < self.m and first % 2 == 0):
            raise ValueError(f"first: a staged scan needs the pruned search of a kernel that has one "
                             f"({', '.join(k.index for k in KERNELS.values() if k.staged)}) and an even number of "
                             f"directions below m = {self.m}, got {first}")
        self.first = first or 0  # directions of the staged scan's first stage (0: one stage)
        Np = -(-self.N // 32) * 32  # whole units of 32 keys, the work the kernels split between threads
        need, free = Np * self.D * 2, available_memory()
        if free is not None and need > 0.8 * free:
            raise UserError(f"eval.index: {self.kernel.index} needs a {need / 2**30:.1f} GiB bf16 copy of the keys "
                            f"but only {free / 2**30:.1f} GiB of memory is available; use an IVF index "
                            f"(e.g. 'IVF4096,PQ64')")
        self.max_key_norm = self.max_centered_norm = 0.0  # of the bf16 keys the products use; of the centered keys
        self.store = self._pack(keys, block)
        self.fallbacks = 0  # queries of the last pruned search whose guessed bound was too small (searched again)
        # the pruned search's guess of each query's k-th distance comes from every SAMPLE-th key, whose own search
        # starts from a guess from every SAMPLE²-th key, and so on (strided samples: a contiguous part of a store is
        # one part of the corpus, nearer to some queries than the whole); packed samples, finest first
        self.samples = []
        stride = self.SAMPLE
        while self.prune and -(-self.N // stride) >= self.MIN_SAMPLE:
            self.samples.append(self._pack(np.ascontiguousarray(keys[::stride]), block))
            stride *= self.SAMPLE

    SAMPLE = 16
    MIN_SAMPLE = 256  # keys in the smallest sample worth a search of its own
    GUESS_SCALE, GUESS_SDS = 1.5, 3.0  # the guess: the ks-th in a sample, ks = GUESS_SCALE k/SAMPLE + GUESS_SDS sqrt(k/SAMPLE)

    def _pack(self, keys: np.ndarray, block: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(packed, norms, norms_first, keys16) for the kernel. Packed: centered (and projected) bf16 keys in groups
        of 16, dimension pair by dimension pair, (Np/16, D/2, 16, 2): the VNNI layout of AMX's B operand (whose
        32-dimension chunks are 16 consecutive pairs) and the operand of vdpbf16ps (16 keys x one pair per 64-byte
        vector), written block by block. Norms: fp32 ||k̃||² of the bf16 keys the products use (+inf on padding);
        norms_first: the same of their first `first` coordinates (the staged scan's first stage; else norms)."""
        N = len(keys)
        Np = -(-N // 32) * 32  # whole units of 32 keys, the work the kernels split between threads
        packed = torch.zeros((Np // 16, self.D // 2, 16, 2), dtype=torch.bfloat16)
        norms = torch.full((Np,), float("inf"))  # padding rows are never selected
        norms_first = torch.full((Np,), float("inf")) if self.first else norms
        block = block // 16 * 16
        for lo in range(0, N, block):
            x = torch.from_numpy(np.array(keys[lo : lo + block], dtype=np.float16)).float() - self.mean  # F16C: fast
            self.max_centered_norm = max(self.max_centered_norm, max_norm_bound(x))
            if self.prune:
                x = x @ self.basis
            xb = torch.zeros((-(-len(x) // 16) * 16, self.D), dtype=torch.bfloat16)
            xb[: len(x), : self.m] = x
            norms[lo : lo + len(x)] = xb[: len(x)].float().pow(2).sum(1)
            if self.first:
                norms_first[lo : lo + len(x)] = xb[: len(x), : self.first].float().pow(2).sum(1)
            self.max_key_norm = max(self.max_key_norm, max_norm_bound(xb[: len(x)]))
            packed[lo // 16 : lo // 16 + len(xb) // 16] = xb.view(-1, 16, self.D // 2, 2).permute(0, 2, 1, 3)
        keys16 = keys if keys.flags.c_contiguous else np.ascontiguousarray(keys)  # exact distances, read in place
        return packed.view(torch.int16).numpy().view(np.uint16), norms.numpy(), norms_first.numpy(), keys16

    def candidates(self, k: int) -> int:
        return min(self.N, k + max(self.margin, int(k * self.margin_fraction)))

    def describe(self) -> str:
        """Which search this is, for the evaluation's record."""
        if self.prune:
            staged = f"; the first {self.first} scanned first" if self.first else ""
            return f"{self.kernel.index}, pruned (keys projected onto {self.m} of {self.d} principal directions{staged})"
        return f"{self.kernel.index}, margin (k + max({self.margin}, k·{self.margin_fraction:g}) candidates re-ranked)"

    def bounds(self, centered: torch.Tensor, rounded: torch.Tensor) -> tuple:
        """What makes the pruned search's skip test safe, per query (exact_search.h, `Bound`): with a = ||ỹ_q|| of the
        rounded projected query, b = the largest ||ỹ_j|| of a rounded projected key, and x the largest norms of the
        centered vectors, a key is skipped only if ||ỹ_q − ỹ_j|| ≥ sqrt(thr (1 + rel)) + sqrt_slack, where
        - sqrt_slack = u'(a + b) + γ_d √m (||q − μ|| + x): rounding the projections to bf16 moves each by at most
          u' times its norm; computing them in fp32 by at most γ_d √m times the centered vector's norm;
        - the scores ||ỹ_j||² − 2 ỹ_q·ỹ_j are summed in fp32: off by at most γ_m (a + b)² (add_slack);
        - rel covers the fp32 rounding of the exact distances and the basis's departure from orthonormality.
        Then ||q − k_j||² ≥ ||P^T(q − k_j)||² ≥ thr: the key cannot be nearer than the k-th found. The staged scan's
        first stage applies the same test to the first m1 coordinates with their own ||ỹ_q||² (the last element):
        a part of a difference is never longer than the whole, and each error of a part is at most the whole's.
        Returns (a², sqrt_slack, add_slack, rel, a_first²)."""
        a = rounded.double().norm(dim=1)
        qx = centered.double().norm(dim=1)
        u = BF16_UNIT / (1 - BF16_UNIT) if self.kernel.bf16_queries else 0.0
        gamma_d, gamma_m = (self.d + 4) * FP32_UNIT, 2 * (self.m + 4) * FP32_UNIT
        b = self.max_key_norm
        sqrt_slack = u * a + BF16_UNIT / (1 - BF16_UNIT) * b + gamma_d * self.m**0.5 * (qx + self.max_centered_norm)
        add_slack = gamma_m * (a + b) ** 2 + 1e-30
        a_first = rounded[:, : self.first].double().norm(dim=1) if self.first else a
        return (a * a).numpy(), sqrt_slack.numpy(), add_slack.numpy(), 1e-4, (a_first * a_first).numpy()

    def search(self, queries: np.ndarray, k: int, start: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The k nearest keys of each query. `start` (pruned search only): an upper bound of each query's k-th exact
        distance known in advance (never below it), from which the pruning starts; by default it is guessed
        (`_speculative`)."""
        if not 0 < k <= self.N:
            raise ValueError(f"k: expected 1..{self.N}, got {k}")
        q32 = np.ascontiguousarray(queries, dtype=np.float32)
        centered = torch.from_numpy(q32) - self.mean
        x = centered @ self.basis if self.prune else centered
        qc = self._kernel_queries(x)
        if not self.prune:
            D = np.empty((len(q32), k), dtype=np.float32)
            I = np.empty((len(q32), k), dtype=np.int64)
            packed, norms, _, keys16 = self.store
            self._search(_ptr(qc), len(q32), self.D, _ptr(packed), _ptr(norms), len(norms), _ptr(q32),
                         _ptr(keys16), self.N, self.d, k, self.candidates(k), torch.get_num_threads(),
                         self.query_block, self.key_chunk, _ptr(D), _ptr(I))
            return D, I
        rounded = x.to(torch.bfloat16).float() if self.kernel.bf16_queries else x
        bounds = self.bounds(centered, rounded)
        if start is not None:
            start = np.ascontiguousarray(start, dtype=np.float32)
            if start.shape != (len(q32),):
                raise ValueError(f"start: expected one bound per query, shape ({len(q32)},), got {start.shape}")
            return self._pruned(self.store, qc, q32, bounds, k, start)
        return self._speculative(qc, q32, bounds, k)

    def _kernel_queries(self, x: torch.Tensor) -> np.ndarray:
        """Queries as the kernel reads them: rows padded to a multiple of 32, dimensions to D; bf16 bits or fp32."""
        Mp = -(-len(x) // 32) * 32
        if self.kernel.bf16_queries:
            qc = np.zeros((Mp, self.D), dtype=np.uint16)
            qc[: len(x), : self.m] = _bf16_bits(x)
        else:
            qc = np.zeros((Mp, self.D), dtype=np.float32)
            qc[: len(x), : self.m] = x.numpy()
        return qc

    def _pruned(self, store: tuple, qc: np.ndarray, q32: np.ndarray, bounds: tuple, k: int,
                start: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """One call of the pruned kernel over a packed store (`_pack`); k nearest (−1 ids where fewer are found)."""
        packed, norms, norms_first, keys16 = store
        M = len(q32)
        D = np.empty((M, k), dtype=np.float32)
        I = np.empty((M, k), dtype=np.int64)
        qnorm2, sqrt_slack, add_slack, rel, qnorm2_first = bounds
        self._search(_ptr(qc), M, self.D, _ptr(packed), _ptr(norms), len(norms), _ptr(q32), _ptr(keys16),
                     len(keys16), self.d, k, _ptr(qnorm2), _ptr(sqrt_slack), _ptr(add_slack), rel,
                     _ptr(norms_first), self.first // 2, _ptr(qnorm2_first), None if start is None else _ptr(start), torch.get_num_threads(), self.query_block,
                     self.key_chunk, _ptr(D), _ptr(I))
        return D, I

    def _speculative(self, qc: np.ndarray, q32: np.ndarray, bounds: tuple, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The pruned search from a guessed bound, checked. Pruning from +inf tests many keys exactly before the
        running k-th distance falls; a guess of the k-th distance spares them. The guess: the ks-th exact distance
        among every SAMPLE-th key (searched first, the same way), ks = 1.5 k/SAMPLE + 3 sqrt(k/SAMPLE): a little
        beyond the k-th in expectation, by more where the sample is small and its order statistics noisy. With the
        guess as the starting threshold, keys at or below it are tested: if at least k are found, the guess was at
        least the true k-th distance and the answer is exact; a query with fewer found (a guess too small) is searched
        again from +inf. `fallbacks` counts those queries. The sample's own search starts from a guess from the next
        sample (every SAMPLE²-th key), and so on down to the smallest sample that holds 4 ks keys, which starts from
        +inf (at k = 1024 on 2.09M keys: 120 of 130k, 20 of 8k, 6 of 510); a sample's query whose guess was too
        small gets +inf, so the next search starts from +inf for it."""
        wanted = [k]  # neighbours sought at each level: the store, then each sample
        for sample in self.samples:
            expected = wanted[-1] / self.SAMPLE
            ks = math.ceil(self.GUESS_SCALE * expected + self.GUESS_SDS * math.sqrt(expected))
            if len(sample[3]) < 4 * ks:
                break
            wanted.append(ks)
        guess = None  # +inf
        for level in range(len(wanted) - 1, 0, -1):  # the smallest sample first
            ks = wanted[level]
            guess = np.ascontiguousarray(self._pruned(self.samples[level - 1], qc, q32, bounds, ks, guess)[0][:, ks - 1])
        self.fallbacks = 0
        D, I = self._pruned(self.store, qc, q32, bounds, k, guess)
        failed = np.flatnonzero(I[:, k - 1] < 0) if guess is not None else []
        if len(failed):
            self.fallbacks = len(failed)
            sub_qc = np.zeros((-(-len(failed) // 32) * 32, qc.shape[1]), dtype=qc.dtype)
            sub_qc[: len(failed)] = qc[failed]
            sub_bounds = tuple(np.ascontiguousarray(b[failed]) if isinstance(b, np.ndarray) else b for b in bounds)
            D[failed], I[failed] = self._pruned(self.store, sub_qc, np.ascontiguousarray(q32[failed]), sub_bounds, k)
        return D, I


def faster_than_flat(kernel: str, k: int = 1024, n: int = 131072, d: int = 256, queries: int = 1024) -> bool:
    """Whether `kernel` answers k-NN queries faster than FAISS IndexFlatL2 on this machine: measured once, on a
    synthetic LM-like store of n keys with the threads torch uses, and remembered under $KNNLM_CACHE/ext/ (per
    kernel build, CPU and thread count). For kernels that are not faster everywhere (AVX2 against an AVX-512 BLAS).
    `queries` are searched at once, enough for FAISS's BLAS path (>= 128,000 / d in FAISS 1.15), which the
    evaluation's batches take (auto.py). Without FAISS installed there is no Flat to lose to: True."""
    if not faiss_installed():
        return True
    faiss = import_faiss()

    threads = torch.get_num_threads()
    what = f"{library_path(KERNELS[kernel]).name} {cpu_name()} {sorted(cpu_flags())} {threads} faiss " \
           f"{faiss.__version__} n={n} d={d} k={k} queries={queries}"
    record = _cache_dir() / f"vs-flat-{kernel}-{hashlib.sha256(what.encode()).hexdigest()[:16]}.json"
    if record.is_file():
        try:
            timing = json.loads(record.read_text())
            return timing["kernel_qps"] > timing["flat_qps"]
        except (json.JSONDecodeError, KeyError):
            pass  # measure again
    keys = lm_like_keys(n, d, seed=1)
    rng = np.random.default_rng(2)
    q = keys[rng.choice(n, queries, replace=False)].astype(np.float32) + rng.standard_normal((queries, d), dtype=np.float32)
    faiss.omp_set_num_threads(threads)
    flat = faiss.IndexFlatL2(d)
    flat.add(keys.astype(np.float32))
    ours = CpuExactSearch(keys, kernel)
    best = {"kernel_qps": 0.0, "flat_qps": 0.0}
    for _ in range(2):  # interleaved, best of two: the machine's other load touches both alike
        for label, search in (("kernel_qps", ours.search), ("flat_qps", flat.search)):
            t = time.perf_counter()
            search(q, k)
            best[label] = max(best[label], queries / (time.perf_counter() - t))
    write_json(record, {**best, "measured": what})
    return best["kernel_qps"] > best["flat_qps"]


def first_kernel() -> str | None:
    """The first compiled kernel this CPU runs (AMX, AVX-512 BF16, AVX2), or None."""
    return next((name for name in KERNELS if available(name)), None)


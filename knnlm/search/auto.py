"""`eval.index = "auto"` over a datastore: the fastest exact search this machine has on those keys at that k, chosen
by a timed probe and remembered with its reason in knnlm's cache.

Shapes: N stored keys of d dimensions, k neighbours.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import numpy as np
import torch

from ..artifacts import UserError, cpu_name, read_json, write_json
from ..data import cache_root
from ..distributed import default_device
from .base import Searcher
from .key_geometry import variance_dims
from .registry import BACKENDS, Variants


def auto_candidates(keys: np.ndarray) -> Variants:
    """The exact searches `auto` chooses among on this machine over keys (N, d), by name, each as a function that
    builds it: the `auto_variants` of every registered backend for this device that runs here, only the first of
    each group (on a CPU: FAISS Flat, the reference, first, then the first compiled kernel's searches; on a GPU:
    `bf16-exact` and `bf16-pruned`)."""
    device, groups, out = default_device().type, set(), {}
    for b in sorted(BACKENDS.values(), key=lambda b: b.name != "Flat"):  # the reference is timed first, in full
        if b.device != device or b.auto_variants is None or (b.group and b.group in groups) or not b.runs_here():
            continue
        groups.add(b.group)
        out.update(b.auto_variants(keys))
    if not out:
        raise UserError("eval.index: 'auto' found no exact search this machine runs; install FAISS: "
                        "pip install 'knnlm[faiss]'")
    return out


def probe_rate(searcher: Searcher, queries: np.ndarray, k: int) -> float:
    """Queries per second of one search of `queries` (after a short warm-up)."""
    searcher.search(queries[: min(16, len(queries))], k)
    t = time.perf_counter()
    searcher.search(queries, k)
    return len(queries) / max(time.perf_counter() - t, 1e-9)


def choose_exact_search(keys: np.ndarray, k: int, folder: Path | None = None, model_sha256: str = "",
                        queries: int = 1024, measure=probe_rate, probe_queries: np.ndarray | None = None) -> Searcher:
    """`eval.index = "auto"`: the fastest exact search on these keys at this k, chosen by a timed probe and
    remembered with the reason, e.g. "avx2-exact, pruned, m = 64: 1,180 q/s; margin 640; Flat 130 (64 directions
    hold 88 % of the variance)", in `folder` if given, else in knnlm's cache ($KNNLM_CACHE/ext), under a name made
    from the store's identity (model, N, d, the probe rows' digest, k, CPU, threads, candidates); the evaluation
    records it too.

    Every candidate (`auto_candidates`) is built on the whole store and times one search of `queries` rows at k:
    evenly spaced rows of `probe_queries` (the queries the search is for, e.g. an evaluation's split) where at least
    `queries` are given, else evenly spaced stored keys. Stored keys flatter a pruned search: each is its own nearest
    neighbour, at distance 0, so its k-th distance is a little smaller and its bound prunes more than on held-out
    text; the record says which rows probed, and a choice made on stored keys is not taken for real queries (nor the
    reverse). FAISS Flat is the first of them, timed in full, so `auto` is never slower than Flat on the store it
    serves, up to the probe's noise. The batch matters for Flat:
    FAISS (1.15) computes distances with BLAS only for batches of at least 128,000 / d queries, 500 at d = 256, and
    is 14-26x slower below than at 4,096 (results/benchmarks/intel-xeon-amx/faiss_batch.md); the evaluation searches
    batches of `eval.batch_size` (4,096), so the probe's 1,024 rows time Flat as the evaluation runs it for d >= 125.
    After Flat, a candidate times an eighth of the rows first, and the rest only if that is at least half the best
    rate so far: a search many times slower costs the probe little. A record made for other keys, k, CPU or thread count
    is measured again."""
    k = min(k, len(keys))
    candidates = auto_candidates(keys)
    m_var, held = variance_dims(keys)
    rows = np.ascontiguousarray(keys[:: max(1, len(keys) // queries)][:queries])  # read once: digest and probe
    on_queries = probe_queries is not None and len(probe_queries) >= queries
    if on_queries:
        probe = np.ascontiguousarray(probe_queries[:: len(probe_queries) // queries][:queries], dtype=np.float32)
    else:
        probe = rows.astype(np.float32)
    source = f"{len(probe)} {'queries' if on_queries else 'stored keys'}"
    # the probe's rows stand for the keys themselves: two stores of one shape (and of no model, or one model over
    # other text) never share a choice
    identity = {"N": int(len(keys)), "d": int(keys.shape[1]), "model_sha256": model_sha256,
                "keys_sample_sha256": hashlib.sha256(rows.tobytes()).hexdigest(), "k": int(k),
                "candidates": sorted(candidates), "cpu": cpu_name(), "threads": torch.get_num_threads(),
                "device": default_device().type, "probe": "queries" if on_queries else "stored keys"}
    # remembered in knnlm's cache (not in the datastore, an artifact with digests), keyed by everything it depends on
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
    record = (Path(folder) if folder is not None else cache_root() / "ext") / f"auto-search-{digest}.json"
    if record.is_file():
        saved = read_json(record, "auto search choice")
        if isinstance(saved, dict) and saved.get("identity") == identity and saved.get("choice") in candidates:
            chosen = candidates[saved["choice"]]()
            chosen.auto_reason = saved.get("reason", "")
            return chosen
    short = probe[: max(1, len(probe) // 8)]
    rates, partial, best, best_searcher = {}, set(), None, None
    for name, build in candidates.items():
        searcher = build()
        if best is not None:  # a short probe first: one far slower than the best so far is not timed in full
            rates[name] = measure(searcher, short, k)
            if rates[name] < rates[best] / 2:
                partial.add(name)
                del searcher
                continue
        rates[name] = measure(searcher, probe, k)
        if best is None or rates[name] > rates[best]:
            best, best_searcher = name, searcher
        del searcher
    others = "; ".join(f"{n} {r:,.0f}" + (f" ({len(short)} queries)" if n in partial else "")
                       for n, r in rates.items() if n != best)
    reason = (f"{best}: {rates[best]:,.0f} q/s; {others} (probe of {source} at k = {k}; "
              f"{m_var} principal directions hold {100 * held:.0f} % of the variance)")
    try:
        write_json(record, {"identity": identity, "choice": best, "queries_per_s": rates, "reason": reason})
    except OSError:
        pass  # a read-only cache: the choice is made again next time
    best_searcher.auto_reason = reason  # the evaluation's record keeps why (meta.json's "search_choice")
    return best_searcher


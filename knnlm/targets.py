"""Build the kNN targets of the training set: `knnlm targets --out RUN` writes RUN/targets (see `knnlm.distill`).

Each training position i (datastore row i) is searched against the whole datastore for its k nearest keys, its own
row left out (or every row within `model.context` positions: `distill.exclude = "window"`), and its p_kNN at the
base run's tuned temperature kept sparse: the `distill.top` most probable words, their probabilities and the rest of
the mass. Resumable: rows are written in order into RUN/.targets.partial/, whose `progress.json` records how many are
complete after each batch's arrays are flushed; the same command continues from there (other settings start over).
"""

from __future__ import annotations

import math
import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from .artifacts import UserError, file_sha256, kill_point, load_npy, read_json, reserve, swapping, write_json
from .checkpoint import latest_meta
from .config import Config
from .datastore import Datastore
from .distill import ARRAYS
from .evaluate import datastore_fingerprint, searcher_for


def valid_temperature(run: Path, k: int) -> float:
    """The base run's best temperature on valid at `k` (any λ), from its saved tuning grid."""
    path = run / "eval" / "valid" / "tuning.json"
    grid = read_json(path, "tuning grid")
    rows = [r for r in grid if isinstance(r, dict) and r.get("k") == k and isinstance(r.get("ppl"), (int, float))]
    if not rows:
        ks = sorted({r.get("k") for r in grid if isinstance(r, dict)} - {None})
        raise UserError(f"{path}: no tuning at k = {k} (distill.k); the grid has k in {ks}: set distill.k to one of "
                        "them, or give distill.temperature")
    best = min(rows, key=lambda r: r["ppl"])
    temperature = best.get("temperature")
    if not isinstance(temperature, (int, float)) or not (temperature > 0 and math.isfinite(temperature)):
        raise UserError(f"{path}: temperature {temperature!r} of the best row at k = {k} is not a number > 0")
    return float(temperature)


def sparse_knn_distribution(distances: torch.Tensor, words: torch.Tensor, keep: torch.Tensor, temperature: float,
                            top: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """p_kNN of each row as its `top` most probable words: (n, K) distances, neighbours' words and a mask of the
    neighbours used -> words (n, top) int64 (−1 where fewer words), probs (n, top) float64, rest (n,) float64.

    Computed in float64: softmax(−d/T) over the kept neighbours, summed per word (sorted by word, a running sum
    read at the end of each word's run), then the top words of each row."""
    n, K = distances.shape
    d = distances.double().masked_fill(~keep, math.inf)
    logits = -(d - d.min(1, keepdim=True).values) / temperature  # a row with nothing kept: NaN, zeroed below
    logits = logits.masked_fill(~keep, -math.inf)
    weights = torch.softmax(logits, 1).nan_to_num(0.0)  # a row with no kept neighbour: all zero
    w_sorted, order = torch.sort(words.masked_fill(~keep, -1), dim=1, stable=True)  # (n, K) words in runs
    p_sorted = weights.gather(1, order)
    total = torch.cumsum(p_sorted, 1)
    run_end = torch.ones_like(keep)
    run_end[:, :-1] = w_sorted[:, 1:] != w_sorted[:, :-1]
    # each run's sum: the running total at its end less the running total at the previous run's end
    ends = torch.where(run_end, total, torch.zeros_like(total))
    prev_end = torch.cummax(torch.cat([torch.zeros(n, 1, dtype=total.dtype), ends[:, :-1]], 1), 1).values
    mass = torch.where(run_end & (w_sorted >= 0), total - prev_end, torch.zeros_like(total))
    probs, where = torch.topk(mass, min(top, K), 1)  # (n, top)
    top_words = torch.where(probs > 0, w_sorted.gather(1, where), torch.full_like(where, -1))
    probs = torch.where(top_words >= 0, probs, torch.zeros_like(probs))
    rest = (weights.sum(1) - probs.sum(1)).clamp_min(0.0)
    if top > K:  # pad to `top` columns
        pad = top - K
        top_words = torch.cat([top_words, torch.full((n, pad), -1, dtype=top_words.dtype)], 1)
        probs = torch.cat([probs, torch.zeros(n, pad, dtype=probs.dtype)], 1)
    return top_words, probs, rest


def neighbours_kept(ids: np.ndarray, rows: np.ndarray, radius: int, k: int) -> np.ndarray:
    """Mask (n, K) of the neighbours a row's target uses: not within `radius` rows of the query's own row (radius 0:
    the row itself), not padding (−1), and only the first k such in distance order."""
    keep = (ids >= 0) & (np.abs(ids - rows[:, None]) > radius)
    return keep & (np.cumsum(keep, 1) <= k)


def build_targets(run: str | Path, cfg: Config, progress: bool = True) -> Path:
    """Write RUN/targets (see the module docstring); continue a killed build; return the folder."""
    run = Path(run)
    x = cfg.distill
    ds = Datastore(run / "datastore")
    ds.check_model(latest_meta(run))
    N = len(ds)
    radius = 0 if x.exclude == "self" else cfg.model.context
    K = min(N, x.k + 2 * radius + 1)  # enough to keep k after dropping the excluded rows
    if x.k > N - (2 * radius + 1):
        raise UserError(f"distill.k: {x.k} neighbours cannot be kept from a datastore of {N} keys "
                        f"when {2 * radius + 1} around each position are excluded")
    source = "distill.temperature" if x.temperature else f"{run}/eval/valid/tuning.json, best at k = {x.k}"
    temperature = x.temperature or valid_temperature(run, x.k)
    inputs = {"datastore": datastore_fingerprint(ds), "model_sha256": ds.meta["model_sha256"], "N": N, "k": x.k,
              "temperature": temperature, "top": x.top, "exclude": x.exclude, "radius": radius,
              "vocab_hash": ds.meta.get("vocab_hash", ""), "index": cfg.eval.index}
    final, partial = run / "targets", run / ".targets.partial"
    if (final / "meta.json").is_file():
        meta = read_json(final / "meta.json", "targets meta")
        if meta.get("inputs") == inputs:
            return final  # already built from the same datastore with the same settings

    done = 0
    if (partial / "progress.json").is_file():
        state = read_json(partial / "progress.json", "targets progress")
        if isinstance(state, dict) and state.get("inputs") == inputs and isinstance(state.get("rows"), int):
            done = state["rows"]
    if done == 0:  # a new build (or one with other settings): start over
        if partial.is_symlink() or partial.is_file():
            raise UserError(f"{partial}: expected a folder knnlm writes the targets into, found a link or a file")
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        for name, dtype in ARRAYS.items():
            shape = (N,) if name == "rest" else (N, x.top)
            np.lib.format.open_memmap(partial / f"{name}.npy", mode="w+", dtype=dtype, shape=shape).flush()
            reserve(partial / f"{name}.npy", "the kNN targets")
        write_json(partial / "progress.json", {"inputs": inputs, "rows": 0, "seconds": 0.0})
    out = {name: np.load(partial / f"{name}.npy", mmap_mode="r+") for name in ARRAYS}

    searcher = searcher_for(ds, cfg, k=K)
    seconds = read_json(partial / "progress.json", "targets progress").get("seconds", 0.0)
    bar = tqdm(total=N, initial=done, desc="targets", unit="q", unit_scale=True, disable=not progress,
               dynamic_ncols=True)
    for batch, lo in enumerate(range(done, N, x.batch_size), start=1):
        t0 = time.time()
        hi = min(N, lo + x.batch_size)
        D, I = searcher.search(np.asarray(ds.keys[lo:hi], dtype=np.float32), K)
        keep = neighbours_kept(I, np.arange(lo, hi), radius, x.k)
        words = np.asarray(ds.vals)[np.clip(I, 0, N - 1)]
        top_words, probs, rest = sparse_knn_distribution(torch.from_numpy(D), torch.from_numpy(words.astype(np.int64)),
                                                         torch.from_numpy(keep), temperature, x.top)
        out["words"][lo:hi] = top_words.numpy().astype(np.int32)
        out["probs"][lo:hi] = probs.numpy().astype(np.float32)
        out["rest"][lo:hi] = rest.numpy().astype(np.float32)
        for array in out.values():
            array.flush()
        seconds += time.time() - t0
        write_json(partial / "progress.json", {"inputs": inputs, "rows": hi, "seconds": seconds})
        bar.update(hi - lo)
        kill_point("targets", batch)
    bar.close()
    del out

    digests = {f"{name}.npy": file_sha256(partial / f"{name}.npy") for name in ARRAYS}
    probs = load_npy(partial / "probs.npy", mmap=True)
    rest = load_npy(partial / "rest.npy", mmap=True)
    sample = np.arange(0, N, max(1, N // 100_000))  # summary statistics on ≤ 100k evenly spaced rows
    write_json(partial / "meta.json", {
        "N": N, "top": x.top, "k": x.k, "temperature": temperature, "temperature_from": source,
        "exclude": x.exclude, "radius": radius, "searched_k": K, "inputs": inputs,
        "model_sha256": ds.meta["model_sha256"], "vocab_hash": ds.meta.get("vocab_hash", ""),
        "datastore": str(ds.folder), "search": searcher.describe(),
        "seconds": seconds, "bytes": sum((partial / n).stat().st_size for n in digests),
        "mean_top_mass": float(np.asarray(probs[sample], dtype=np.float64).sum(1).mean()),
        "mean_rest": float(np.asarray(rest[sample], dtype=np.float64).mean()),
        "sha256": digests,
    })
    del probs, rest
    os.remove(partial / "progress.json")
    old = run / ".targets.old"
    shutil.rmtree(old, ignore_errors=True)
    with swapping(final, exclusive=True):  # a trainer opening the targets never sees the moment between renames
        if final.exists():
            final.rename(old)
        partial.rename(final)
    shutil.rmtree(old, ignore_errors=True)
    return final

"""Exact search over keys of different shapes: is `auto` at least as fast as FAISS Flat on every one?

    python benchmarks/key_distributions.py [--n 200000] [--queries 256] [--run runs/wt2 ...] [--hf PATH]

Stores: isotropic Gaussian keys, clustered keys with a flat and with a steep spectrum (64 clusters; per-direction
scales falling as i^-0.1 or i^-1.5), each at d = 256 and 1024; with `--run`, each run's own datastore (the usual key,
a pre-LayerNorm key, a regularized key: whatever runs are named); with `--hf`, hidden states of a local Hugging Face
causal LM (e.g. GPT-2 at d = 768) over WikiText-2's valid text. Queries: held-out draws of the same distribution
(a run: its stored keys of every n/queries-th row, perturbed by 1 % noise, so none is its own neighbour).

Queries are searched 2,048 at a time: FAISS Flat takes its fast (BLAS) path only for batches of at least 128,000 / d
queries (FAISS 1.15; `faiss_batch.py` measures it), as the evaluation's batches of 4,096 do; at 256 queries it ran
14-26x slower than in the evaluation, which inflated every ratio at d = 256 (git show 07baff0:results/benchmarks/
intel-xeon-amx/key_distributions.md, kept for the record).
For k = 64 and 1024, side by side in one process with the same threads: every search `auto` chooses among
(`knnlm.search.auto.auto_candidates`: FAISS `IndexFlatL2`, the first CPU kernel's margin search, its pruned searches
on the default projection and on the one holding 90 % of the variance, and their staged scans where the kernel has
one), and `auto` itself (`choose_exact_search`: its own probe, then its choice). Each backend's queries/s, its ratio to Flat, and recall@k
against a float64 brute force. Backends are timed in turns, best of `--repeats`. Writes OUT/key_distributions.{json,md}
(default: this machine's folder under results/benchmarks/).
"""

from __future__ import annotations

import argparse
import gc
import time

import numpy as np
import torch

from common import default_out, write_results
from knnlm.search.auto import auto_candidates, choose_exact_search
from knnlm.search.key_geometry import variance_dims
from search import recall, truth


def clustered(n: int, d: int, decay: float, seed: int, clusters: int = 64) -> np.ndarray:
    """Keys around `clusters` centres, per-direction scales i^-decay in a random rotation: decay 0.1 is a flat
    spectrum, 1.5 a steep one (LM keys are steep: 64 of 256 directions hold 88 % of WikiText-2's variance)."""
    rng = np.random.default_rng(seed)
    rotation, _ = np.linalg.qr(rng.standard_normal((d, d)))
    scales = np.arange(1, d + 1, dtype=np.float64) ** -decay
    centres = rng.standard_normal((clusters, d)) * scales * 3
    x = centres[rng.integers(0, clusters, n)] + rng.standard_normal((n, d)) * scales
    return ((x @ rotation.T) * (4 / np.sqrt((scales**2).sum()))).astype(np.float16)


def stores(a) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """name -> (keys (n, d) float16, queries (q, d) float32)."""
    out = {}
    for d in (256, 1024):
        for label, make in (("isotropic Gaussian", lambda n, s: np.random.default_rng(s).standard_normal((n, d)).astype(np.float16)),
                            ("clustered, flat spectrum", lambda n, s: clustered(n, d, 0.1, s)),
                            ("clustered, steep spectrum", lambda n, s: clustered(n, d, 1.5, s))):
            both = make(a.n + a.queries, 0)
            out[f"{label}, d = {d}"] = (both[: a.n], both[a.n :].astype(np.float32))
    for run in a.run or []:
        keys = np.load(f"{run}/datastore/keys.npy", mmap_mode="r")
        step = max(1, len(keys) // a.queries)
        q = np.asarray(keys[::step][: a.queries], dtype=np.float32)
        q += np.random.default_rng(1).standard_normal(q.shape).astype(np.float32) * 0.01 * q.std(0)
        out[f"datastore of {run} ({len(keys):,} keys, d = {keys.shape[1]})"] = (keys, q)
    if a.hf:
        out[f"hidden states of {a.hf}"] = hf_states(a.hf, a.n + a.queries, a.queries)
    return out


def hf_states(path: str, n: int, queries: int) -> tuple[np.ndarray, np.ndarray]:
    """The last hidden layer's states of a local Hugging Face causal LM over WikiText-2 valid, float16."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from knnlm.data import default_data_dir

    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    text = (default_data_dir() / "wiki.valid.tokens").read_text()
    ids = torch.tensor(tok(text)["input_ids"])
    ctx = min(1024, getattr(model.config, "n_positions", 1024))
    states = []
    with torch.no_grad():
        for lo in range(0, len(ids) - 1, ctx):
            out = model(ids[None, lo : lo + ctx], output_hidden_states=True)
            states.append(out.hidden_states[-1][0].half().numpy())
            if sum(map(len, states)) >= n:
                break
    x = np.concatenate(states)
    return x[: len(x) - queries], x[len(x) - queries :].astype(np.float32)


def bench(name: str, keys: np.ndarray, queries: np.ndarray, ks: list[int], repeats: int, n_truth: int) -> list[dict]:
    print(f"{name}: {len(keys):,} keys", flush=True)
    m_var, held = variance_dims(keys)
    builders = auto_candidates(keys)  # exactly what `auto` chooses among: FAISS Flat and the first kernel's searches
    full = truth(keys, queries[:n_truth], max(ks))
    rows = []
    for k in ks:
        t0 = time.perf_counter()
        auto = choose_exact_search(keys, k, probe_queries=queries)  # its own probe, on the queries, as evaluate's
        probe_seconds = time.perf_counter() - t0
        searchers = {name_: build() for name_, build in builders.items()}
        searchers[f"auto → {auto.describe()}"] = auto
        best: dict[str, float] = {}
        found: dict[str, np.ndarray] = {}
        for _ in range(repeats):
            for b, s in searchers.items():
                s.search(queries[:16], k)
                t = time.perf_counter()
                _, ids = s.search(queries, k)
                best[b] = max(best.get(b, 0.0), len(queries) / (time.perf_counter() - t))
                found[b] = ids
        flat = best["Flat"]
        rows.append({"store": name, "n": len(keys), "d": keys.shape[1], "k": k,
                     "variance_dims": m_var, "variance_held": held, "auto_probe_seconds": probe_seconds,
                     "backends": {b: {"qps": q, "ratio_vs_flat": q / flat,
                                      "recall_vs_float64": recall(found[b][:n_truth], full[:, :k])}
                                  for b, q in best.items()}})
        for b, v in rows[-1]["backends"].items():
            print(f"  k={k:5d} {b:60s} {v['qps']:9.0f} q/s  {v['ratio_vs_flat']:5.2f}x  recall {v['recall_vs_float64']:.4f}",
                  flush=True)
        del searchers, auto
        gc.collect()
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=200_000, help="keys per synthetic store")
    p.add_argument("--queries", type=int, default=2048,
                   help="queries searched at once: FAISS Flat needs >= 128,000 / d to take its BLAS path (faiss_batch.py)")
    p.add_argument("--truth", type=int, default=64, help="queries checked against the float64 brute force")
    p.add_argument("--k", type=int, nargs="+", default=[64, 1024])
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--run", nargs="*", help="run folders whose datastores to add")
    p.add_argument("--hf", help="a local Hugging Face causal LM whose hidden states to add")
    p.add_argument("--out", default=default_out(), help="default: this machine's folder under results/benchmarks/")
    a = p.parse_args()
    rows = []
    for name, (keys, queries) in stores(a).items():
        rows += bench(name, keys, queries, a.k, a.repeats, a.truth)
    md = ["| store | k | 90 % variance in | backend | q/s | vs FAISS Flat | recall@k vs float64 |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        for b, v in r["backends"].items():
            md.append(f"| {r['store']} | {r['k']} | {r['variance_dims']} of {r['d']} | {b} | {v['qps']:.0f} | "
                      f"{'**' if b.startswith('auto') else ''}{v['ratio_vs_flat']:.2f}×{'**' if b.startswith('auto') else ''} | "
                      f"{v['recall_vs_float64']:.4f} |")
    worst = min((r["backends"][b]["ratio_vs_flat"], r["store"], r["k"]) for r in rows for b in r["backends"]
                if b.startswith("auto"))
    md += ["", f"`auto`'s lowest ratio to FAISS Flat: {worst[0]:.2f}× ({worst[1]}, k = {worst[2]}); {len(rows)} "
               f"store × k cases, {torch.get_num_threads()} threads, best of {a.repeats} rounds."]
    write_results(a.out, "key_distributions", {"rows": rows, "auto_worst_ratio": worst[0]}, md)
    print("\n".join(md))


if __name__ == "__main__":
    main()

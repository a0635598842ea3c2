"""Analyses of the learned representations (the paper's section 4.4), from saved artifacts only.

    knnlm analyze RUN_A RUN_B --labels ω=0 ω=0.001 --out results/analysis
    python -m knnlm.studies.analysis --redraw results/analysis     # figures and Markdown again, from the JSON records alone

Every number here is read from what `knnlm evaluate` saved in RUN/eval/valid/ and from the datastore's values;
the model is never loaded and the search is never rerun. `analyze` computes the JSON records below, one entry per
run label; `redraw` then makes every figure (`knnlm/studies/plots.py`) and the Markdown from those records only, so a
committed results folder can be redrawn after its run folders are gone. Per run (n valid tokens, d key dimensions):

- `runs.json`: where the numbers come from: the run folder's name (never an absolute path), the machine, split,
  tokens, protocol, seed and the evaluation's λ, k, temperature and perplexities.
- Frequency buckets (`buckets.json`, `buckets.md`): valid LM and kNN-LM perplexity of the tokens whose target is
  among the top 100 words by training frequency, ranks 100–1k, 1k–10k and the rest. Figure 2 analogue
  (`figure2_gain_by_frequency.png`): the kNN-LM's relative change in perplexity against the LM per bucket, one bar
  per run.
- GMM (`gmm.json`): the query keys of frequent-word tokens, split at the median loss into high- and low-loss
  groups, scored by a 10-component Gaussian mixture (higher log-likelihood = closer to a cluster), fitted several
  times. Figure 3 analogue (`figure3_gmm_loglik.png`): the low − high difference per run, mean ± std over the fits.
- Extras (`extras.json`): key norms, nearest-neighbour distances, how often the target is among the k neighbours,
  and the histograms of the first two (`key_norms.png`, `nn_distances.png`).

`summary.md` collects the tables and links the figures.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import plots
from ..artifacts import (UserError, cpu_name, kill_point, load_npy, markdown_table, optional_import, read_json, read_meta,
                         write_json, write_text)
from ..datastore import neighbour_values
from ..knn import interpolate, perplexity

RANK_EDGES = (100, 1000, 10000)  # frequency-rank bucket boundaries: top 100, 100–1k, 1k–10k, the rest
FREQUENT_WORDS = 100  # "the most frequent words" of the GMM analysis
ROW_CHUNK = 16384  # rows per chunk when streaming (n, d) or (n, K) arrays from memory-mapped files
PROTOCOL = "tuned (λ, k, T tuned on valid)"  # the evaluation settings every analysis reads (summary.json's)
RECORDS = ("runs", "buckets", "gmm", "extras")  # the JSON records `redraw` reads: OUT/<name>.json
FIGURE2, FIGURE3 = "figure2_gain_by_frequency.png", "figure3_gmm_loglik.png"
HISTOGRAMS = (  # extras.json histogram → its figure and x label
    ("key_sq_norm_histogram", "key_norms.png", "squared L2 norm of the query key"),
    ("nn_distance_histogram", "nn_distances.png", "squared L2 distance to the nearest datastore key"),
)


# --------------------------------------------------------------------------------------------------------------
# Loading one evaluated run


@dataclass
class EvaluatedRun:
    """The saved artifacts of one run that the analyses read; the large arrays stay memory-mapped."""

    label: str
    folder: Path
    summary: dict  # RUN/eval/valid/summary.json: lm_ppl, knnlm_ppl, lambda, k, temperature, ...
    config: dict  # RUN/config.json as saved by training ({} if the folder has none)
    train_counts: np.ndarray  # (V,) int64 training frequency of each word id
    targets: np.ndarray  # (n,) int32
    lm_logprobs: np.ndarray  # (n,) float64, natural log
    knnlm_logprobs: np.ndarray  # (n,) float64, log(λ p_kNN + (1 − λ) p_LM)
    query_keys: np.ndarray  # (n, d) float16, memory-mapped
    distances: np.ndarray  # (n, K) float32 squared L2, nearest first, memory-mapped
    neighbors: np.ndarray  # (n, K) datastore row ids, memory-mapped
    vals: np.ndarray  # (N,) int32 datastore values, memory-mapped

    @property
    def knnlm_losses(self) -> np.ndarray:
        return -self.knnlm_logprobs  # (n,) nats

    @property
    def name(self) -> str:
        """The run folder as `study/run` (its last two path parts): records never hold one machine's absolute paths."""
        return "/".join(self.folder.resolve().parts[-2:])


def training_counts(vals: np.ndarray, vocab_size: int = 0, chunk: int = 1 << 24) -> np.ndarray:
    """np.bincount(vals) in chunks, so a memory-mapped (N,) array is never copied whole as int64."""
    counts = np.zeros(vocab_size, dtype=np.int64)
    for lo in range(0, len(vals), chunk):
        c = np.bincount(np.asarray(vals[lo : lo + chunk]), minlength=len(counts))
        if len(c) > len(counts):
            counts = np.pad(counts, (0, len(c) - len(counts)))
        counts += c
    return counts


def load_run(folder: Path, label: str) -> EvaluatedRun:
    """Read an evaluated run folder, or raise UserError naming the first missing or inconsistent file."""
    folder = Path(folder)
    valid = folder / "eval" / "valid"
    if not (valid / "summary.json").is_file():
        raise UserError(f"{valid / 'summary.json'}: not found; is {folder} an evaluated run (`knnlm evaluate --out RUN`)?")
    summary = read_json(valid / "summary.json", "evaluation summary")
    for key in ("lambda", "k"):
        if key not in summary:
            raise UserError(f"{valid / 'summary.json'}: no {key!r} entry")
    read_meta(folder / "datastore", "datastore")
    vals = load_npy(folder / "datastore" / "vals.npy", mmap=True)
    targets = load_npy(valid / "targets.npy")
    lm = load_npy(valid / "lm_logprobs.npy").astype(np.float64)
    knn = load_npy(valid / "knn_logprobs.npy").astype(np.float64)
    query_keys = load_npy(valid / "query_keys.npy", mmap=True)
    distances = load_npy(valid / "distances.npy", mmap=True)
    neighbors = load_npy(valid / "neighbors.npy", mmap=True)
    n = len(targets)
    for name, arr, ndim in (("lm_logprobs", lm, 1), ("knn_logprobs", knn, 1), ("query_keys", query_keys, 2),
                            ("distances", distances, 2), ("neighbors", neighbors, 2)):
        if arr.ndim != ndim or len(arr) != n:
            raise UserError(f"{valid / (name + '.npy')}: expected {n} rows ({ndim}-d) like targets.npy, found {arr.shape}")
    if distances.shape != neighbors.shape:
        raise UserError(f"{valid}: distances {distances.shape} and neighbors {neighbors.shape} differ in shape")
    if summary["k"] > neighbors.shape[1]:
        raise UserError(f"{valid}: summary's k={summary['k']} exceeds the {neighbors.shape[1]} stored neighbours")
    vocab_size = int(targets.max()) + 1 if n else 0  # valid words unseen in training get count 0
    config = read_json(folder / "config.json", "run config") if (folder / "config.json").is_file() else {}
    return EvaluatedRun(
        label=label, folder=folder, summary=summary, config=config, train_counts=training_counts(vals, vocab_size),
        targets=targets, lm_logprobs=lm, knnlm_logprobs=interpolate(lm, knn, summary["lambda"]),
        query_keys=query_keys, distances=distances, neighbors=neighbors, vals=vals,
    )


# --------------------------------------------------------------------------------------------------------------
# Pure computations (numpy in, numpy out)


def frequency_ranks(train_counts: np.ndarray) -> np.ndarray:
    """(V,) rank of each word by training frequency, 0 = most frequent; ties broken by word id (stable)."""
    order = np.argsort(-train_counts, kind="stable")
    ranks = np.empty(len(train_counts), dtype=np.int64)
    ranks[order] = np.arange(len(train_counts))
    return ranks


def bucket_names(edges=RANK_EDGES) -> list[str]:
    """["top 100", "100–1k", "1k–10k", "10k+"] for the default edges."""
    def short(x: int) -> str:
        return f"{x // 1000}k" if x >= 1000 and x % 1000 == 0 else str(x)

    names = [f"top {short(edges[0])}"]
    names += [f"{short(lo)}–{short(hi)}" for lo, hi in zip(edges[:-1], edges[1:])]
    return names + [f"{short(edges[-1])}+"]


def frequency_buckets(train_counts: np.ndarray, targets: np.ndarray, lm_lp: np.ndarray, knnlm_lp: np.ndarray,
                      edges=RANK_EDGES) -> dict[str, np.ndarray]:
    """Perplexities per frequency-rank bucket of the target word.

    train_counts (V,), targets (n,), lm_lp and knnlm_lp (n,) natural-log probabilities of the targets.
    Bucket b holds the tokens whose target's rank r (0 = most frequent in training) has edges[b-1] <= r < edges[b];
    the first bucket is r < edges[0], the last r >= edges[-1]. Returns arrays of length len(edges) + 1:
    rank_lo, rank_hi (rank_hi = -1 for "no upper end"), tokens, lm_ppl, knnlm_ppl, relative_change
    (knnlm_ppl / lm_ppl − 1); the perplexities of an empty bucket are NaN.
    """
    assert len(targets) == len(lm_lp) == len(knnlm_lp), "one LM and one kNN-LM log-prob per target"
    assert len(targets) == 0 or targets.max() < len(train_counts), "train_counts must cover every target id"
    bucket = np.searchsorted(np.asarray(edges), frequency_ranks(train_counts)[targets], side="right")  # (n,)
    n_buckets = len(edges) + 1
    tokens = np.bincount(bucket, minlength=n_buckets)
    with np.errstate(invalid="ignore", divide="ignore"):
        # perplexity = exp(mean NLL) of the bucket's tokens; sums in float64 so a constant loss stays exact
        lm_ppl = np.exp(-np.bincount(bucket, weights=lm_lp.astype(np.float64), minlength=n_buckets) / tokens)
        knnlm_ppl = np.exp(-np.bincount(bucket, weights=knnlm_lp.astype(np.float64), minlength=n_buckets) / tokens)
        relative_change = knnlm_ppl / lm_ppl - 1
    return {
        "rank_lo": np.array((0, *edges)), "rank_hi": np.array((*edges, -1)), "tokens": tokens,
        "lm_ppl": lm_ppl, "knnlm_ppl": knnlm_ppl, "relative_change": relative_change,
    }


@dataclass
class GmmSplit:
    """Log-likelihoods under one Gaussian mixture of the high-loss and low-loss keys (of the scored sample)."""

    threshold: float
    loglik_high: np.ndarray  # (n_high,) log density of each high-loss key (loss > threshold)
    loglik_low: np.ndarray  # (n_low,) log density of each low-loss key (loss <= threshold)
    n_components: int
    covariance_type: str

    @property
    def mean_high(self) -> float:
        return float(self.loglik_high.mean()) if len(self.loglik_high) else math.nan

    @property
    def mean_low(self) -> float:
        return float(self.loglik_low.mean()) if len(self.loglik_low) else math.nan

    @property
    def difference(self) -> float:
        """mean_low − mean_high: positive when the well-predicted keys sit closer to the mixture's clusters."""
        return self.mean_low - self.mean_high


def gmm_loglik_split(keys: np.ndarray, losses: np.ndarray, threshold: float | None = None, n_components: int = 10,
                     seed: int = 0, max_points: int = 20000, covariance_type: str = "diag") -> GmmSplit:
    """Fit one Gaussian mixture to the keys and compare the log-likelihoods of their high- and low-loss groups.

    keys (n, d) (any array, e.g. memory-mapped: only the sampled rows are read), losses (n,) nats per token.
    threshold: a key is high-loss when its loss > threshold; default the median of `losses`. At most `max_points`
    keys (a fixed-seed sample) are fitted and then scored, so the log-likelihoods are in-sample.

    Covariance: diagonal by default. A full covariance has d(d+1)/2 parameters per component (32,896 at d = 256,
    525k at d = 1024) against some 2,000 sampled keys per component, so it would be near-singular and shaped by
    `reg_covar` rather than by the data, and the in-sample likelihood would reward that overfitting; each EM step
    would also cost O(n·m·d²). A diagonal one has 2d parameters per component and costs O(n·m·d), and the
    clusters the paper means (keys gathered near a mixture mean) still raise the likelihood.
    `reg_covar` is 1e-6 × the sample's mean variance, so rescaling all keys by c shifts every log-likelihood by
    −d·log c and leaves `difference` unchanged: compare differences across runs (an L2-regularized model has
    smaller keys), not absolute log-likelihoods.
    """
    GaussianMixture = optional_import("sklearn.mixture", "plots", "the GMM analysis").GaussianMixture  # only here

    losses = np.asarray(losses, dtype=np.float64)
    assert len(keys) == len(losses), "one loss per key"
    if threshold is None:
        threshold = float(np.median(losses))
    rng = np.random.default_rng(seed)
    sample = np.sort(rng.choice(len(keys), size=min(len(keys), max_points), replace=False))  # sorted: mmap reads in order
    if len(sample) < n_components:
        raise UserError(f"GMM analysis: {len(sample)} keys are too few for {n_components} mixture components")
    x = np.asarray(keys[sample], dtype=np.float64)  # (s, d)
    scale = float(x.var(axis=0).mean())
    gmm = GaussianMixture(n_components=n_components, covariance_type=covariance_type, max_iter=200,
                          reg_covar=1e-6 * scale if scale > 0 else 1e-6, random_state=seed)
    loglik = gmm.fit(x).score_samples(x)  # (s,) log density of each sampled key
    high = losses[sample] > threshold
    return GmmSplit(threshold=float(threshold), loglik_high=loglik[high], loglik_low=loglik[~high],
                    n_components=n_components, covariance_type=covariance_type)


def key_squared_norms(query_keys: np.ndarray) -> np.ndarray:
    """(n,) float32 ||key||², converting (n, d) float16 to float32 one chunk of rows at a time."""
    out = np.empty(len(query_keys), dtype=np.float32)
    for lo in range(0, len(query_keys), ROW_CHUNK):
        block = np.asarray(query_keys[lo : lo + ROW_CHUNK], dtype=np.float32)
        out[lo : lo + len(block)] = np.einsum("nd,nd->n", block, block)
    return out


def target_in_neighbors(neighbors: np.ndarray, vals: np.ndarray, targets: np.ndarray, k: int) -> np.ndarray:
    """(n,) bool: the target is the value of one of the k nearest neighbours (vals[neighbors[:, :k]])."""
    found = np.empty(len(targets), dtype=bool)
    for lo in range(0, len(targets), ROW_CHUNK):
        neighbor_vals = neighbour_values(vals, np.asarray(neighbors[lo : lo + ROW_CHUNK, :k]))  # (chunk, k)
        found[lo : lo + len(neighbor_vals)] = (neighbor_vals == targets[lo : lo + ROW_CHUNK, None]).any(1)
    return found


def log_histograms(series: list[np.ndarray], n_bins: int = 60) -> list[dict]:
    """Histograms of positive quantities on n_bins log-spaced edges shared by every array (so runs compare).

    Per array: bin_edges (n_bins + 1,), share (n_bins,) = the share of all its values in each bin (bins are equally
    wide in log x, so this is a density in log x), nonpositive = how many values (zeros) no log axis can show.
    """
    positive = [np.asarray(v, dtype=np.float64)[np.asarray(v) > 0] for v in series]
    lo = min((v.min() for v in positive if len(v)), default=1.0)
    hi = max((v.max() for v in positive if len(v)), default=10.0)
    edges = np.logspace(math.log10(lo), math.log10(hi * 1.0001) if hi > lo else math.log10(lo) + 1, n_bins + 1)
    edges[0] = lo  # 10 ** log10(lo) can round above lo and drop the smallest value from every bin
    return [{"bin_edges": edges.tolist(), "share": (np.histogram(p, edges)[0] / max(len(v), 1)).tolist(),
             "nonpositive": int(len(v) - len(p))} for v, p in zip(series, positive)]


# --------------------------------------------------------------------------------------------------------------
# Records: one JSON entry per run label, everything the figures and the Markdown need


def _json_number(x) -> float | int | None:
    """JSON has no NaN/inf: such values are written as null."""
    x = x.item() if isinstance(x, np.generic) else x
    return x if isinstance(x, int) or math.isfinite(x) else None


def run_record(run: EvaluatedRun, machine: str) -> dict:
    """runs.json: what was analysed, and where."""
    return {
        "run": run.name, "machine": machine, "split": "valid", "tokens": int(len(run.targets)),
        "max_eval_tokens": run.config.get("data", {}).get("max_eval_tokens"),  # 0: the whole split; None: no config
        "seed": run.config.get("train", {}).get("seed"), "protocol": PROTOCOL,
        "lambda": run.summary["lambda"], "k": run.summary["k"], "temperature": run.summary.get("temperature"),
        "lm_ppl": _json_number(run.summary.get("lm_ppl", math.nan)),
        "knnlm_ppl": _json_number(run.summary.get("knnlm_ppl", math.nan)),
    }


def buckets_record(run: EvaluatedRun) -> dict:
    """buckets.json: perplexities per training-frequency rank bucket of the target, and over all tokens."""
    names = bucket_names(RANK_EDGES)
    b = frequency_buckets(run.train_counts, run.targets, run.lm_logprobs, run.knnlm_logprobs, RANK_EDGES)
    lm_all, knnlm_all = perplexity(run.lm_logprobs), perplexity(run.knnlm_logprobs)
    return {
        "rank_edges": list(RANK_EDGES),
        "buckets": [{"bucket": names[i], "rank_lo": int(b["rank_lo"][i]),
                     "rank_hi": None if b["rank_hi"][i] < 0 else int(b["rank_hi"][i]),
                     "tokens": int(b["tokens"][i]), "lm_ppl": _json_number(b["lm_ppl"][i]),
                     "knnlm_ppl": _json_number(b["knnlm_ppl"][i]),
                     "relative_change": _json_number(b["relative_change"][i])} for i in range(len(names))],
        "all": {"tokens": int(len(run.targets)), "lm_ppl": _json_number(lm_all), "knnlm_ppl": _json_number(knnlm_all),
                "relative_change": _json_number(knnlm_all / lm_all - 1)},
    }


def _frequent_key_fit(run: EvaluatedRun, frequent: np.ndarray, losses: np.ndarray, threshold: float, seed: int,
                      max_points: int) -> GmmSplit:
    """`gmm_loglik_split` on a seed's sample of the frequent-word tokens; only the sampled rows of the memory-mapped
    (n, d) query keys are read."""
    rng = np.random.default_rng(seed)
    picked = np.sort(rng.choice(len(frequent), size=min(len(frequent), max_points), replace=False))
    return gmm_loglik_split(run.query_keys[frequent[picked]], losses[picked], threshold, seed=seed, max_points=max_points)


def gmm_record(run: EvaluatedRun, frequent_words: int, max_points: int, repeats: int, seed: int) -> dict:
    """gmm.json: the GMM split of the frequent-word keys, fitted `repeats` times (seeds seed, seed + 1, ...).

    One fit per seed (its own sample and initialisation): the spread of the difference over fits says how much of it
    is EM's and the sample's noise. The unsuffixed means and difference are the first fit's; `*_per_fit` hold all.
    """
    frequent = np.flatnonzero(frequency_ranks(run.train_counts)[run.targets] < frequent_words)  # token indices
    losses = run.knnlm_losses[frequent]
    threshold = float(np.median(losses)) if len(losses) else math.nan  # median over all frequent tokens
    fits = [_frequent_key_fit(run, frequent, losses, threshold, seed + r, max_points) for r in range(repeats)]
    first, diffs = fits[0], [f.difference for f in fits]
    return {
        "frequent_words": frequent_words, "frequent_tokens": int(len(frequent)),
        "scored_keys": int(len(first.loglik_high) + len(first.loglik_low)),
        "threshold": _json_number(first.threshold), "n_high": int(len(first.loglik_high)),
        "n_low": int(len(first.loglik_low)), "mean_loglik_high": _json_number(first.mean_high),
        "mean_loglik_low": _json_number(first.mean_low), "difference_low_minus_high": _json_number(first.difference),
        "mean_loglik_high_per_fit": [_json_number(f.mean_high) for f in fits],
        "mean_loglik_low_per_fit": [_json_number(f.mean_low) for f in fits],
        "difference_per_fit": [_json_number(d) for d in diffs], "difference_mean": _json_number(np.mean(diffs)),
        "difference_std": _json_number(np.std(diffs)),  # population std (ddof 0) over the fits
        "n_components": first.n_components, "covariance_type": first.covariance_type, "seed": seed,
        "key_dim": int(run.query_keys.shape[1]),
    }


def extras_records(runs: list[EvaluatedRun]) -> dict:
    """extras.json: key norms, nearest-neighbour distances (with their histograms on bins shared by all runs) and how
    often the target is among the k neighbours."""
    norms, nearest, found = [], [], []
    for run in runs:
        norms.append(key_squared_norms(run.query_keys))  # (n,)
        nearest.append(np.asarray(run.distances[:, 0], dtype=np.float64))  # (n,) squared distance to the nearest key
        found.append(target_in_neighbors(run.neighbors, run.vals, run.targets, int(run.summary["k"])))
    return {run.label: {
        "key_sq_norm_mean": float(sq.mean()), "key_sq_norm_std": float(sq.std()),
        "key_norm_mean": float(np.sqrt(sq).mean()), "key_norm_std": float(np.sqrt(sq).std()),
        "nn_distance_median": float(np.median(nn)), "k": int(run.summary["k"]), "target_in_neighbors": float(f.mean()),
        "key_sq_norm_histogram": norm_hist, "nn_distance_histogram": nn_hist,
    } for run, sq, nn, f, norm_hist, nn_hist in zip(runs, norms, nearest, found, log_histograms(norms),
                                                     log_histograms(nearest))}


# --------------------------------------------------------------------------------------------------------------
# Markdown from the records


def _fmt(x: float | None, spec: str = ".2f") -> str:
    return "–" if x is None or not math.isfinite(x) else format(x, spec)


def _percent(x: float | None) -> str:
    return "–" if x is None or not math.isfinite(x) else f"{100 * x:+.1f}%"


def buckets_markdown(buckets: dict) -> str:
    rows = []
    for label, rec in buckets.items():
        for b in rec["buckets"]:
            rows.append([label, b["bucket"], str(b["tokens"]), _fmt(b["lm_ppl"]), _fmt(b["knnlm_ppl"]),
                         _percent(b["relative_change"])])
        a = rec["all"]
        rows.append([label, "**all**", str(a["tokens"]), _fmt(a["lm_ppl"]), _fmt(a["knnlm_ppl"]),
                     _percent(a["relative_change"])])
    return markdown_table("Valid perplexity by training-frequency rank of the target word (`buckets.json`)",
                          ["run", "target's training-frequency rank", "tokens", "LM ppl", "kNN-LM ppl", "kNN-LM vs LM"],
                          rows, "kNN-LM vs LM: kNN-LM ppl / LM ppl − 1 (negative: the kNN-LM is better).")


def summary_markdown(runs: dict, buckets: dict, gmm: dict, extras: dict, figures: set[str]) -> str:
    """summary.md from the four records; links only the figures in `figures` (those present in the folder)."""
    def figure(name: str, alt: str) -> str:
        return f"![{alt}]({name})\n" if name in figures else f"({name}: not drawn)\n"

    stale = [name for key, name, _ in HISTOGRAMS if name in figures and not all(key in e for e in extras.values())]
    run_rows = [[label, f"`{r['run']}`", str(r["tokens"]), _fmt(r["lm_ppl"]), _fmt(r["knnlm_ppl"]),
                 f"{r['lambda']:g}", str(r["k"]), _fmt(r["temperature"], "g")] for label, r in runs.items()]
    gmm_rows = [[label, _fmt(g["threshold"]), f"{g['n_high']} / {g['n_low']}", _fmt(g["mean_loglik_high"], ".1f"),
                 _fmt(g["mean_loglik_low"], ".1f"), _fmt(g["difference_low_minus_high"], ".1f"),
                 f"{_fmt(g['difference_mean'], '.1f')} ± {_fmt(g['difference_std'], '.1f')} "
                 f"({len(g['difference_per_fit'])} fits)"] for label, g in gmm.items()]
    extra_rows = [[label, _fmt(e["key_norm_mean"]), _fmt(e["key_norm_std"]), _fmt(e["key_sq_norm_mean"]),
                   _fmt(e["nn_distance_median"], ".3g"), f"{100 * e['target_in_neighbors']:.1f}% (k={e['k']})"]
                  for label, e in extras.items()]
    g0 = next(iter(gmm.values()))
    sections = [
        "# Representation analyses\n\nMade by `knnlm analyze` from the saved valid-set artifacts of each run (no model, "
        "no search), and redrawn from the JSON records beside this file by `python -m knnlm.studies.analysis --redraw`.\n",
        markdown_table("Runs (`runs.json`)", ["run", "folder", "valid tokens", "LM ppl", "kNN-LM ppl", "λ", "k",
                                              "temperature"], run_rows,
                       "Numbers: " + plots.describe_runs(runs) + "."),
        buckets_markdown(buckets),
        "### kNN-LM gain by training frequency (Figure 2 analogue)\n\nBars: kNN-LM ppl / LM ppl − 1 (%) of the tokens "
        "in each training-frequency rank bucket of the target, one bar per run; the right-hand group is over all "
        "tokens. Drawn from `buckets.json` and `runs.json`.\n\n" + figure(FIGURE2, "kNN-LM gain by frequency"),
        markdown_table(
            "Clustering of frequent-word keys (Figure 3 analogue, `gmm.json`)",
            ["run", "loss threshold (nats)", "n high / low", "mean loglik high (fit 1)", "mean loglik low (fit 1)",
             "low − high (fit 1)", "low − high, mean ± std over fits"], gmm_rows,
            f"Query keys of tokens whose target is among the {g0['frequent_words']} most frequent training words, "
            f"split at the median kNN-LM loss; a {g0['n_components']}-component {g0['covariance_type']} Gaussian "
            "mixture fitted and scored on a fixed-seed sample, repeated with other seeds (each its own sample and "
            "initialisation). Absolute log-likelihoods depend on the keys' scale; compare the differences, and their "
            "spread over fits. Figure: the mean over the fits of (mean log-likelihood of the low-loss keys − that of "
            "the high-loss keys) per run, error bars ± 1 std over the fits (population std), crosses the single "
            "fits.") + "\n" + figure(FIGURE3, "GMM log-likelihood difference"),
        markdown_table("Keys and neighbours (`extras.json`)",
                       ["run", "key norm mean", "key norm std", "key ‖·‖² mean", "nearest distance median (squared)",
                        "target among k neighbours"], extra_rows,
                       f"{' and '.join(stale)}: drawn by `knnlm analyze` from the run folders; this extras.json holds "
                       "no histogram to redraw them from." if stale else "")
        + "\n" + "\n".join(figure(name, name.removesuffix(".png").replace("_", " ")) for _, name, _ in HISTOGRAMS),
    ]
    return "\n".join(sections)


# --------------------------------------------------------------------------------------------------------------
# The driver: records from the runs, then everything else from the records


def _default_labels(runs: list[Path]) -> list[str]:
    names = [r.resolve().name for r in runs]  # the folder names, or `study/run` where two runs share a name
    return names if len(set(names)) == len(names) else ["/".join(r.resolve().parts[-2:]) for r in runs]


def analyze(out: Path, runs: list[Path], labels: list[str] | None = None, *, frequent_words: int = FREQUENT_WORDS,
            gmm_max_points: int = 20000, gmm_repeats: int = 3, seed: int = 0) -> dict:
    """Write the JSON records of every analysis of the evaluated `runs` into `out`, then the figures and Markdown
    drawn from them (`redraw`); return the records."""

    out, runs = Path(out), [Path(r) for r in runs]
    if not runs:
        raise UserError("analyze: give at least one run folder")
    labels = list(labels) if labels else _default_labels(runs)
    if len(labels) != len(runs):
        raise UserError(f"--labels: {len(labels)} labels for {len(runs)} runs")
    if len(set(labels)) != len(labels):
        raise UserError(f"--labels: labels must differ, got {labels}")
    loaded = [load_run(r, lab) for r, lab in zip(runs, labels)]  # every input checked before anything is written
    machine = "cpu: " + cpu_name()  # the machine that held the run folders and read them
    records = {
        "runs": {run.label: run_record(run, machine) for run in loaded},
        "buckets": {run.label: buckets_record(run) for run in loaded},
        "gmm": {run.label: gmm_record(run, frequent_words, gmm_max_points, gmm_repeats, seed) for run in loaded},
        "extras": extras_records(loaded),
    }
    out.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(RECORDS, 1):
        write_json(out / f"{name}.json", records[name])
        kill_point("analyze", i)
    redraw(out)
    return records


def redraw(out: Path) -> list[str]:
    """Rewrite buckets.md, summary.md and every figure in `out` from its JSON records alone (no run folder is read).

    Returns one note per figure left as it was because the records lack its data (extras.json written before the
    histograms were recorded)."""
    out = Path(out)
    runs, buckets, gmm, extras = (read_json(out / f"{name}.json", f"analysis record ({name}.json)") for name in RECORDS)
    if not list(runs) == list(buckets) == list(gmm) == list(extras):
        raise UserError(f"{out}: the records' run labels differ: {list(runs)}, {list(buckets)}, {list(gmm)}, "
                        f"{list(extras)}")
    write_text(out / "buckets.md", buckets_markdown(buckets))
    plots.plot_gain_by_frequency(buckets, runs, out / FIGURE2)
    plots.plot_gmm_separation(gmm, runs, out / FIGURE3)
    notes = []
    for key, name, xlabel in HISTOGRAMS:
        if all(key in e for e in extras.values()):
            plots.plot_histogram_records({label: e[key] for label, e in extras.items()}, runs, out / name, xlabel)
        else:
            notes.append(f"{out / name}: extras.json has no {key!r} for every run; the figure was left as it was")
    figures = {p.name for p in out.glob("*.png")}
    write_text(out / "summary.md", summary_markdown(runs, buckets, gmm, extras, figures))
    return notes


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m knnlm.studies.analysis",
                                     description="Redraw an analysis folder's figures and Markdown from its JSON records.")
    parser.add_argument("--redraw", required=True, metavar="OUT", help="a folder written by `knnlm analyze`")
    args = parser.parse_args(argv)
    try:
        notes = redraw(Path(args.redraw))
    except UserError as e:
        raise SystemExit(f"error: {e}") from None
    for note in notes:
        print(note)


if __name__ == "__main__":
    main()

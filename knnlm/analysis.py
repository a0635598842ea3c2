"""Analyses of the learned representations (the paper's section 4.4), from saved artifacts only.

    knnlm analyze RUN_A RUN_B --labels ω=0 ω=0.001 --out results/analysis

Every number here is read from what `knnlm evaluate` saved in RUN/eval/valid/ and from the datastore's values;
the model is never loaded and the search is never rerun. Per run (V words, n valid tokens, d key dimensions):

- Frequency buckets: valid LM and kNN-LM perplexity of the tokens whose target is among the top 100 words by
  training frequency, ranks 100–1k, 1k–10k and the rest (`buckets.md`, `buckets.json`).
- Figure 2 analogue: a histogram of training frequency over the valid target words, each bar coloured by the mean
  per-token kNN-LM loss of its words (`figure2_frequency_loss.png`).
- Figure 3 analogue: the query keys of frequent-word tokens, split at a loss threshold into high- and low-loss
  groups, scored by a 10-component Gaussian mixture; higher log-likelihood means closer to a cluster
  (`figure3_gmm_loglik.png`, `gmm.json`).
- Extras: key squared norms, nearest-neighbour distances and how often the target is among the k neighbours
  (`key_norms.png`, `nn_distances.png`, `extras.json`).

`summary.md` collects the tables and links the figures.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import plots  # noqa: F401  (sets the Agg backend before pyplot is imported below)
from .artifacts import UserError, load_npy, read_json, read_meta, write_json, write_text
from .knn import interpolate, perplexity

import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.cm import ScalarMappable  # noqa: E402
from matplotlib.colors import Normalize  # noqa: E402

RANK_EDGES = (100, 1000, 10000)  # frequency-rank bucket boundaries: top 100, 100–1k, 1k–10k, the rest
FREQUENT_WORDS = 100  # "the most frequent words" of the GMM analysis
ROW_CHUNK = 16384  # rows per chunk when streaming (n, d) or (n, K) arrays from memory-mapped files


# --------------------------------------------------------------------------------------------------------------
# Loading one evaluated run


@dataclass
class EvaluatedRun:
    """The saved artifacts of one run that the analyses read; the large arrays stay memory-mapped."""

    label: str
    folder: Path
    summary: dict  # RUN/eval/valid/summary.json: lm_ppl, knnlm_ppl, lambda, k, temperature, ...
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
    return EvaluatedRun(
        label=label, folder=folder, summary=summary, train_counts=training_counts(vals, vocab_size),
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


def word_frequency_loss(train_counts: np.ndarray, targets: np.ndarray, losses: np.ndarray) -> dict[str, np.ndarray]:
    """Per distinct target word of valid (u words): its id, training frequency, valid occurrences and accumulated loss.

    losses (n,) per-token losses in nats; accumulated loss of word w = Σ losses of the tokens whose target is w.
    """
    words, which = np.unique(targets, return_inverse=True)  # (u,), (n,)
    return {
        "words": words,
        "train_freq": train_counts[words],
        "occurrences": np.bincount(which, minlength=len(words)),
        "accumulated_loss": np.bincount(which, weights=losses.astype(np.float64), minlength=len(words)),
    }


def frequency_loss_histogram(train_freq: np.ndarray, occurrences: np.ndarray, accumulated_loss: np.ndarray,
                             bin_edges: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Figure 2's bars: (bins,) number of words per training-frequency bin and (bins,) the bar's colour value.

    The colour value is the mean loss per token of the bar's words: Σ accumulated loss / Σ valid occurrences
    (NaN for an empty bar). Unlike the raw accumulated loss it does not grow with how many words or tokens a bar
    holds, so bars and runs compare on one scale.
    """
    words_per_bin = np.histogram(train_freq, bin_edges)[0]
    loss_per_bin = np.histogram(train_freq, bin_edges, weights=accumulated_loss)[0]
    tokens_per_bin = np.histogram(train_freq, bin_edges, weights=occurrences)[0]
    with np.errstate(invalid="ignore", divide="ignore"):
        return words_per_bin, np.where(tokens_per_bin > 0, loss_per_bin / tokens_per_bin, np.nan)


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
    from sklearn.mixture import GaussianMixture  # imported here: only this analysis needs scikit-learn

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
        neighbor_vals = vals[np.asarray(neighbors[lo : lo + ROW_CHUNK, :k])]  # (chunk, k)
        found[lo : lo + len(neighbor_vals)] = (neighbor_vals == targets[lo : lo + ROW_CHUNK, None]).any(1)
    return found


# --------------------------------------------------------------------------------------------------------------
# Figures (matplotlib, Agg backend)


def _log_bins(values: list[np.ndarray], n_bins: int) -> np.ndarray:
    """n_bins log-spaced edges covering the positive entries of all arrays (shared across runs)."""
    positive = [v[v > 0] for v in values]
    lo = min((v.min() for v in positive if len(v)), default=1.0)
    hi = max((v.max() for v in positive if len(v)), default=10.0)
    return np.logspace(math.log10(lo), math.log10(hi * 1.0001) if hi > lo else math.log10(lo) + 1, n_bins + 1)


def plot_frequency_loss(runs: list[EvaluatedRun], path: Path, n_bins: int = 30) -> None:
    """Figure 2: number of valid target words per training-frequency bin, bars coloured by mean kNN-LM loss."""
    per_word = [word_frequency_loss(r.train_counts, r.targets, r.knnlm_losses) for r in runs]
    # log-spaced bins from frequency 1: words never seen in training cannot sit on a log axis and are counted apart
    edges = _log_bins([w["train_freq"].astype(np.float64) for w in per_word], n_bins)
    edges[0] = min(edges[0], 1.0)
    bars = [frequency_loss_histogram(w["train_freq"], w["occurrences"], w["accumulated_loss"], edges) for w in per_word]
    colour_values = np.concatenate([c[np.isfinite(c)] for _, c in bars]) if bars else np.array([])
    norm = Normalize(*((colour_values.min(), colour_values.max()) if len(colour_values) else (0, 1)), clip=True)
    cmap = plt.get_cmap("viridis_r")  # as in the paper: darker violet = higher loss

    fig, axes = plt.subplots(1, len(runs), figsize=(5 * len(runs), 4), sharey=True, squeeze=False)
    for ax, run, w, (counts, colour) in zip(axes[0], runs, per_word, bars):
        ax.bar(edges[:-1], counts, width=np.diff(edges), align="edge", color=cmap(norm(np.nan_to_num(colour))),
               edgecolor="white", linewidth=0.3)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.invert_xaxis()  # the paper puts frequent words on the left
        ax.set_xlabel("training frequency (frequent words left)")
        unseen = int((w["train_freq"] == 0).sum())
        ax.set_title(run.label + (f"\n({unseen} words unseen in training not shown)" if unseen else ""), fontsize=10)
        ax.grid(alpha=0.2)
    axes[0, 0].set_ylabel("number of valid target words")
    fig.colorbar(ScalarMappable(norm=norm, cmap=cmap), ax=list(axes[0]),
                 label="mean kNN-LM loss per token of the bar's words (nats)")
    plots.save(fig, path)


def plot_gmm_loglik(splits: list[tuple[str, GmmSplit]], path: Path, n_bins: int = 60) -> None:
    """Figure 3: normalized histograms of GMM log-likelihood, high-loss (blue) vs low-loss (orange) keys."""
    fig, axes = plt.subplots(1, len(splits), figsize=(5 * len(splits), 3.6), squeeze=False)
    for ax, (label, s) in zip(axes[0], splits):
        both = np.concatenate([s.loglik_high, s.loglik_low])
        # a few far-away keys have very low likelihood; clip the range so the bulk stays readable
        lo, hi = np.percentile(both, [0.5, 99.5]) if len(both) else (0.0, 1.0)
        bins = np.linspace(lo, hi if hi > lo else lo + 1, n_bins + 1)
        for values, name, colour in ((s.loglik_high, "high loss", "tab:blue"), (s.loglik_low, "low loss", "tab:orange")):
            if len(values):
                ax.hist(values, bins=bins, density=True, alpha=0.55, color=colour,
                        label=f"{name} (n={len(values)}, mean {values.mean():.1f})")
        ax.set_title(f"{label}: mean low − mean high = {s.difference:.2f}")
        ax.set_xlabel("log-likelihood under the GMM (0.5–99.5 percentile range)")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.2)
    axes[0, 0].set_ylabel("normalized histogram")
    plots.save(fig, path)


def plot_overlaid_histograms(series: list[tuple[str, np.ndarray]], path: Path, xlabel: str, n_bins: int = 60) -> None:
    """Step histograms of one positive quantity per run on shared log-spaced bins, as the share of tokens per bin.

    Bins are equally wide in log x, so the share per bin is a density in log x; `density=True` would divide by
    the linear bin width and pile everything onto the smallest bins."""
    bins = _log_bins([v for _, v in series], n_bins)
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, values in series:
        zeros = int((values <= 0).sum())
        positive = values[values > 0]
        ax.hist(positive, bins=bins, weights=np.full(len(positive), 1 / max(len(values), 1)), histtype="step",
                linewidth=1.5, label=label + (f" ({zeros} zeros not shown)" if zeros else ""))
    ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("share of tokens per bin")
    ax.legend()
    ax.grid(alpha=0.2)
    plots.save(fig, path)


# --------------------------------------------------------------------------------------------------------------
# Tables and the driver


def _json_number(x) -> float | int | None:
    """JSON has no NaN/inf: such values are written as null."""
    x = x.item() if isinstance(x, np.generic) else x
    return x if isinstance(x, int) or math.isfinite(x) else None


def _markdown_table(header: list[str], rows: list[list[str]]) -> str:
    return "\n".join(["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
                     + ["| " + " | ".join(r) + " |" for r in rows])


def _fmt(x: float, spec: str = ".2f") -> str:
    return "–" if x is None or not math.isfinite(x) else format(x, spec)


def _percent(x: float) -> str:
    return "–" if not math.isfinite(x) else f"{100 * x:+.1f}%"


def _frequent_key_fit(run: EvaluatedRun, frequent: np.ndarray, losses: np.ndarray, threshold: float, seed: int,
                      max_points: int) -> GmmSplit:
    """`gmm_loglik_split` on a seed's sample of the frequent-word tokens; only the sampled rows of the memory-mapped
    (n, d) query keys are read."""
    rng = np.random.default_rng(seed)
    picked = np.sort(rng.choice(len(frequent), size=min(len(frequent), max_points), replace=False))
    return gmm_loglik_split(run.query_keys[frequent[picked]], losses[picked], threshold, seed=seed, max_points=max_points)


def _default_labels(runs: list[Path]) -> list[str]:
    names = [r.resolve().name for r in runs]
    return names if len(set(names)) == len(names) else [str(r) for r in runs]


def analyze(out: Path, runs: list[Path], labels: list[str] | None = None, *, frequent_words: int = FREQUENT_WORDS,
            gmm_max_points: int = 20000, gmm_repeats: int = 3, seed: int = 0) -> dict:
    """Write every table and figure of this module into `out` for the evaluated `runs`; return the numbers."""
    out, runs = Path(out), [Path(r) for r in runs]
    if not runs:
        raise UserError("analyze: give at least one run folder")
    labels = list(labels) if labels else _default_labels(runs)
    if len(labels) != len(runs):
        raise UserError(f"--labels: {len(labels)} labels for {len(runs)} runs")
    if len(set(labels)) != len(labels):
        raise UserError(f"--labels: labels must differ, got {labels}")
    loaded = [load_run(r, lab) for r, lab in zip(runs, labels)]  # every input checked before anything is written
    out.mkdir(parents=True, exist_ok=True)

    # frequency buckets -------------------------------------------------------------------------------------
    names = bucket_names(RANK_EDGES)
    buckets_json, bucket_rows = {}, []
    for run in loaded:
        b = frequency_buckets(run.train_counts, run.targets, run.lm_logprobs, run.knnlm_logprobs, RANK_EDGES)
        lm_all, knnlm_all = perplexity(run.lm_logprobs), perplexity(run.knnlm_logprobs)
        buckets_json[run.label] = {
            "folder": str(run.folder), "rank_edges": list(RANK_EDGES),
            "buckets": [{"bucket": names[i], "rank_lo": int(b["rank_lo"][i]),
                         "rank_hi": None if b["rank_hi"][i] < 0 else int(b["rank_hi"][i]),
                         "tokens": int(b["tokens"][i]), "lm_ppl": _json_number(b["lm_ppl"][i]),
                         "knnlm_ppl": _json_number(b["knnlm_ppl"][i]),
                         "relative_change": _json_number(b["relative_change"][i])} for i in range(len(names))],
            "all": {"tokens": int(len(run.targets)), "lm_ppl": _json_number(lm_all), "knnlm_ppl": _json_number(knnlm_all),
                    "relative_change": _json_number(knnlm_all / lm_all - 1)},
        }
        for i, name in enumerate(names):
            bucket_rows.append([run.label, name, str(b["tokens"][i]), _fmt(b["lm_ppl"][i]), _fmt(b["knnlm_ppl"][i]),
                                _percent(b["relative_change"][i])])
        bucket_rows.append([run.label, "**all**", str(len(run.targets)), _fmt(lm_all), _fmt(knnlm_all),
                            _percent(knnlm_all / lm_all - 1)])
    bucket_table = _markdown_table(
        ["run", "target's training-frequency rank", "tokens", "LM ppl", "kNN-LM ppl", "kNN-LM vs LM"], bucket_rows)
    write_json(out / "buckets.json", buckets_json)
    write_text(out / "buckets.md", "# Valid perplexity by training-frequency rank of the target word\n\n"
                f"{bucket_table}\n")

    # Figure 2 ------------------------------------------------------------------------------------------------
    plot_frequency_loss(loaded, out / "figure2_frequency_loss.png")

    # Figure 3: GMM on the query keys of frequent-word tokens -------------------------------------------------
    gmm_json, splits = {}, []
    for run in loaded:
        frequent = np.flatnonzero(frequency_ranks(run.train_counts)[run.targets] < frequent_words)  # token indices
        losses = run.knnlm_losses[frequent]
        threshold = float(np.median(losses)) if len(losses) else math.nan  # median over all frequent tokens
        # One fit per seed (its own sample and initialisation): the spread of the difference over fits says how much
        # of it is EM's and the sample's noise. The figure and the first columns show the first fit.
        fits = [_frequent_key_fit(run, frequent, losses, threshold, seed + r, gmm_max_points) for r in range(gmm_repeats)]
        split, diffs = fits[0], [f.difference for f in fits]
        splits.append((run.label, split))
        gmm_json[run.label] = {
            "frequent_words": frequent_words, "frequent_tokens": int(len(frequent)),
            "scored_keys": int(len(split.loglik_high) + len(split.loglik_low)),
            "threshold": _json_number(split.threshold), "n_high": int(len(split.loglik_high)),
            "n_low": int(len(split.loglik_low)), "mean_loglik_high": _json_number(split.mean_high),
            "mean_loglik_low": _json_number(split.mean_low), "difference_low_minus_high": _json_number(split.difference),
            "difference_per_fit": [_json_number(d) for d in diffs], "difference_mean": _json_number(np.mean(diffs)),
            "difference_std": _json_number(np.std(diffs)),
            "n_components": split.n_components, "covariance_type": split.covariance_type, "seed": seed,
            "key_dim": int(run.query_keys.shape[1]),
        }
    write_json(out / "gmm.json", gmm_json)
    plot_gmm_loglik(splits, out / "figure3_gmm_loglik.png")

    # extras --------------------------------------------------------------------------------------------------
    extras_json, norms, nn = {}, [], []
    for run in loaded:
        sq_norms = key_squared_norms(run.query_keys)  # (n,)
        nearest = np.asarray(run.distances[:, 0], dtype=np.float64)  # (n,) squared distance to the nearest key
        k = int(run.summary["k"])
        found = target_in_neighbors(run.neighbors, run.vals, run.targets, k)
        norms.append((run.label, sq_norms))
        nn.append((run.label, nearest))
        extras_json[run.label] = {
            "key_sq_norm_mean": float(sq_norms.mean()), "key_sq_norm_std": float(sq_norms.std()),
            "key_norm_mean": float(np.sqrt(sq_norms).mean()), "key_norm_std": float(np.sqrt(sq_norms).std()),
            "nn_distance_median": float(np.median(nearest)), "k": k, "target_in_neighbors": float(found.mean()),
        }
    write_json(out / "extras.json", extras_json)
    plot_overlaid_histograms(norms, out / "key_norms.png", "squared L2 norm of the query key")
    plot_overlaid_histograms(nn, out / "nn_distances.png", "squared L2 distance to the nearest datastore key")

    write_text(out / "summary.md", _summary_markdown(loaded, bucket_table, gmm_json, extras_json))
    return {"buckets": buckets_json, "gmm": gmm_json, "extras": extras_json}


def _summary_markdown(runs: list[EvaluatedRun], bucket_table: str, gmm: dict, extras: dict) -> str:
    run_rows = [[r.label, f"`{r.folder}`", str(len(r.targets)), _fmt(r.summary.get("lm_ppl", math.nan)),
                 _fmt(r.summary.get("knnlm_ppl", math.nan)), f"{r.summary['lambda']:g}", str(r.summary["k"]),
                 f"{r.summary.get('temperature', math.nan):g}"] for r in runs]
    gmm_rows = [[label, _fmt(g["threshold"]), f"{g['n_high']} / {g['n_low']}", _fmt(g["mean_loglik_high"], ".1f"),
                 _fmt(g["mean_loglik_low"], ".1f"), _fmt(g["difference_low_minus_high"], ".1f"),
                 f"{_fmt(g['difference_mean'], '.1f')} ± {_fmt(g['difference_std'], '.1f')} ({len(g['difference_per_fit'])} fits)"]
                for label, g in gmm.items()]
    extra_rows = [[label, _fmt(e["key_norm_mean"]), _fmt(e["key_norm_std"]), _fmt(e["key_sq_norm_mean"]),
                   _fmt(e["nn_distance_median"], ".3g"), f"{100 * e['target_in_neighbors']:.1f}% (k={e['k']})"]
                  for label, e in extras.items()]
    frequent_words = next(iter(gmm.values()))["frequent_words"]
    return f"""# Representation analyses

Made by `knnlm analyze` from the saved valid-set artifacts of each run (no model, no search).

## Runs

{_markdown_table(["run", "folder", "valid tokens", "LM ppl", "kNN-LM ppl", "λ", "k", "temperature"], run_rows)}

## Perplexity by training-frequency rank of the target (`buckets.md`, `buckets.json`)

{bucket_table}

## Frequency and loss (Figure 2 analogue)

Bars: number of valid target words per training-frequency bin (log-spaced, frequent words on the left, log y).
Colour: mean kNN-LM loss per token of the bar's words (Σ accumulated loss / Σ occurrences), one scale for all runs.

![frequency/loss](figure2_frequency_loss.png)

## Clustering of frequent-word keys (Figure 3 analogue, `gmm.json`)

Query keys of tokens whose target is among the {frequent_words} most frequent training words, split at the median
kNN-LM loss; a 10-component diagonal Gaussian mixture fitted and scored on a fixed-seed sample, repeated with
other seeds (each its own sample and initialisation; the histograms show the first fit). Absolute
log-likelihoods depend on the keys' scale; compare the differences, and their spread over fits.

{_markdown_table(["run", "loss threshold (nats)", "n high / low", "mean loglik high", "mean loglik low",
                  "low − high", "low − high over fits"], gmm_rows)}

![GMM log-likelihood](figure3_gmm_loglik.png)

## Keys and neighbours (`extras.json`)

{_markdown_table(["run", "key norm mean", "key norm std", "key ‖·‖² mean", "nearest distance median (squared)",
                  "target among k neighbours"], extra_rows)}

![key norms](key_norms.png)

![nearest-neighbour distances](nn_distances.png)
"""

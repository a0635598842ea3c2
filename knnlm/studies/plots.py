"""Every figure of the project, drawn from saved numbers (never from a model): the sweep's ω curve, regularizer and
objective comparisons (from its tables), and the representation analyses (from the JSON records of
`knnlm/studies/analysis.py`: gain by frequency, GMM separation, key-norm and distance histograms)."""

from __future__ import annotations

import math
import textwrap
from pathlib import Path

import numpy as np

from ..artifacts import atomic_path, optional_import
from .statistics import t_interval

matplotlib = optional_import("matplotlib", "plots", "figures")  # an extra: training and evaluation never draw
matplotlib.use("Agg")
plt = optional_import("matplotlib.pyplot", "plots", "figures")


# a curve against ω, or a fit through it, needs two ω at least: one ω draws a single point and fits nothing
MIN_OMEGAS = 2


def save(fig, path: Path) -> None:
    with atomic_path(path, suffix=Path(path).suffix) as tmp:
        fig.savefig(tmp, format=Path(path).suffix.lstrip("."), dpi=130, bbox_inches="tight")
    plt.close(fig)


def omega_positions(omegas: list[float]) -> tuple[np.ndarray, list[str]]:
    """x positions of ω on a log10 axis; ω = 0 sits one decade left of the smallest ω > 0 (the axis is broken there)."""
    positive = [o for o in omegas if o > 0]
    zero_at = (math.log10(min(positive)) - 1) if positive else 0.0
    return np.array([math.log10(o) if o > 0 else zero_at for o in omegas]), [f"{o:g}" for o in omegas]


def plot_omega_curve(table: dict, path: Path, title: str) -> bool:
    """Valid LM perplexity and kNN-LM perplexity under both evaluation protocols against ω (the paper's Figure 1),
    mean ± std over seeds as error bars; ω on a log axis, ω = 0 set apart at its left. Draws nothing (False) for
    fewer than MIN_OMEGAS ω."""
    omegas = list(table)
    if len(omegas) < MIN_OMEGAS:
        return False
    x, labels = omega_positions(omegas)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    series = (("valid_knnlm_ppl_paper", "kNN-LM, paper protocol (T = 1, k = 1024, λ tuned)", "tab:red", axes[0]),
              ("valid_knnlm_ppl", "kNN-LM, tuned (λ, k, T tuned)", "tab:orange", axes[0]),
              ("valid_lm_ppl", "LM alone", "tab:blue", axes[1]))
    for metric, label, color, ax in series:
        os_ = [o for o in omegas if metric in table[o]]
        if not os_:
            continue
        xs = x[[omegas.index(o) for o in os_]]
        ax.errorbar(xs, [table[o][metric][0] for o in os_], yerr=[table[o][metric][1] for o in os_], fmt="o-",
                    color=color, capsize=4, label=label)
    labels = [f"{lab}\n(n = {table[o]['valid_lm_ppl'][2]})" for lab, o in zip(labels, omegas)]
    for ax, name in zip(axes, ("kNN-LM", "LM")):
        ax.set_xticks(x, labels)
        if any(o == 0 for o in omegas) and len(omegas) > 1:
            ax.axvline((x[0] + x[1]) / 2, color="grey", lw=0.8, ls=":")  # the break between ω = 0 and the log axis
        ax.set_xlabel("ω (regularizer weight; log scale right of the dotted break)")
        ax.set_ylabel(f"valid {name} perplexity")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"{title}\n(points: mean over the n seeds of each ω; bars: ± 1 std across them)", fontsize=10)
    fig.tight_layout()
    save(fig, path)
    return True


def plot_temperature_vs_norm(points: list[tuple[float, float, float]], fit: dict, path: Path, title: str) -> bool:
    """Tuned kNN temperature against mean squared key norm, one point per model (log-log), with the fitted line
    and the slope-1 line (T ∝ ‖r‖²) through the points' mean. Draws nothing (False) for fewer than MIN_OMEGAS ω:
    a fit through the models of one ω says nothing about the key scale."""
    omegas = sorted({p[2] for p in points})
    if len(omegas) < MIN_OMEGAS:
        return False
    fig, ax = plt.subplots(figsize=(5.5, 4.2))
    cmap = plt.get_cmap("viridis", max(2, len(omegas)))
    for i, o in enumerate(omegas):
        ps = [p for p in points if p[2] == o]
        ax.scatter([p[0] for p in ps], [p[1] for p in ps], color=cmap(i), label=f"ω = {o:g}", zorder=3)
    xs = np.array([p[0] for p in points])
    grid = np.geomspace(xs.min() / 1.5, xs.max() * 1.5, 50)
    if math.isfinite(fit["slope"]):
        ax.plot(grid, 10 ** fit["intercept"] * grid ** fit["slope"], "k--", lw=1, label=f"fit: slope {fit['slope']:.2f}")
    c = np.exp(np.mean(np.log([p[1] / p[0] for p in points])))
    ax.plot(grid, c * grid, color="grey", lw=1, ls=":", label="T ∝ ‖r‖² (slope 1)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("mean ‖r‖² of the valid keys (log scale)")
    ax.set_ylabel("tuned temperature T* (log scale)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    save(fig, path)
    return True


def plot_regularizer_comparison(rows: dict, path: Path, title: str) -> None:
    """Mean ± std of valid LM and kNN-LM perplexity per regularizer, one panel each with its own y-range, so that
    differences of a point or two stay visible: {label: {metric: (mean, std, n)}}."""
    names = list(rows)
    x = np.arange(len(names))
    fig, axes = plt.subplots(1, 2, figsize=(8, 3.6))
    for ax, (metric, label) in zip(axes, (("valid_lm_ppl", "valid LM"), ("valid_knnlm_ppl", "valid kNN-LM"))):
        ax.errorbar(x, [rows[n][metric][0] for n in names], yerr=[rows[n][metric][1] for n in names],
                    fmt="o", capsize=5, ms=6)
        ax.set_xticks(x, names)
        ax.set_xlim(-0.5, len(names) - 0.5)
        ax.set_ylabel(f"{label} perplexity")
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(title + " (mean ± std over seeds)")
    fig.tight_layout()
    save(fig, path)


def plot_ppl_by_k(panels: dict, path: Path, title: str) -> bool:
    """Valid kNN-LM perplexity at each k, one panel per protocol and one line per ω: {panel: {ω label: {k: (mean,
    std)}}}; k on a log axis, bands ± 1 std across seeds. Draws nothing (False) unless every panel has MIN_OMEGAS
    lines (one line is no comparison)."""
    if not panels or any(len(curves) < MIN_OMEGAS for curves in panels.values()):
        return False
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4), squeeze=False)
    for ax, (panel, curves) in zip(axes[0], panels.items()):
        for label, by_k in curves.items():
            ks = sorted(by_k)
            mean = np.array([by_k[k][0] for k in ks])
            std = np.array([by_k[k][1] for k in ks])
            line, = ax.plot(ks, mean, "o-", ms=3, label=label)
            ax.fill_between(ks, mean - std, mean + std, color=line.get_color(), alpha=0.2)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("k (neighbours)")
        ax.set_ylabel("valid kNN-LM perplexity")
        ax.set_title(panel, fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(title="ω", fontsize=7)
    fig.suptitle(title + " (bands: ± 1 std across seeds)", fontsize=10)
    fig.tight_layout()
    save(fig, path)
    return True


def plot_paired_objectives(paired: dict, path: Path, title: str) -> None:
    """Per objective (at its weight), the kNN-LM perplexity change against ω = 0 of the same seed under both
    protocols: mean ± std of the per-seed differences (error bars), 0 marked; the title names the devices."""
    names = list(paired)
    x = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(1.8 * len(names) + 3, 3.8))
    for off, (metric, label, color) in zip((-0.12, 0.12), (("valid_knnlm_ppl", "tuned protocol", "tab:orange"),
                                                          ("valid_knnlm_ppl_paper", "paper protocol (T = 1)", "tab:red"))):
        ax.errorbar(x + off, [paired[n][metric][0] for n in names], yerr=[paired[n][metric][1] for n in names],
                    fmt="o", capsize=5, color=color, label=label)
    ax.axhline(0, color="grey", lw=0.8)
    seeds = {n: paired[n]["valid_knnlm_ppl"][2] for n in names}
    ax.set_xticks(x, [f"{n}, weight {paired[n]['weight']:g}\n(n = {seeds[n]} seed{'' if seeds[n] == 1 else 's'})"
                      for n in names])
    ax.set_xlim(-0.6, len(names) - 0.4)
    ax.set_ylabel("Δ valid kNN-LM perplexity vs ω = 0\n(negative = better)")
    devices = sorted({d for n in names for d in paired[n]["devices"]})
    ax.set_title(f"{title}\n(points: mean of per-seed differences; bars: ± 1 std, none for one seed; "
                 f"trained on {', '.join(devices)})", fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    save(fig, path)


# --------------------------------------------------------------------------------------------------------------
# The representation analyses, from their JSON records only (runs.json, buckets.json, gmm.json, extras.json), so a
# committed results folder can be redrawn without its run folders. Each returns its Axes, for tests to read.


def describe_runs(runs: dict) -> str:
    """What the analysed numbers are, from runs.json: split, tokens, protocol, seed and machine (each once if every
    run agrees)."""
    def shared(key: str) -> str:
        return ", ".join(dict.fromkeys("not recorded" if r.get(key) is None else str(r[key]) for r in runs.values()))

    recs = list(runs.values())
    if all(r.get("max_eval_tokens") and r["max_eval_tokens"] == r["tokens"] for r in recs):
        tokens = f"first {int(recs[0]['tokens']):,} tokens" if len({r["tokens"] for r in recs}) == 1 else \
            f"first {shared('tokens')} tokens"
    else:
        tokens = f"{shared('tokens')} tokens"
    return f"{shared('split')} split, {tokens}, protocol {shared('protocol')}, seed {shared('seed')}; " \
           f"machine: {shared('machine')}"


def analysis_caption(runs: dict) -> str:
    """describe_runs, then the run folders, wrapped for a figure title."""
    lines = [describe_runs(runs), "runs: " + ", ".join(r["run"] for r in runs.values())]
    return "\n".join(textwrap.fill(line, 130) for line in lines)


def plot_gain_by_frequency(buckets: dict, runs: dict, path: Path):
    """Figure 2 analogue: the kNN-LM's relative change in valid perplexity against the LM (kNN-LM ppl / LM ppl − 1,
    in %) per training-frequency rank bucket of the target word, one bar per run (ω) in each group, and the same
    over all tokens in the right-hand group. buckets, runs: buckets.json and runs.json."""
    labels = list(buckets)
    names = [b["bucket"] for b in buckets[labels[0]]["buckets"]]
    assert all([b["bucket"] for b in buckets[lab]["buckets"]] == names for lab in labels), "one bucket set for all"
    groups = [*names, "all tokens"]
    tokens = [[b["tokens"] for b in buckets[lab]["buckets"]] + [buckets[lab]["all"]["tokens"]] for lab in labels]
    ticks = [f"{g}\n({n:,} tokens)" for g, n in zip(groups, tokens[0])] if all(t == tokens[0] for t in tokens) else groups
    width = 0.8 / len(labels)
    fig, ax = plt.subplots(figsize=(max(7.0, len(groups) * (1 + 0.2 * len(labels))), 5), layout="constrained")
    for i, lab in enumerate(labels):
        rec = buckets[lab]
        change = [b["relative_change"] for b in rec["buckets"]] + [rec["all"]["relative_change"]]
        heights = [math.nan if c is None else 100 * c for c in change]  # null: an empty bucket
        bars = ax.bar(np.arange(len(groups)) + (i - (len(labels) - 1) / 2) * width, heights, width, label=lab)
        ax.bar_label(bars, labels=[f"{h:.1f}" if math.isfinite(h) else "" for h in heights], fontsize=6, padding=1)
    ax.axhline(0, color="grey", lw=0.8)
    ax.axvline(len(names) - 0.5, color="grey", lw=0.8, ls=":")  # buckets | all tokens
    ax.set_xticks(np.arange(len(groups)), ticks)
    ax.set_xlabel("training-frequency rank of the target word (0 = most frequent in training)")
    ax.set_ylabel("kNN-LM ppl / LM ppl − 1 (%)\n(negative: the kNN-LM is better)")
    fig.suptitle("kNN-LM gain over the LM by training frequency of the target word (Figure 2 analogue)", fontsize=11)
    ax.set_title(analysis_caption(runs), fontsize=7)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, title="run")
    save(fig, path)
    return ax


def plot_gmm_separation(gmm: dict, runs: dict, path: Path):
    """Figure 3 analogue: per run, the mean GMM log-likelihood of the low-loss frequent-word keys minus that of the
    high-loss ones: the mean over the fits with ± 1 std over the fits as error bars, each fit as a cross.
    gmm, runs: gmm.json and runs.json (its difference_mean, difference_std and difference_per_fit)."""
    labels = list(gmm)
    x = np.arange(len(labels))
    mean = [math.nan if gmm[lab]["difference_mean"] is None else gmm[lab]["difference_mean"] for lab in labels]
    std = [math.nan if gmm[lab]["difference_std"] is None else gmm[lab]["difference_std"] for lab in labels]
    fits = [[math.nan if d is None else d for d in gmm[lab]["difference_per_fit"]] for lab in labels]
    fig, ax = plt.subplots(figsize=(max(7.0, 1.4 * len(labels) + 2), 5), layout="constrained")
    ax.errorbar(x, mean, yerr=std, fmt="o", capsize=6, ms=7, color="tab:blue",
                label="mean over the fits; error bars ± 1 std over the fits")
    for i, f in enumerate(fits):
        ax.scatter(np.full(len(f), i + 0.15), f, marker="x", s=25, color="grey", label="one fit" if i == 0 else None)
        if math.isfinite(mean[i]):
            ax.annotate(f"{mean[i]:.1f} ± {std[i]:.1f}", (i - 0.08, mean[i]), ha="right", va="center", fontsize=7)
    ax.axhline(0, color="grey", lw=0.8)
    ax.set_xticks(x, [f"{lab}\n({len(f)} fits)" for lab, f in zip(labels, fits)])
    ax.set_xlim(-0.6, len(labels) - 0.4)
    ax.set_ylabel("mean log-likelihood under the GMM,\nlow-loss − high-loss keys (nats)")
    g = gmm[labels[0]]
    fig.suptitle("Clustering of frequent-word keys: low-loss against high-loss keys (Figure 3 analogue)", fontsize=11)
    ax.set_title(f"keys of tokens whose target is among the {g['frequent_words']} most frequent training words, split "
                 f"at the median kNN-LM loss; {g['n_components']}-component {g['covariance_type']} GMM fitted and "
                 f"scored on {g['scored_keys']:,} keys per fit\n(positive: the low-loss keys sit nearer the mixture's "
                 f"clusters)\n" + analysis_caption(runs), fontsize=7)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    save(fig, path)
    return ax


def plot_histogram_records(histograms: dict, runs: dict, path: Path, xlabel: str):
    """Step histograms of one positive quantity per run, from log_histograms records ({"bin_edges", "share",
    "nonpositive"} in extras.json): the share of the run's tokens per log-spaced bin."""
    fig, ax = plt.subplots(figsize=(7, 4.5), layout="constrained")
    for label, h in histograms.items():
        zeros = h["nonpositive"]
        ax.stairs(h["share"], h["bin_edges"], linewidth=1.5, label=label + (f" ({zeros} zeros not shown)" if zeros else ""))
    ax.set_xscale("log")
    ax.set_xlabel(xlabel + " (log scale)")
    ax.set_ylabel("share of tokens per bin")
    ax.set_title(analysis_caption(runs), fontsize=7)
    ax.legend()
    ax.grid(alpha=0.2)
    save(fig, path)
    return ax


def plot_quality_vs_speed(points: dict[str, list[tuple[float, float]]], path: Path, title: str,
                          anchor: str | None = None, band: float = 0.02) -> bool:
    """Perplexity against evaluation speed (tokens/s, log axis) for each model of a comparison: every seed's point
    faint, the mean over seeds solid with the 95 % t-interval of the perplexity as an error bar. `anchor` (a key of
    points) draws its mean perplexity as a dashed line with a ±`band` shaded band (e.g. within 2 % of the kNN-LM).
    Draws nothing (False) with fewer than two models."""
    points = {label: ps for label, ps in points.items() if ps}
    if len(points) < 2:
        return False
    fig, ax = plt.subplots(figsize=(8.5, 5.5))
    if anchor in points:
        level = t_interval([p for _, p in points[anchor]])[0]
        ax.axhspan(level * (1 - band), level * (1 + band), color="0.9", zorder=0,
                   label=f"{anchor} ± {100 * band:g} %")
        ax.axhline(level, color="0.5", ls="--", lw=1, zorder=1)
    for i, (label, ps) in enumerate(points.items()):
        color = f"C{i % 10}"
        speeds, ppls = np.array([s for s, _ in ps]), np.array([p for _, p in ps])
        ax.scatter(speeds, ppls, color=color, alpha=0.35, s=18)
        mean, _, half, n = t_interval(list(ppls))
        ax.errorbar([np.exp(np.log(speeds).mean())], [mean], yerr=None if n < 2 else [[half], [half]], fmt="osD^v"[i // 10 % 5],
                    color=color, ms=7, capsize=4, label=f"{label} (n = {n})")
    ax.set_xscale("log")
    ticker = matplotlib.ticker  # plain numbers at 1, 2, 5 × 10^n: the default minor labels overlap on a short decade
    ax.xaxis.set_major_locator(ticker.LogLocator(subs=(1, 2, 5)))
    ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda x, _: f"{x:,.0f}"))
    ax.xaxis.set_minor_formatter(ticker.NullFormatter())
    ax.set_xlabel("evaluation speed (tokens/s, log scale; geometric mean over seeds)")
    ax.set_ylabel("perplexity (bars: 95 % t-interval of the mean over seeds; faint: each seed)")
    ax.set_title("\n".join(textwrap.wrap(title, 90)), fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    save(fig, path)
    return True

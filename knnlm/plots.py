"""Figures from saved numbers (never from a model): the ω curve, regularizer comparisons, analysis histograms."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from .artifacts import atomic_path  # noqa: E402


def save(fig, path: Path) -> None:
    with atomic_path(path, suffix=Path(path).suffix) as tmp:
        fig.savefig(tmp, format=Path(path).suffix.lstrip("."), dpi=130, bbox_inches="tight")
    plt.close(fig)


def plot_omega_curve(table: dict, path: Path, title: str) -> None:
    """Valid LM and kNN-LM perplexity against ω (the paper's Figure 1), mean ± std over seeds.

    ω values sit at evenly spaced positions (the grid is logarithmic and includes 0)."""
    omegas = list(table)
    x = np.arange(len(omegas))
    fig, ax = plt.subplots(figsize=(6, 4))
    for metric, label, color in (("valid_lm_ppl", "LM", "tab:blue"), ("valid_knnlm_ppl", "kNN-LM", "tab:orange")):
        mean = np.array([table[o][metric][0] for o in omegas])
        std = np.array([table[o][metric][1] for o in omegas])
        ax.plot(x, mean, "o-", color=color, label=label)
        ax.fill_between(x, mean - std, mean + std, color=color, alpha=0.25)
    ax.set_xticks(x, [f"{o:g}" for o in omegas])
    ax.set_xlabel("ω (regularizer weight)")
    ax.set_ylabel("valid perplexity")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    save(fig, path)


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


def plot_ppl_by_k(curves: dict, path: Path, title: str) -> None:
    """Best valid kNN-LM perplexity at each k, one line per ω: {label: {k: (mean, std)}}, k on a log axis."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, by_k in curves.items():
        ks = sorted(by_k)
        mean = np.array([by_k[k][0] for k in ks])
        std = np.array([by_k[k][1] for k in ks])
        line, = ax.plot(ks, mean, "o-", ms=3, label=label)
        ax.fill_between(ks, mean - std, mean + std, color=line.get_color(), alpha=0.2)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("k (neighbours; temperature and λ tuned at each k)")
    ax.set_ylabel("valid kNN-LM perplexity")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(title="ω")
    save(fig, path)

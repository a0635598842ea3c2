"""The studies' arithmetic and Markdown tables, from run records only (no model, no run folder).

A record is one run's JSON (`results/<study>/runs/<name>.json`, see `knnlm/studies/records.py`): its regularizer,
ω, seed and perplexities. Everything here groups records by (regularizer, ω), takes mean ± sample std over seeds,
and pairs each ω > 0 with ω = 0 of the same seed (same initialisation and data order).
"""

from __future__ import annotations

import math

import numpy as np

from ..artifacts import markdown_table, optional_import

# the rows of the study tables: LM perplexities and the kNN-LM under both evaluation protocols
PPL_ROWS = ("train_lm_ppl", "valid_lm_ppl", "valid_knnlm_ppl", "valid_knnlm_ppl_paper")
LABELS = {"train_lm_ppl": "Train ppl LM", "valid_lm_ppl": "Valid ppl LM",
          "valid_knnlm_ppl": "Valid ppl kNN-LM, tuned (λ, k, temperature tuned on valid)",
          "valid_knnlm_ppl_paper": "Valid ppl kNN-LM, paper protocol (temperature 1, k = 1024, λ tuned)",
          "temperature": "Tuned temperature", "key_sq_norm_mean": "Mean ‖r‖² (valid keys)"}
PAIRED_METRICS = ("valid_lm_ppl", "valid_knnlm_ppl", "valid_knnlm_ppl_paper")
PAIRED_LABELS = {"valid_lm_ppl": "valid LM", "valid_knnlm_ppl": "kNN-LM, tuned",
                 "valid_knnlm_ppl_paper": "kNN-LM, paper protocol"}
# the metric each evaluation protocol is judged by
PROTOCOL_METRIC = {"tuned": "valid_knnlm_ppl", "paper": "valid_knnlm_ppl_paper"}


def mean_std(xs: list[float]) -> tuple[float, float]:
    a = np.asarray(xs, dtype=np.float64)
    return float(a.mean()), float(a.std(ddof=1)) if len(a) > 1 else 0.0


def t_interval(xs: list[float]) -> tuple[float, float, float, int]:
    """Mean, sample std and the half-width of the 95 % t-interval of the mean, and n (std and half-width nan for
    n < 2, where `mean_std` gives a std of 0 for the tables): over seeds, n is small, so the interval is Student's t,
    not mean ± 2 std."""
    (mean, std), n = mean_std(xs), len(xs)
    if n < 2:
        return mean, math.nan, math.nan, n
    t = optional_import("scipy.stats", "plots", "the studies' t-intervals").t.ppf(0.975, n - 1)
    return mean, std, float(t * std / math.sqrt(n)), n


def ci95(xs: list[float]) -> list[float] | None:
    """[lo, hi]: the 95 % t-interval of the mean of xs; None for a single value."""
    mean, _, half, n = t_interval(xs)
    return [mean - half, mean + half] if n > 1 else None


def interval_cell(xs: list[float]) -> str:
    """`ci95` as "[lo, hi]"; "–" for a single value."""
    ci = ci95(xs)
    return f"[{ci[0]:+.2f}, {ci[1]:+.2f}]" if ci else "–"


def over_seeds(values: dict[str, list[float]]) -> dict[str, list]:
    """{metric: [mean, std, n]} of each metric's per-seed values."""
    return {m: [*mean_std(xs), len(xs)] for m, xs in values.items() if xs}


def ppl_over_seeds(runs: list[dict], metrics=PPL_ROWS) -> dict[str, list]:
    """{metric: [mean, std, n]} over these runs, of each metric every run records (records made before a metric
    was recorded lack it)."""
    return over_seeds({m: [r[m] for r in runs] for m in metrics if runs and all(m in r for r in runs)})


def runs_at(records: list[dict], regularizer: str, omega: float) -> list[dict]:
    return [r for r in records if r["regularizer"] == regularizer and r["omega"] == omega]


def device_kind(record: dict) -> str:
    """"cuda" or "cpu" from a record's device field ("cuda: NVIDIA H200", "cpu: AMD EPYC"); "" where unrecorded."""
    return str(record.get("device", "")).split(":")[0]


def omega_table(records: list[dict], regularizer: str) -> dict:
    """{omega: {metric: [mean, std, n]}} over seeds, of one regularizer's runs."""
    return {omega: ppl_over_seeds(runs_at(records, regularizer, omega), (*PPL_ROWS, "temperature", "key_sq_norm_mean"))
            for omega in sorted({r["omega"] for r in records if r["regularizer"] == regularizer})}


def best_omega(table: dict, metric: str = "valid_knnlm_ppl") -> float | None:
    """The ω > 0 with the lowest mean valid kNN-LM perplexity under a protocol's metric."""
    positive = [o for o in table if o > 0 and metric in table[o]]
    return min(positive, key=lambda o: table[o][metric][0]) if positive else None


def paired_differences(records: list[dict], regularizer: str) -> dict:
    """{omega: {metric: [mean, std, n], "per_seed": {metric: {seed: difference}}, "ci95": {metric: [lo, hi] or None},
    "mixed_devices": [seed, ...]}} of
    (run at ω) − (run at ω = 0 with the same seed), over the seeds that have both. `mixed_devices` lists the seeds
    whose two runs were trained on different kinds of device (a CPU and a GPU draw different dropout masks from the
    same seed, so such a pair shares the initialisation and data order but not the masks)."""
    runs = {(r["omega"], r["seed"]): r for r in records if r["regularizer"] == regularizer}
    diffs = {}
    for omega in sorted({o for o, _ in runs if o > 0}):
        pairs = {s: (runs[(omega, s)], runs[(0.0, s)]) for o, s in sorted(runs) if o == omega and (0.0, s) in runs}
        metrics = [m for m in PAIRED_METRICS if all(m in a and m in b for a, b in pairs.values())]
        if pairs:
            per_seed = {m: {str(s): a[m] - b[m] for s, (a, b) in pairs.items()} for m in metrics}
            mixed = [str(s) for s, (a, b) in pairs.items() if device_kind(a) != device_kind(b)]
            diffs[omega] = {**over_seeds({m: list(v.values()) for m, v in per_seed.items()}), "per_seed": per_seed,
                            "ci95": {m: ci95(list(v.values())) for m, v in per_seed.items()}, "mixed_devices": mixed}
    return diffs


def cell(mean: float, std: float, n: int, signed: bool = False) -> str:
    """mean ± std over n seeds; a single seed has no spread to show."""
    if not math.isfinite(mean):
        return "n/a"
    m = f"{mean:+.2f}" if signed else f"{mean:.2f}"
    return f"{m} ± {std:.2f}" if n > 1 else m


def table_markdown(table: dict, title: str) -> str:
    omegas = list(table)
    rows = [[label] + [cell(*table[o][m]) if m in table[o] else "–" for o in omegas] for m, label in LABELS.items()
            if any(m in table[o] for o in omegas)]
    rows.append(["seeds"] + [str(table[o]["valid_lm_ppl"][2]) for o in omegas])
    return markdown_table(title, [""] + [f"ω = {o:g}" for o in omegas], rows,
                          "Cells: mean ± std over seeds (sample std, n − 1). Both kNN-LM rows come from the same "
                          "search of each model's valid tokens.")


def paired_markdown(diffs: dict) -> str:
    rows = []
    for omega, d in diffs.items():
        for m, label in PAIRED_LABELS.items():
            if m in d:
                mixed = set(d.get("mixed_devices", []))
                seeds = ", ".join(f"{v:+.2f}" + ("†" if s in mixed else "") for s, v in d["per_seed"][m].items())
                rows.append([f"{omega:g}", label, cell(*d[m], signed=True), interval_cell(list(d["per_seed"][m].values())),
                             seeds, str(d[m][2])])
    note = ("† the two runs of this seed were trained on different kinds of device (CPU and GPU): the same"
            " initialisation and data order, different dropout masks." if any(d.get("mixed_devices") for d in diffs.values())
            else "")
    return markdown_table("Against ω = 0 of the same seed (perplexity difference; negative = ω > 0 is better)",
                          ["ω", "perplexity", "mean ± std of the differences", "95 % t-interval of the mean", "per seed",
                           "seeds"], rows, note)

"""The representation analyses on small planted data: bucket table, GMM split, histograms, the figures drawn from
planted JSON records, `analyze` end to end and `redraw` without run folders (also of the committed results).

Run: `OMP_NUM_THREADS=1 python -m pytest -q tests/test_analysis.py` (no training; a few seconds).
"""

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest

from knnlm.studies import plots
from knnlm.studies.analysis import (PROTOCOL, analyze, frequency_buckets, frequency_ranks, gmm_loglik_split, log_histograms,
                            redraw)
from knnlm.artifacts import UserError
from knnlm.knn import interpolate, perplexity

RECORDS = ("runs.json", "buckets.json", "gmm.json", "extras.json")
FIGURES = ("figure2_gain_by_frequency.png", "figure3_gmm_loglik.png", "key_norms.png", "nn_distances.png")
OUTPUTS = (*RECORDS, *FIGURES, "buckets.md", "summary.md")
COMMITTED = Path(__file__).resolve().parent.parent / "results" / "analysis"


def test_planted_frequency_pattern_shows_in_bucket_table():
    V = 12000
    rng = np.random.default_rng(0)
    train_counts = rng.permutation(np.arange(V, 0, -1))  # distinct counts, so ranks are known but not word ids
    ranks = frequency_ranks(train_counts)
    assert np.array_equal(train_counts[np.argsort(ranks)], np.arange(V, 0, -1))
    word_of_rank = np.argsort(ranks)
    # 50 tokens per bucket (a different number each, to see the counts): ranks drawn inside each bucket
    per_bucket = {(0, 100): 50, (100, 1000): 40, (1000, 10000): 30, (10000, V): 20}
    targets = np.concatenate([word_of_rank[rng.integers(lo, hi, n)] for (lo, hi), n in per_bucket.items()]).astype(np.int32)
    frequent = ranks[targets] < 100
    # planted: frequent words cost 1 nat under kNN-LM and 2 under the LM; the others 3 nats under both
    lm = np.where(frequent, -2.0, -3.0).astype(np.float32)
    knnlm = np.where(frequent, -1.0, -3.0)
    b = frequency_buckets(train_counts, targets, lm, knnlm)

    assert list(b["tokens"]) == [50, 40, 30, 20]
    assert list(b["rank_lo"]) == [0, 100, 1000, 10000] and list(b["rank_hi"]) == [100, 1000, 10000, -1]
    assert b["lm_ppl"][0] == math.exp(2.0) and b["knnlm_ppl"][0] == math.exp(1.0)
    assert np.all(b["lm_ppl"][1:] == math.exp(3.0)) and np.all(b["knnlm_ppl"][1:] == math.exp(3.0))
    assert b["relative_change"][0] == pytest.approx(math.exp(-1.0) - 1, rel=1e-12)
    assert np.all(b["relative_change"][1:] == 0)


def test_empty_bucket_has_nan_perplexity():
    b = frequency_buckets(np.array([5, 4, 3]), np.array([0, 2]), np.array([-1.0, -1.0]), np.array([-1.0, -1.0]),
                          edges=(1, 2))
    assert list(b["tokens"]) == [1, 0, 1] and np.isnan(b["lm_ppl"][1])


def test_log_histograms_share_bins_and_count_zeros():
    a, b = np.array([0.0, 1.0, 10.0, 100.0]), np.array([5.0, 50.0])
    ha, hb = log_histograms([a, b], n_bins=4)
    assert ha["bin_edges"] == hb["bin_edges"] and len(ha["bin_edges"]) == 5  # one set of bins for every run
    assert ha["bin_edges"][0] == pytest.approx(1.0) and ha["bin_edges"][-1] == pytest.approx(100 * 1.0001)
    assert ha["nonpositive"] == 1 and hb["nonpositive"] == 0
    assert sum(ha["share"]) == pytest.approx(3 / 4) and sum(hb["share"]) == pytest.approx(1.0)  # share of all values


def planted_records(gains: dict[str, list[float]], diffs: dict[str, list[float]]) -> dict:
    """Small runs/buckets/gmm/extras records as `analyze` writes them: per label, the relative change of the three
    buckets and of all tokens (`gains`), and the GMM difference of each fit (`diffs`)."""
    names = ["top 2", "2–5", "5+"]
    runs, buckets, gmm, extras = {}, {}, {}, {}
    for label, g in gains.items():
        runs[label] = {"run": f"study/{label}", "machine": "cpu: planted", "split": "valid", "tokens": 100,
                       "max_eval_tokens": 100, "seed": 0, "protocol": PROTOCOL, "lambda": 0.25, "k": 8,
                       "temperature": 1.0, "lm_ppl": 20.0, "knnlm_ppl": 20.0 * (1 + g[-1])}
        buckets[label] = {"rank_edges": [2, 5], "all": {"tokens": 100, "lm_ppl": 20.0, "knnlm_ppl": 20.0 * (1 + g[-1]),
                                                        "relative_change": g[-1]},
                          "buckets": [{"bucket": n, "rank_lo": 0, "rank_hi": None, "tokens": t, "lm_ppl": 10.0,
                                       "knnlm_ppl": None if c is None else 10.0 * (1 + c), "relative_change": c}
                                      for n, t, c in zip(names, (50, 30, 20), g[:-1])]}
        d = diffs[label]
        gmm[label] = {"frequent_words": 2, "frequent_tokens": 50, "scored_keys": 50, "threshold": 1.0, "n_high": 25,
                      "n_low": 25, "mean_loglik_high": 0.0, "mean_loglik_low": d[0], "difference_low_minus_high": d[0],
                      "difference_per_fit": d, "difference_mean": float(np.mean(d)), "difference_std": float(np.std(d)),
                      "n_components": 2, "covariance_type": "diag", "seed": 0, "key_dim": 4}
        h = log_histograms([np.arange(1.0, 11.0)], n_bins=3)[0]
        extras[label] = {"key_sq_norm_mean": 1.0, "key_sq_norm_std": 0.1, "key_norm_mean": 1.0, "key_norm_std": 0.1,
                         "nn_distance_median": 0.5, "k": 8, "target_in_neighbors": 0.9,
                         "key_sq_norm_histogram": h, "nn_distance_histogram": h}
    return {"runs": runs, "buckets": buckets, "gmm": gmm, "extras": extras}


def test_figure2_bars_are_the_recorded_gains(tmp_path):
    gains = {"ω=0": [-0.05, -0.15, -0.5, -0.146], "ω=1e-3": [-0.04, None, -0.48, -0.134]}  # None: an empty bucket
    r = planted_records(gains, {label: [1.0] for label in gains})
    ax = plots.plot_gain_by_frequency(r["buckets"], r["runs"], tmp_path / "figure2.png")
    assert (tmp_path / "figure2.png").stat().st_size > 0
    assert len(ax.containers) == 2  # one group of bars per run
    for bars, (label, g) in zip(ax.containers, gains.items()):
        assert bars.get_label() == label
        heights = [p.get_height() for p in bars]
        assert heights == pytest.approx([math.nan if c is None else 100 * c for c in g], nan_ok=True)  # in %
    assert [t.get_text().split("\n")[0] for t in ax.get_xticklabels()] == ["top 2", "2–5", "5+", "all tokens"]
    caption = ax.get_title()
    assert "first 100 tokens" in caption and "seed 0" in caption and "cpu: planted" in caption
    assert "study/ω=0" in caption and "tuned" in caption


def test_figure3_points_are_the_mean_over_fits_with_their_std(tmp_path):
    diffs = {"ω=0": [0.4, -4.0, 5.1], "ω=1e-4": [1.0, 1.3, 0.9]}
    r = planted_records({label: [0.0] * 4 for label in diffs}, diffs)
    ax = plots.plot_gmm_separation(r["gmm"], r["runs"], tmp_path / "figure3.png")
    assert (tmp_path / "figure3.png").stat().st_size > 0
    line, _, (bars,) = ax.containers[0]  # the error-bar container: points, caps, bar segments
    assert line.get_ydata() == pytest.approx([np.mean(d) for d in diffs.values()])
    for seg, d in zip(bars.get_segments(), diffs.values()):
        assert [y for _, y in seg] == pytest.approx([np.mean(d) - np.std(d), np.mean(d) + np.std(d)])
    single = np.concatenate([c.get_offsets()[:, 1] for c in ax.collections if c is not bars])
    assert sorted(single) == pytest.approx(sorted(sum(diffs.values(), [])))  # every fit drawn as well
    assert "std over the fits" in ax.get_legend().get_texts()[-1].get_text()


def test_redraw_needs_only_the_records(tmp_path):
    for name, record in planted_records({"a": [-0.1, -0.2, -0.3, -0.15]}, {"a": [1.0, 2.0]}).items():
        (tmp_path / f"{name}.json").write_text(json.dumps(record))
    assert redraw(tmp_path) == []
    for name in (*FIGURES, "buckets.md", "summary.md"):
        assert (tmp_path / name).stat().st_size > 0, name
    assert "-10.0%" in (tmp_path / "buckets.md").read_text()
    (tmp_path / "gmm.json").unlink()
    with pytest.raises(UserError, match="gmm.json"):
        redraw(tmp_path)


def test_committed_analysis_redraws_to_its_own_markdown(tmp_path):
    """results/analysis holds the records of runs that no longer exist: its figures and Markdown come from them."""
    shutil.copytree(COMMITTED, tmp_path / "analysis")
    notes = redraw(tmp_path / "analysis")
    assert len(notes) == 2  # key_norms.png, nn_distances.png: drawn before extras.json recorded histograms
    for name in ("summary.md", "buckets.md"):
        assert (tmp_path / "analysis" / name).read_text() == (COMMITTED / name).read_text(), name
    summary = (COMMITTED / "summary.md").read_text()
    assert "`omega_study/l2_omega0_seed0`" in summary and "/root" not in summary


def planted_keys(low_is_clustered: bool, rng) -> tuple[np.ndarray, np.ndarray]:
    """400 keys in 4 tight clusters and 400 scattered ones in d = 8; losses mark which group is "low loss"."""
    centers = rng.uniform(-5, 5, (4, 8))
    clustered = centers[rng.integers(0, 4, 400)] + 0.05 * rng.standard_normal((400, 8))
    scattered = rng.uniform(-6, 6, (400, 8))
    keys = np.concatenate([clustered, scattered]).astype(np.float16)
    clustered_loss, scattered_loss = (0.5, 3.0) if low_is_clustered else (3.0, 0.5)
    return keys, np.repeat([clustered_loss, scattered_loss], 400)


@pytest.mark.parametrize("low_is_clustered", [True, False])
def test_gmm_gives_clustered_keys_higher_loglik(low_is_clustered):
    keys, losses = planted_keys(low_is_clustered, np.random.default_rng(1))
    s = gmm_loglik_split(keys, losses)  # threshold: the median loss, 1.75, between the two planted values
    assert s.threshold == 1.75 and len(s.loglik_high) == len(s.loglik_low) == 400
    assert s.difference == s.mean_low - s.mean_high
    assert (s.difference > 0) == low_is_clustered
    assert abs(s.difference) > 5  # tight clusters against uniform scatter in 8 dimensions: a wide gap


def test_gmm_difference_ignores_key_scale_and_subsamples():
    keys, losses = planted_keys(True, np.random.default_rng(2))
    s = gmm_loglik_split(keys, losses, threshold=1.0)
    small = gmm_loglik_split((keys.astype(np.float64) / 8), losses, threshold=1.0)  # an L2-shrunk model's keys
    assert small.mean_low == pytest.approx(s.mean_low + 8 * math.log(8), rel=1e-6)  # shifted by −d·log c
    assert small.difference == pytest.approx(s.difference, rel=1e-6)
    sub = gmm_loglik_split(keys, losses, threshold=1.0, max_points=300, seed=3)
    assert len(sub.loglik_high) + len(sub.loglik_low) == 300


def fabricate_run(folder, rng, key_scale: float, V=300, N=5000, n=800, d=8, K=16, k=8, lmbda=0.25):
    """A run folder with the evaluated artifacts `analyze` reads; Zipf-like word frequencies."""
    zipf = 1 / np.arange(1, V + 1)
    zipf /= zipf.sum()
    vals = rng.choice(V, N, p=zipf).astype(np.int32)
    targets = rng.choice(V, n, p=zipf).astype(np.int32)
    lm = rng.uniform(-8, -0.5, n).astype(np.float32)
    knn = np.where(rng.random(n) < 0.2, -np.inf, rng.uniform(-10, -0.1, n)).astype(np.float32)
    distances = np.sort(rng.exponential(key_scale, (n, K)), axis=1).astype(np.float32)
    distances[:5, 0] = 0  # exact duplicates of a training context happen
    arrays = {
        "targets": targets, "lm_logprobs": lm, "knn_logprobs": knn,
        "query_keys": (key_scale * rng.standard_normal((n, d))).astype(np.float16),
        "distances": distances, "neighbors": rng.integers(0, N, (n, K)).astype(np.int32),
    }
    (folder / "datastore").mkdir(parents=True)
    (folder / "eval" / "valid").mkdir(parents=True)
    np.save(folder / "datastore" / "vals.npy", vals)
    (folder / "datastore" / "meta.json").write_text(json.dumps({"N": N, "d": d}))
    for name, arr in arrays.items():
        np.save(folder / "eval" / "valid" / f"{name}.npy", arr)
    knnlm = interpolate(lm, knn, lmbda)
    summary = {"split": "valid", "tokens": n, "lm_ppl": perplexity(lm), "knnlm_ppl": perplexity(knnlm),
               "lambda": lmbda, "k": k, "temperature": 1.0}
    (folder / "eval" / "valid" / "summary.json").write_text(json.dumps(summary))
    return arrays, vals, summary


def test_analyze_end_to_end_on_fabricated_runs(tmp_path):
    rng = np.random.default_rng(0)
    runs = [tmp_path / "run_a", tmp_path / "run_b"]
    made = [fabricate_run(runs[0], rng, 1.0), fabricate_run(runs[1], rng, 0.1)]
    out = tmp_path / "analysis"
    analyze(out, runs, ["ω=0", "ω=0.001"])

    for name in OUTPUTS:
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    buckets = json.loads((out / "buckets.json").read_text())
    gmm = json.loads((out / "gmm.json").read_text())
    extras = json.loads((out / "extras.json").read_text())
    assert list(buckets) == list(gmm) == list(extras) == ["ω=0", "ω=0.001"]
    for label, (arrays, vals, summary) in zip(buckets, made):
        assert sum(b["tokens"] for b in buckets[label]["buckets"]) == summary["tokens"]
        # evaluate saves knn_logprobs as float32 after computing the summary in float64: agree to ~1e-7
        assert buckets[label]["all"]["knnlm_ppl"] == pytest.approx(summary["knnlm_ppl"], rel=1e-6)
        assert gmm[label]["n_high"] + gmm[label]["n_low"] == gmm[label]["scored_keys"] > 0
        fits = gmm[label]["difference_per_fit"]  # repeated fits: the first is the one the unsuffixed fields hold
        assert len(fits) == 3 and fits[0] == pytest.approx(gmm[label]["difference_low_minus_high"])
        assert gmm[label]["difference_mean"] == pytest.approx(np.mean(fits))
        per_fit = np.subtract(gmm[label]["mean_loglik_low_per_fit"], gmm[label]["mean_loglik_high_per_fit"])
        assert per_fit == pytest.approx(fits)
        assert sum(extras[label]["key_sq_norm_histogram"]["share"]) == pytest.approx(1.0)  # keys are never zero
        # target-in-neighbours share against a direct computation
        found = (vals[arrays["neighbors"][:, : summary["k"]]] == arrays["targets"][:, None]).any(1)
        assert extras[label]["target_in_neighbors"] == pytest.approx(found.mean())
        assert extras[label]["nn_distance_median"] == pytest.approx(np.median(arrays["distances"][:, 0]))
    assert extras["ω=0.001"]["key_norm_mean"] < extras["ω=0"]["key_norm_mean"]  # keys planted 10× smaller
    records = json.loads((out / "runs.json").read_text())
    assert [r["run"] for r in records.values()] == [f"{tmp_path.name}/run_a", f"{tmp_path.name}/run_b"]
    assert records["ω=0"]["lambda"] == 0.25 and records["ω=0"]["machine"].startswith("cpu: ")
    summary_md = (out / "summary.md").read_text()
    assert "ω=0.001" in summary_md and "figure3_gmm_loglik.png" in summary_md
    assert str(tmp_path) not in summary_md and "/" + tmp_path.name not in summary_md  # run folders by name only
    for name in RECORDS:
        assert str(tmp_path) not in (out / name).read_text(), name

    # the run folders gone, every figure and the Markdown come back from the records alone
    drawn = {name: (out / name).read_text() for name in ("summary.md", "buckets.md")}
    for r in runs:
        shutil.rmtree(r)
    for name in FIGURES:
        (out / name).unlink()
    assert redraw(out) == []
    assert all((out / name).is_file() for name in FIGURES)
    assert {name: (out / name).read_text() for name in drawn} == drawn

    for r, seed in zip(runs, (0, 1)):
        fabricate_run(r, np.random.default_rng(seed), 1.0)
    analyze(tmp_path / "default_labels", runs, None, gmm_repeats=1)  # labels default to the run folder names
    assert list(json.loads((tmp_path / "default_labels" / "gmm.json").read_text())) == ["run_a", "run_b"]


def test_analyze_refuses_a_run_without_summary(tmp_path):
    rng = np.random.default_rng(0)
    runs = [tmp_path / "run_a", tmp_path / "run_b"]
    for r in runs:
        fabricate_run(r, rng, 1.0)
    (runs[1] / "eval" / "valid" / "summary.json").unlink()
    with pytest.raises(UserError, match="summary.json"):
        analyze(tmp_path / "analysis", runs, None)
    assert not (tmp_path / "analysis").exists()  # every run is checked before anything is written
    with pytest.raises(UserError, match="labels"):
        analyze(tmp_path / "analysis", runs[:1], ["a", "b"])

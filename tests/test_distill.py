"""Distillation: training-set kNN targets against a float64 brute force, the KL term against numpy, a killed build
continued to the same arrays, β = 0 as the LM loss exactly, and the memory model's interpolation by hand."""

import json
import math
import os
import shutil

import numpy as np
import pytest
import safetensors.torch
import torch
from conftest import knnlm

from knnlm.distill import Targets, kl_to_targets
from knnlm.evaluate import mix, tuning_arrays
from knnlm.knn import perplexity
from knnlm.targets import neighbours_kept, sparse_knn_distribution

slow = pytest.mark.slow


def brute_force_targets(keys: np.ndarray, vals: np.ndarray, rows: np.ndarray, k: int, temperature: float,
                        radius: int = 0) -> list[dict[int, float]]:
    """p_kNN of each row by float64 brute force over every stored key, rows within `radius` of the query left out:
    {word: probability} (ties in distance broken by row id)."""
    keys = np.asarray(keys, dtype=np.float64)
    out = []
    for i in rows:
        d = ((keys - keys[i]) ** 2).sum(1)
        d[np.abs(np.arange(len(keys)) - i) <= radius] = np.inf
        near = np.lexsort((np.arange(len(keys)), d))[:k]
        w = np.exp(-(d[near] - d[near].min()) / temperature)
        w /= w.sum()
        p: dict[int, float] = {}
        for word, weight in zip(vals[near], w):
            p[int(word)] = p.get(int(word), 0.0) + weight
        out.append(p)
    return out


def test_sparse_distribution_is_the_brute_force_knn_distribution():
    rng = np.random.default_rng(0)
    N, d, V, k, top, T = 400, 6, 12, 25, 5, 3.0
    keys = rng.normal(size=(N, d)).astype(np.float32)
    vals = rng.integers(0, V, N)
    rows = np.arange(0, N, 7)
    K = k + 1  # the query's own row is among the nearest: one more than k
    d2 = ((keys[rows, None, :].astype(np.float64) - keys[None]) ** 2).sum(-1)
    ids = np.argsort(d2, 1, kind="stable")[:, :K]
    dist = np.take_along_axis(d2, ids, 1)
    keep = neighbours_kept(ids, rows, 0, k)
    assert (keep.sum(1) == k).all() and not (keep & (ids == rows[:, None])).any()  # self out, exactly k kept
    words, probs, rest = sparse_knn_distribution(torch.from_numpy(dist), torch.from_numpy(vals[ids]),
                                                 torch.from_numpy(keep), T, top)
    for r, want in enumerate(brute_force_targets(keys, vals, rows, k, T)):
        best = sorted(want.items(), key=lambda kv: -kv[1])[:top]
        got = {int(w): float(p) for w, p in zip(words[r], probs[r]) if w >= 0}
        assert sorted(got.values(), reverse=True) == pytest.approx([p for _, p in best], abs=1e-12)
        for w, p in got.items():
            assert p == pytest.approx(want[w], abs=1e-12)
        assert float(rest[r]) == pytest.approx(1 - sum(got.values()), abs=1e-12)
    # fewer distinct words than `top`: padded with −1 and probability 0, no rest
    w1, p1, r1 = sparse_knn_distribution(torch.tensor([[0.0, 1.0, 2.0]]), torch.tensor([[4, 4, 9]]),
                                         torch.tensor([[True, True, True]]), 1.0, 5)
    assert w1[0, :2].tolist() == [4, 9] and (w1[0, 2:] == -1).all() and (p1[0, 2:] == 0).all()
    assert float(r1[0]) == pytest.approx(0, abs=1e-15)


def test_window_exclusion_drops_every_row_around_the_query():
    ids = np.array([[5, 4, 6, 9, 1, 12, 20]])
    keep = neighbours_kept(ids, np.array([5]), radius=3, k=2)
    assert keep.tolist() == [[False, False, False, True, True, False, False]]  # 9 and 1 (|Δ| > 3), then k reached


def numpy_kl(logp: np.ndarray, words: np.ndarray, probs: np.ndarray, rest: np.ndarray) -> np.ndarray:
    """KL over the partition {top words, the rest}, row by row in float64."""
    out = []
    for lp, w, p, r in zip(logp.astype(np.float64), words, probs.astype(np.float64), rest.astype(np.float64)):
        q = np.exp(lp)
        top = [(int(a), b) for a, b in zip(w, p) if a >= 0]
        kl = sum(b * math.log(b / q[a]) for a, b in top if b > 0)
        q_rest = 1 - sum(q[a] for a, _ in top)
        kl += r * math.log(r / q_rest) if r > 0 else 0.0
        out.append(kl)
    return np.array(out)


def test_kl_term_equals_numpy_with_its_gradient():
    rng = np.random.default_rng(1)
    n, V, m = 5, 9, 3
    logits = torch.tensor(rng.normal(size=(n, V)), dtype=torch.float64, requires_grad=True)
    words = torch.tensor([[0, 3, 7], [2, -1, -1], [8, 1, 4], [5, 6, -1], [-1, -1, -1]])
    probs = torch.tensor([[0.5, 0.2, 0.1], [0.9, 0, 0], [0.3, 0.3, 0.4], [0.6, 0.2, 0], [0, 0, 0]], dtype=torch.float64)
    rest = 1 - probs.sum(1)
    kl = kl_to_targets(torch.log_softmax(logits, 1).gather(1, words.clamp_min(0)), words, probs, rest)
    want = numpy_kl(torch.log_softmax(logits, 1).detach().numpy(), words.numpy(), probs.numpy(), rest.numpy())
    assert np.allclose(kl.detach().numpy(), want, atol=1e-6)
    assert kl[-1].item() == pytest.approx(0, abs=1e-6)  # no top words, all mass in the rest: q(rest) = 1
    kl.sum().backward()
    eps, grad = 1e-6, np.zeros((n, V))
    base = logits.detach().numpy()
    for i in range(n):
        for j in range(V):
            plus, minus = base.copy(), base.copy()
            plus[i, j] += eps
            minus[i, j] -= eps
            f = lambda z: numpy_kl(z - np.log(np.exp(z).sum(1, keepdims=True)), words.numpy(), probs.numpy(),
                                   rest.numpy()).sum()
            grad[i, j] = (f(plus) - f(minus)) / (2 * eps)
    assert np.allclose(logits.grad.numpy(), grad, atol=1e-5)


# ---- end to end on the tiny run -------------------------------------------------------------------------------

def own_copy(run, tmp_path):
    shutil.copytree(run, tmp_path / "run")
    return tmp_path / "run"


TARGETS = ["distill.k=16", "distill.top=4", "distill.batch_size=20000"]


@slow
def test_targets_of_the_tiny_run_are_the_brute_force_and_a_killed_build_continues(tiny_run, tmp_path):
    run = own_copy(tiny_run[0], tmp_path)
    env_kill = {**os.environ, "KNNLM_KILL_AT": "targets:2"}
    import subprocess
    import sys
    killed = subprocess.run([sys.executable, "-m", "knnlm.cli", "targets", "--out", str(run), *TARGETS],
                            capture_output=True, text=True, env={**env_kill, "TQDM_DISABLE": "1"})
    assert killed.returncode != 0 and not (run / "targets").exists()
    progress = json.loads((run / ".targets.partial" / "progress.json").read_text())
    assert progress["rows"] == 40000  # two batches were complete when it died
    knnlm("targets", "--out", run, *TARGETS)  # continues from row 40,000
    assert not (run / ".targets.partial").exists()
    t = Targets(run / "targets")
    meta = t.meta
    valid = json.loads((run / "eval" / "valid" / "tuning.json").read_text())
    assert meta["temperature"] == min((r for r in valid if r["k"] == 16), key=lambda r: r["ppl"])["temperature"]

    fresh = own_copy(tiny_run[0], tmp_path / "fresh")
    knnlm("targets", "--out", fresh, *TARGETS)
    for name in ("words", "probs", "rest"):
        assert np.array_equal(np.load(run / "targets" / f"{name}.npy"), np.load(fresh / "targets" / f"{name}.npy"))

    keys, vals = np.load(run / "datastore" / "keys.npy"), np.load(run / "datastore" / "vals.npy")
    rows = np.random.default_rng(0).choice(len(keys), 40, replace=False)
    for row, want in zip(rows, brute_force_targets(keys, vals, rows, 16, meta["temperature"])):
        got = {int(w): float(p) for w, p in zip(t.arrays["words"][row], t.arrays["probs"][row]) if w >= 0}
        top = sorted(want.values(), reverse=True)[:4]
        assert sorted(got.values(), reverse=True) == pytest.approx(top, abs=2e-6)
        assert all(want[w] == pytest.approx(p, abs=2e-6) for w, p in got.items())
        assert float(t.arrays["rest"][row]) == pytest.approx(1 - sum(got.values()), abs=2e-6)


@slow
def test_beta_zero_is_the_lm_loss_and_a_memory_model_mixes_as_by_hand(tiny_run, tmp_path):
    base = own_copy(tiny_run[0], tmp_path)
    knnlm("targets", "--out", base, *TARGETS)
    short = ["train.epochs=0.2", "train.bf16=false", "train.threads=1"]
    plain, zero = tmp_path / "plain", tmp_path / "zero"
    knnlm("train", "--config", "configs/tiny.toml", "--out", plain, *short)
    knnlm("train", "--config", "configs/tiny.toml", "--out", zero, *short,
          f"train.distil_targets={base / 'targets'}", "train.beta=0")
    a = sorted((plain / "checkpoints").glob("step_*"))[-1] / "model.safetensors"
    b = sorted((zero / "checkpoints").glob("step_*"))[-1] / "model.safetensors"
    wa, wb = safetensors.torch.load_file(str(a)), safetensors.torch.load_file(str(b))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[n], wb[n]) for n in wa)  # β = 0: the same weights, bitwise

    # a memory model: started from the base, KL alone; then the pair evaluated and checked by hand
    mem = tmp_path / "mem"
    knnlm("train", "--config", "configs/tiny.toml", "--out", mem, *short, f"train.distil_targets={base / 'targets'}",
          "train.beta=1", "train.ce_weight=0", f"train.init_from={base}")
    rows = [json.loads(line) for line in (mem / "metrics.jsonl").read_text().splitlines()]
    assert any("kl_loss" in r and r["kl_loss"] > 0 for r in rows)
    summary = json.loads(knnlm("evaluate", "--out", base, "--json", "--memory", mem).stdout)
    lm, _ = tuning_arrays(base, "valid")
    mem_lp = np.load(mem / "memory_eval" / "valid" / "lm_logprobs.npy").astype(np.float64)
    mu = summary["memory_lambda"]
    by_hand = np.log(mu * np.exp(mem_lp) + (1 - mu) * np.exp(lm.astype(np.float64)))
    assert summary["lm_memory_ppl"] == pytest.approx(math.exp(-by_hand.mean()), rel=1e-9)
    assert summary["lm_memory_ppl"] == pytest.approx(perplexity(mix(lm, mem_lp, mu)), rel=1e-12)
    assert summary["lm_memory_ppl"] <= summary["lm_ppl"] + 1e-9  # μ = 0 is in the grid
    grid = {r["lambda"]: r["ppl"] for r in summary["memory_lambda_grid"]}
    assert grid[mu] == min(grid.values())

    # the API with the memory model and no retrieval gives the same per-token mix
    import knnlm as api

    text = (base.parent / "text.txt")
    text.write_text("the game was released in the united states\n")
    lm_api = api.load(base, memory=mem, lmbda=0.0)
    scored = lm_api.score(text.read_text())
    plain_api = api.load(base, lmbda=0.0)
    alone = plain_api.score(text.read_text())
    from knnlm.checkpoint import load_model
    from knnlm.data import token_stream
    from knnlm.scoring import score_stream

    model, _, _ = load_model(mem)
    s = token_stream(plain_api.encode(text.read_text()), plain_api.eos_id)
    mem_tok = torch.cat([lp for _, _, lp in score_stream(model, s, plain_api.stride, 16, plain_api.bf16,
                                                         want_keys=False)]).numpy().astype(np.float64)
    want = np.log(mu * np.exp(mem_tok) + (1 - mu) * np.exp(alone.lm))
    assert np.allclose(scored.logprobs, want, atol=1e-9)
    test = json.loads(knnlm("evaluate", "--out", base, "--json", "--memory", mem, "--split", "test").stdout)
    assert test["memory_lambda"] == mu and test["split"] == "test"


def test_the_distill_study_tables_pair_each_variant_with_the_same_seeds_base(tmp_path):
    """experiments/distill_study.py's tables from hand-made records: each variant's difference from the same seed's
    base tuned kNN-LM, its mean, the t-interval over seeds and the relative change, as computed by hand."""
    import importlib.util

    from scipy import stats

    from conftest import REPO

    spec = importlib.util.spec_from_file_location("distill_study", REPO / "experiments" / "distill_study.py")
    study = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(study)
    records, anchors, memory = {}, [100.0, 98.0, 97.0], [101.0, 97.5, 98.5]
    for seed, (a, m) in enumerate(zip(anchors, memory)):
        split = lambda x: {"lm_ppl": x + 20, "knnlm_ppl": x, "knnlm_ppl_paper": x + 10, "tokens": 50000,
                           "seconds": {"lm": 10.0, "search": 190.0}}
        records[f"seed{seed}_base"] = {"train_seconds": 1000.0, "valid": split(a), "test": split(a + 3)}
        mem = lambda x: {"memory_model_ppl": x + 8, "lm_memory_ppl": x, "protocols": {"tuned": {"knnlm_ppl": x - 5}, "paper": {"knnlm_ppl": x - 1}},
                         "tokens": 50000, "seconds": {"lm": 10.0, "memory_model": 10.0, "search": 190.0},
                         "tokens_per_s": {"lm_memory": 5000.0, "knnlm": 250.0},
                         "inference_bytes": {"lm": 2**24, "memory_model": 2**24, "datastore": 2**30}}
        records[f"seed{seed}_memory"] = {"train_seconds": 300.0, "valid": mem(m), "test": mem(m + 3)}
    records["seed0_targets"] = {"seconds": 1800.0, "bytes": 2**28}
    pairs, second = [99.0, 99.5], [104.0, 101.0]  # seeds 0 and 1: the base with a distilled LM, and with a second LM
    for seed, (x, y) in enumerate(zip(pairs, second)):
        scratch = lambda x: {**split(x), "lm_ppl": x + 4}
        records[f"seed{seed}_scratch"] = {"train_seconds": 3000.0, "valid": scratch(x), "test": scratch(x + 3),
                                          "as_memory": {"valid": mem(x), "test": mem(x + 3)}}
        records[f"seed{seed}_ensemble"] = {"train_seconds": 1000.0, "as_memory": {"valid": mem(y), "test": mem(y + 3)}}
    records["seed2_scratch"] = {"train_seconds": 3000.0, "valid": scratch(96.0), "test": scratch(99.0)}  # no pair kept
    table = study.tables(records, tmp_path)
    row = table["LM + distilled-from-scratch LM (no retrieval)"]["valid"]
    assert row["n"] == 2 and row["vs_base_knnlm_tuned"]["mean"] == pytest.approx(np.mean(np.subtract(pairs, anchors[:2])))
    assert table["kNN-LM over LM + distilled-from-scratch LM (tuned)"]["test"]["mean"] == pytest.approx(np.mean(pairs) - 2)
    row = table["LM + second LM, CE alone (ensemble control) (no retrieval)"]["test"]
    assert row["vs_base_knnlm_tuned"]["mean"] == pytest.approx(np.mean(np.subtract(second, anchors[:2])))
    assert table["second LM, CE alone, another init (no retrieval)"]["valid"]["mean"] == pytest.approx(np.mean(second) + 8)
    assert table["distilled from scratch: LM alone (no retrieval)"]["valid"]["n"] == 3
    row = table["LM + memory model (no retrieval)"]["valid"]
    d = np.subtract(memory, anchors)
    assert row["n"] == 3 and row["mean"] == pytest.approx(np.mean(memory))
    assert row["vs_base_knnlm_tuned"]["mean"] == pytest.approx(d.mean())
    assert row["vs_base_knnlm_tuned"]["ci95_half_width"] == pytest.approx(
        stats.t.ppf(0.975, 2) * d.std(ddof=1) / np.sqrt(3))
    assert row["vs_base_knnlm_tuned"]["relative"] == pytest.approx(d.mean() / np.mean(anchors))
    assert table["kNN-LM of the base (tuned)"]["test"]["vs_base_knnlm_tuned"]["mean"] == 0.0
    assert table["memory model alone (no retrieval)"]["valid"]["mean"] == pytest.approx(np.mean(memory) + 8)
    # the goals, seed by seed, and what the targets add beyond the same seed's ensemble control
    data = json.loads((tmp_path / "distill.json").read_text())
    goals, controls = data["goals"], data["vs_ensemble_control"]
    pair, knn_pair = "LM + distilled-from-scratch LM (no retrieval)", "kNN-LM over LM + distilled-from-scratch LM (tuned)"
    assert goals[pair]["met"] is True and goals[pair]["relative_per_seed"] == pytest.approx([-1 / 100, 1.5 / 98])
    assert goals["distilled from scratch: LM alone (no retrieval)"]["met"] is False  # +3 % at seed 0
    gaps = np.subtract(np.subtract(pairs, 5), anchors[:2])  # the kNN over the pair, 5 below the pair itself
    assert goals[knn_pair]["met"] is True and goals[knn_pair]["mean"] == pytest.approx(gaps.mean())
    assert goals[knn_pair]["std"] == pytest.approx(gaps.std(ddof=1)) and -gaps.mean() > 2 * gaps.std(ddof=1)
    assert goals["distilled from scratch: kNN-LM (tuned)"]["met"] is False  # -1, +1.5, -1 against the base
    assert not [g for g in goals if "control" in g or "second LM" in g or g.startswith(("kNN-LM of the base", "memory model alone"))]
    d = np.subtract(pairs, second)
    for label, split in ((pair, "valid"), (knn_pair, "test")):  # the same differences: both 5 below, both 3 up
        row = controls[label][split]
        assert row["n"] == 2 and row["mean"] == pytest.approx(d.mean())
        assert row["ci95_half_width"] == pytest.approx(stats.t.ppf(0.975, 1) * d.std(ddof=1) / np.sqrt(2))
    assert controls[pair]["valid"]["control"] == "LM + second LM, CE alone (ensemble control) (no retrieval)"
    assert controls[knn_pair]["test"]["control"] == "kNN-LM over LM + second LM, CE alone (ensemble control) (tuned)"
    md = (tmp_path / "distill.md").read_text()
    assert "20.0×" in md and "32 MiB vs 1040 MiB" in md and "build 1800 s" in md  # speed and bytes at inference
    assert "| seed0_scratch beside the base |" in md and "| seed1_ensemble | train 1000 s |" in md
    assert "| seed2_scratch beside the base |" not in md
    points = study.speed_points(records)  # the figure's: tokens/s from each pass's time, one point per seed
    assert points["base: LM alone"] == [(5000.0, a + 20) for a in anchors]
    assert points["base: kNN-LM (tuned)"] == [(250.0, a) for a in anchors]
    assert points["LM + memory model (no retrieval)"] == [(5000.0, m) for m in memory]
    assert points["kNN-LM over LM + memory (tuned)"] == [(50000 / 210, m - 5) for m in memory]
    assert points["LM + distilled-from-scratch LM (no retrieval)"] == [(5000.0, x) for x in pairs]
    assert points["LM + second LM, CE alone (ensemble control) (no retrieval)"] == [(5000.0, y) for y in second]
    from knnlm.studies.plots import plot_quality_vs_speed

    assert plot_quality_vs_speed(points, tmp_path / "q.png", "t", anchor="base: kNN-LM (tuned)")
    assert (tmp_path / "q.png").stat().st_size > 0
    assert not plot_quality_vs_speed({"base: LM alone": points["base: LM alone"]}, tmp_path / "one.png", "t")


def test_the_distill_study_says_when_a_recorded_base_run_is_gone(tmp_path, capsys, monkeypatch):
    """A stage after `base` needs the base run's folder: where only its record survived, made on another kind of
    device, the driver exits 2 with one line naming the folder for a seed asked for by name, and writes nothing;
    among all the study's seeds it skips that one with a line and runs the others."""
    import importlib.util

    from conftest import REPO

    spec = importlib.util.spec_from_file_location("distill_study", REPO / "experiments" / "distill_study.py")
    study = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(study)
    results = tmp_path / "results"
    (results / "runs").mkdir(parents=True)
    (results / "runs" / "seed0_base.json").write_text('{"seed": 0, "stage": "base"}')
    args = [str(REPO / "experiments" / "distill_study.toml"), "--out", str(tmp_path / "runs"), "--results",
            str(results), "--stages", "base", "targets"]
    assert study.main([*args, "--seeds", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(tmp_path / "runs" / "base_seed0") in err[0] and "targets stage" in err[0]
    assert "made on None" in err[0] and "on this device" in err[0]
    assert sorted(p.name for p in (results / "runs").iterdir()) == ["seed0_base.json"]
    assert not (tmp_path / "runs").exists()
    real, ran = study.run_stage, []
    monkeypatch.setattr(study, "run_stage", lambda s, out, seed, stage, res: real(s, out, seed, stage, res) if seed == 0
                        else ran.append((seed, stage)) or {"x": 1})
    monkeypatch.setattr(study, "tables", lambda records, results: {})
    monkeypatch.setattr(study, "speed_points", lambda records: {})
    assert study.main(args) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("distill_study: seed 0 skipped:") and "targets stage" in err[0]
    others = [seed for seed in study.load_study(REPO / "experiments" / "distill_study.toml")["seeds"] if seed != 0]
    assert others and ran == [(seed, stage) for seed in others for stage in ("base", "targets")]
    assert not (results / "runs" / "seed0_targets.json").exists() and not (tmp_path / "runs").exists()


@slow
def test_a_gone_base_is_trained_again_and_kept_only_if_it_reproduces_its_record(tmp_path, capsys):
    """A run folder does not outlive its machine: where seed 0's base is recorded but its folder is gone, the next
    stage trains the base again on this device and goes on only if the new base reproduces the record's figures;
    a base that does not (here: a planted record) is set aside as `base_seed0.differs` and the study stops in one
    line, recording nothing."""
    import importlib.util

    from conftest import REPO, TINY

    from test_sweep import OVERRIDES

    spec = importlib.util.spec_from_file_location("distill_study", REPO / "experiments" / "distill_study.py")
    study = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(study)
    toml = tmp_path / "study.toml"
    toml.write_text(f'base = "{TINY}"\noverrides = {json.dumps(OVERRIDES + TARGETS)}\nseeds = [0]\n'
                    'distil_overrides = ["train.beta=1.0"]\nfinetune_overrides = ["train.epochs=1"]\n'
                    'memory_overrides = ["train.beta=1.0", "train.ce_weight=0"]\n')
    runs, results = tmp_path / "runs", tmp_path / "results"
    args = [str(toml), "--out", str(runs), "--results", str(results)]
    assert study.main([*args, "--stages", "base"]) == 0
    recorded = json.loads((results / "runs" / "seed0_base.json").read_text())
    shutil.rmtree(runs / "base_seed0")
    capsys.readouterr()
    assert study.main([*args, "--stages", "targets"]) == 0
    assert "making seed 0's base again" in capsys.readouterr().out
    assert (runs / "base_seed0" / "targets" / "meta.json").is_file() and (results / "runs" / "seed0_targets.json").is_file()
    assert json.loads((results / "runs" / "seed0_base.json").read_text()) == recorded  # the record is not rewritten
    # the targets gone too: the memory stage makes them again from the (kept) base and checks them against their record
    shutil.rmtree(runs / "base_seed0" / "targets")
    assert study.main([*args, "--stages", "memory"]) == 0
    assert "making seed 0's targets again" in capsys.readouterr().out
    assert set(json.loads((results / "runs" / "seed0_memory.json").read_text())) >= {"valid", "test", "train_seconds"}
    # the distilled LM and its control, a second LM trained as the base is from another init, each beside the base
    assert study.main([*args, "--stages", "scratch", "ensemble"]) == 0
    for stage in ("scratch", "ensemble"):
        pair = json.loads((results / "runs" / f"seed0_{stage}.json").read_text())["as_memory"]
        for split in ("valid", "test"):
            assert pair[split]["lm_ppl"] == pytest.approx(recorded[split]["lm_ppl"], rel=1e-6)  # the base's LM
            assert pair[split]["memory_model_ppl"] != pytest.approx(recorded[split]["lm_ppl"], rel=1e-3)  # another LM
            alone = (pair[split]["lm_ppl"], pair[split]["memory_model_ppl"])  # μ tuned on valid over [0, 1]; on test a
            assert pair[split]["lm_memory_ppl"] <= (min if split == "valid" else max)(alone) * (1 + 1e-9)  # mix ≤ worse
    ensemble = json.loads((results / "runs" / "seed0_ensemble.json").read_text())
    assert ensemble["overrides"] == [f"train.seed={study.ENSEMBLE_SEED}"] and not (runs / "ensemble_seed0" / "datastore").exists()
    # a base that does not reproduce its record (planted: its valid LM perplexity changed) stops the study
    shutil.rmtree(runs / "base_seed0")
    planted = {**recorded, "valid": {**recorded["valid"], "lm_ppl": recorded["valid"]["lm_ppl"] * 1.01}}
    (results / "runs" / "seed0_base.json").write_text(json.dumps(planted))
    assert study.main([*args, "--stages", "finetune"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("distill_study:")]  # no bars
    assert len(err) == 1 and "differs from its record" in err[0] and "valid.lm_ppl" in err[0], err
    assert (runs / "base_seed0.differs" / "datastore" / "meta.json").is_file() and not (runs / "base_seed0").exists()
    assert not (results / "runs" / "seed0_finetune.json").exists()


def test_the_distill_study_runs_stages_in_order_for_the_seeds_asked_and_refuses_a_missing_input(tmp_path, capsys,
                                                                                                  monkeypatch):
    """Stages run in STAGES' order for the seeds of --seeds only, each
    recorded as it finishes; a stage whose input stage is neither recorded nor asked for is refused in one line
    before anything runs, and so is a seed the study does not have."""
    import importlib.util

    from conftest import REPO

    spec = importlib.util.spec_from_file_location("distill_study", REPO / "experiments" / "distill_study.py")
    study = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(study)
    ran = []
    monkeypatch.setattr(study, "run_stage", lambda s, out, seed, stage, results: ran.append((seed, stage)) or {"x": 1})
    monkeypatch.setattr(study, "tables", lambda records, results: {})
    monkeypatch.setattr(study, "speed_points", lambda records: {})
    results, toml = tmp_path / "results", str(REPO / "experiments" / "distill_study.toml")
    args = [toml, "--out", str(tmp_path / "runs"), "--results", str(results)]
    assert study.main([*args, "--seeds", "1", "--stages", "control", "memory", "targets", "base"]) == 0
    assert ran == [(1, "base"), (1, "targets"), (1, "memory"), (1, "control")]
    assert sorted(p.name for p in (results / "runs").iterdir()) == [f"seed1_{s}.json" for s in
                                                                     ("base", "control", "memory", "targets")]
    ran.clear()
    assert study.main([*args, "--seeds", "2", "--stages", "memory"]) == 2  # seed 2 has neither base nor targets
    assert study.main([*args, "--seeds", "7"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "seed 2's memory stage needs its base stage" in err[0] and "--seeds: [7]" in err[1]
    assert ran == [] and not (results / "runs" / "seed2_memory.json").exists()
    assert study.main([*args, "--seeds", "1", "--stages", "finetune"]) == 0  # its inputs are recorded
    assert ran == [(1, "finetune")]
    # a record made with other settings than the study's (here: an older memory model's) is refused, not reused
    memory = results / "runs" / "seed1_memory.json"
    rec = json.loads(memory.read_text())
    assert rec["settings"] == {"overrides": study.load_study(REPO / "experiments" / "distill_study.toml")["overrides"],
                               "stage": study.stage_settings(study.load_study(REPO / "experiments" / "distill_study.toml"),
                                                             "memory")}
    rec["settings"]["stage"] = ["train.beta=0.5", "train.ce_weight=0.5"]
    memory.write_text(json.dumps(rec))
    ran.clear()
    capsys.readouterr()
    assert study.main([*args, "--seeds", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(memory) in err[0] and "other settings" in err[0] and ran == []
    # a record from before records kept their settings: its stage overrides (without init_from) are compared
    memory.write_text(json.dumps({"seed": 1, "stage": "memory", "overrides": ["train.beta=0.5", "train.init_from=x"]}))
    assert study.main([*args, "--seeds", "1"]) == 2 and ran == []
    del rec["settings"]
    rec["overrides"] = [*study.stage_settings(study.load_study(REPO / "experiments" / "distill_study.toml"), "memory"),
                        "train.init_from=/elsewhere/base_seed1"]
    memory.write_text(json.dumps(rec))
    assert study.main([*args, "--seeds", "1"]) == 0 and ran == [(1, "scratch"), (1, "ensemble")]


@slow
def test_distill_fit_is_a_numpy_kl_on_training_text_and_on_valid(tiny_run, tmp_path):
    """experiments/distill_fit.py: the base's KL from p_kNN on training text (the stored targets) and on valid
    (p_kNN of the saved search) equals a float64 numpy KL over the same partition, from the model's full
    distribution and, on valid, from a brute-force search of the datastore's keys at the saved query keys."""
    import importlib.util

    from conftest import REPO

    from knnlm.checkpoint import load_model
    from knnlm.data import split_ids, token_stream
    from knnlm.models import corpus_for

    base = tmp_path / "runs" / "base_seed0"
    shutil.copytree(tiny_run[0], base)
    knnlm("targets", "--out", base, *TARGETS)
    spec = importlib.util.spec_from_file_location("distill_fit", REPO / "experiments" / "distill_fit.py")
    fit = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fit)
    model, cfg, _ = load_model(base)
    T, m = model.cfg.context, 4 * model.cfg.context
    assert fit.main([str(tmp_path / "runs"), "--tokens", str(m), "--out", str(tmp_path / "fit")]) == 0
    got = json.loads((tmp_path / "fit.json").read_text())["kl_nats"]["base"]
    t = Targets(base / "targets")
    k, tau, top = t.meta["k"], t.meta["temperature"], t.meta["top"]
    keys = np.load(base / "datastore" / "keys.npy").astype(np.float64)
    vals = np.load(base / "datastore" / "vals.npy")
    queries = np.load(base / "eval" / "valid" / "query_keys.npy").astype(np.float64)

    def brute_p(q):  # p_kNN at a valid query: its k nearest stored keys, float64
        d = ((keys - q) ** 2).sum(1)
        near = np.lexsort((np.arange(len(d)), d))[:k]
        w = np.exp(-(d[near] - d[near].min()) / tau)
        p = {}
        for word, weight in zip(vals[near], w / w.sum()):
            p[int(word)] = p.get(int(word), 0.0) + weight
        return p

    def numpy_kl(split, p_of):
        s = token_stream(split_ids(corpus_for(cfg), cfg, split), corpus_for(cfg).eos_id)
        rows = torch.arange(m)
        with torch.no_grad():
            out = model(s[rows].reshape(-1, T))
            q = np.exp(model.full_logprobs(out.hidden.reshape(m, -1)).double().numpy())  # (m, V)
        kls = []
        for i in range(m):
            p = p_of(i)
            words = sorted(p, key=lambda w: -p[w])[:top]
            rest = 1.0 - sum(p[w] for w in words)
            kl = sum(p[w] * math.log(p[w] / q[i, w]) for w in words)
            if rest > 1e-12:
                kl += rest * math.log(rest / (1.0 - q[i, words].sum()))
            kls.append(kl)
        return float(np.mean(kls))

    def stored_p(i):
        return {int(w): float(p) for w, p in zip(t.arrays["words"][i], t.arrays["probs"][i]) if w >= 0 and p > 0}

    assert got["train"] == pytest.approx(numpy_kl("train", stored_p), rel=1e-4)
    assert got["valid"] == pytest.approx(numpy_kl("valid", lambda i: brute_p(queries[i])), rel=1e-3)

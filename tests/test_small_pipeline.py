"""The whole pipeline in-process on a 30-word synthetic corpus (a few seconds): `knnlm run` through `cli.main`,
its datastore and evaluation checked against direct references (the model's own keys, a full softmax, brute-force
neighbours and a numpy kNN-LM), training stopped at a step and resumed.

The end-to-end tests on WikiText-2 (tests/test_pipeline.py, tests/test_faults.py) are marked slow."""

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import TINY, interrupt_training_at
from knnlm.checkpoint import latest_checkpoint, load_model
from knnlm.cli import main
from knnlm.data import load_corpus, sliding_windows, token_stream

MICRO = ["data.max_train_tokens=0", "data.max_eval_tokens=0", "model.d_model=16", "model.n_layers=1",
         "model.n_heads=2", "model.d_ff=32", "model.context=16", "model.cutoffs=8,16", "model.dropout=0.1",
         "train.epochs=1", "train.batch_size=8", "train.warmup_steps=2", "train.checkpoint_every=5",
         "train.omega=0.01", "train.bf16=false", "train.eval_tokens=0", "train.threads=1",
         "eval.k_max=16", "eval.k=4,16", "eval.temperature=1,3", "eval.index=Flat"]


def micro_corpus(folder):
    """40 sentence types over 30 words, repeated at random: ~2,700 training tokens with things to retrieve."""
    rng = np.random.default_rng(0)
    words = [f"w{i}" for i in range(30)]
    sentences = [" ".join(rng.choice(words, rng.integers(3, 9))) for _ in range(40)]
    folder.mkdir()
    for split, lines in (("train", 400), ("valid", 40), ("test", 40)):
        (folder / f"{split}.txt").write_text("\n".join(sentences[i] for i in rng.integers(0, 40, lines)) + "\n")
    return folder


@pytest.fixture(scope="module")
def micro(tmp_path_factory):
    root = tmp_path_factory.mktemp("micro")
    args = [f"data.path={micro_corpus(root / 'corpus')}", *MICRO]
    assert main(["run", "--config", str(TINY), "--out", str(root / "run"), *args]) == 0
    yield root / "run", args
    shutil.rmtree(root)  # module-scoped folders go with their module: CI's disk is not large


def test_datastore_row_i_is_the_models_key_at_i_and_the_token_after_it(micro):
    run, _ = micro
    model, cfg, _ = load_model(run)
    corpus = load_corpus(cfg.data.path)
    ids = corpus.splits["train"]
    keys = np.load(run / "datastore" / "keys.npy")
    vals = np.load(run / "datastore" / "vals.npy")
    assert keys.shape == (len(ids), 16) and np.array_equal(vals, ids)  # key t ↔ token t+1 (the stream's ids[t])
    s = token_stream(ids, corpus.eos_id)
    for a, e, f in sliding_windows(len(ids), 16, 8)[:4]:  # the first window and three with half a window of context
        with torch.no_grad():
            key = model(s[None, a:e]).key[0, f - a :]  # (e - f, d) in fp32, read directly from the model
        assert np.allclose(keys[f:e].astype(np.float32), key.numpy(), rtol=1e-3, atol=1e-3)


def test_evaluation_equals_a_full_softmax_brute_force_neighbours_and_a_numpy_knnlm(micro):
    run, _ = micro
    ev = run / "eval" / "valid"
    model, cfg, _ = load_model(run)
    corpus = load_corpus(cfg.data.path)
    targets, lm = np.load(ev / "targets.npy"), np.load(ev / "lm_logprobs.npy").astype(np.float64)
    assert np.array_equal(targets, corpus.splits["valid"])
    # the first window's LM log-probabilities from the full softmax over the vocabulary
    s = token_stream(corpus.splits["valid"], corpus.eos_id)
    with torch.no_grad():
        full = model.softmax.full_logprobs(model(s[None, :16]).hidden[0])  # (16, V)
    assert np.allclose(lm[:16], full[torch.arange(16), s[1:17]].numpy(), atol=1e-5)

    # neighbours: the 16 nearest stored keys by float64 brute force (ids may swap only at tied distances)
    keys = np.load(run / "datastore" / "keys.npy").astype(np.float64)
    q = np.load(ev / "query_keys.npy").astype(np.float64)
    d_all = ((q[:, None, :] - keys[None]) ** 2).sum(-1)  # (n, N)
    dists, nbrs = np.load(ev / "distances.npy"), np.load(ev / "neighbors.npy")
    assert np.allclose(dists, np.sort(d_all, axis=1)[:, :16], rtol=1e-4, atol=1e-4)
    assert np.allclose(np.take_along_axis(d_all, nbrs.astype(np.int64), 1), dists, rtol=1e-4, atol=1e-4)

    # the summary's perplexity: p_kNN(w) = Σ_{j<k, v_j = w} exp(−d_j/T) / Σ_{j<k} exp(−d_j/T), mixed at λ
    summary = json.loads((ev / "summary.json").read_text())
    assert summary["index"] == "Flat" and summary["search"] == "FAISS Flat"  # which search ran
    assert set(summary["seconds"]) == {"lm", "index", "search", "tuning"}  # the evaluation's parts, tuning included
    k, T, lam = summary["k"], summary["temperature"], summary["lambda"]
    logits = -dists[:, :k].astype(np.float64) / T
    hit = np.where(np.load(run / "datastore" / "vals.npy")[nbrs[:, :k]] == targets[:, None], logits, -np.inf)
    knn = np.logaddexp.reduce(hit, axis=1) - np.logaddexp.reduce(logits, axis=1)
    mixed = lm if lam == 0 else np.logaddexp(np.log(lam) + knn, np.log1p(-lam) + lm)
    assert summary["knnlm_ppl"] == pytest.approx(math.exp(-mixed.mean()), rel=1e-6)
    assert summary["lm_ppl"] == pytest.approx(math.exp(-lm.mean()), rel=1e-6)
    grid = json.loads((ev / "tuning.json").read_text())
    assert summary["knnlm_ppl"] == pytest.approx(min(r["ppl"] for r in grid if r["k"] in (4, 16)), rel=1e-12)


def test_training_interrupted_at_a_step_and_resumed_ends_with_the_same_weights(micro, tmp_path, monkeypatch):
    """Stopped at a step count (the slow tests SIGKILL a subprocess there instead), then resumed from step 10."""
    run, args = micro
    stopped = tmp_path / "run"
    interrupt_training_at(monkeypatch, 13)
    assert main(["train", "--config", str(TINY), "--out", str(stopped), *args]) == 130
    monkeypatch.undo()
    assert json.loads((latest_checkpoint(stopped) / "meta.json").read_text())["step"] == 10
    assert main(["train", "--config", str(TINY), "--out", str(stopped), "--resume", *args]) == 0
    a = load_file(str(latest_checkpoint(run) / "model.safetensors"))
    b = load_file(str(latest_checkpoint(stopped) / "model.safetensors"))
    assert latest_checkpoint(run).name == latest_checkpoint(stopped).name
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_knn_memory_training_resumed_ends_with_the_same_weights_and_memory(micro, tmp_path, monkeypatch):
    """The `knn-memory` loss's memory and row offset are training state: saved in checkpoints, restored on resume."""
    _, args = micro
    args = [*args, "train.regularizer=knn-memory", "train.knn_memory=200", "train.knn_stride=3", "train.omega=0.1"]
    whole, stopped = tmp_path / "whole", tmp_path / "stopped"
    assert main(["train", "--config", str(TINY), "--out", str(whole), *args]) == 0
    interrupt_training_at(monkeypatch, 13)
    assert main(["train", "--config", str(TINY), "--out", str(stopped), *args]) == 130
    monkeypatch.undo()
    assert main(["train", "--config", str(TINY), "--out", str(stopped), "--resume", *args]) == 0
    for name in ("model.safetensors", "regularizer.safetensors"):
        a = load_file(str(latest_checkpoint(whole) / name))
        b = load_file(str(latest_checkpoint(stopped) / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    reg = load_file(str(latest_checkpoint(whole) / "regularizer.safetensors"))
    assert int(reg["steps"]) > 13 and int((reg["mem_words"] >= 0).sum()) == 200  # filled, and offsets turned


def test_the_python_api_agrees_with_the_evaluation_and_a_brute_force_knnlm(micro):
    import knnlm
    from knnlm.config import read_run_config
    from knnlm.knn import interpolate

    run, _ = micro
    lm = knnlm.load(run)
    summary = json.loads((run / "eval" / "valid" / "summary.json").read_text())
    assert (lm.k, lm.knn_temperature, lm.lmbda) == (summary["k"], summary["temperature"], summary["lambda"])
    text = (Path(read_run_config(run).data.path) / "valid.txt").read_text()
    scored = lm.score(text)  # the whole valid split, scored through the API
    ev = run / "eval" / "valid"
    saved_lm, saved_knn = np.load(ev / "lm_logprobs.npy"), np.load(ev / "knn_logprobs.npy").astype(np.float64)
    np.testing.assert_allclose(scored.lm, saved_lm, atol=1e-5)
    np.testing.assert_allclose(scored.logprobs, interpolate(saved_lm, saved_knn, lm.lmbda), atol=1e-5)
    assert scored.ppl == pytest.approx(summary["knnlm_ppl"], rel=1e-5)

    # the full next-token distribution = a numpy kNN-LM over every stored key
    context = " ".join(text.split()[:5])
    logp = lm.next_token_logprobs(context)
    ids = lm.encode(context, close_last_line=False)
    model, _, _ = load_model(run)
    with torch.no_grad():
        out = model(token_stream(ids, lm.eos_id)[None])
        p_lm = model.softmax.full_logprobs(out.hidden[0, -1:])[0].double().exp().numpy()
    keys = np.load(run / "datastore" / "keys.npy").astype(np.float64)
    vals = np.load(run / "datastore" / "vals.npy")
    d = ((keys - out.key[0, -1].to(torch.float16).double().numpy()) ** 2).sum(1)
    near = np.argsort(d, kind="stable")[: lm.k]
    w = np.exp(-(d[near] - d[near].min()) / lm.knn_temperature)
    p_knn = np.bincount(vals[near], weights=w / w.sum(), minlength=len(lm.vocab))
    np.testing.assert_allclose(logp.exp().numpy(), lm.lmbda * p_knn + (1 - lm.lmbda) * p_lm, atol=1e-6)

    # generation: greedy is the argmax chain; top-1 sampling is greedy; a seed reproduces a sample
    chain = list(ids)
    for _ in range(5):
        chain.append(int(lm.next_token_logprobs(np.asarray(chain, dtype=np.int32)).argmax()))
    greedy = lm.generate(context, max_tokens=5, greedy=True)
    assert greedy == lm.decode(chain[-5:]) == lm.generate(context, max_tokens=5, top_k=1, seed=0)
    assert lm.generate(context, max_tokens=8, top_p=0.8, seed=3) == lm.generate(context, max_tokens=8, top_p=0.8, seed=3)


def test_a_finished_run_asked_to_run_with_another_model_config_says_so_and_changes_nothing(micro, tmp_path, capsys):
    import shutil

    from conftest import main_fails, snapshot

    run, args = micro
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    before = snapshot(copy)
    line = main_fails(capsys, "run", "--config", TINY, "--out", copy, *args, "train.lr=0.01", "model.d_ff=64")
    assert "other settings" in line and "train.lr" in line and "model.d_ff" in line
    line = main_fails(capsys, "train", "--resume", "--out", copy, "train.seed=5")
    assert "train.seed" in line
    assert snapshot(copy) == before
    # evaluation settings are not the model's: the same run evaluates again under another grid
    assert main(["run", "--config", str(TINY), "--out", str(copy), *args, "eval.k=4", "train.threads=2"]) == 0
    assert json.loads((copy / "eval" / "valid" / "summary.json").read_text())["k"] == 4


@pytest.mark.slow
def test_early_stopping_keeps_the_best_checkpoint_and_the_pipeline_uses_it(tmp_path, monkeypatch):
    """Planted valid perplexities 50, 40, 45, 47: the best is epoch 2; patience 2 stops after epoch 4 of 6; the
    datastore and evaluation read epoch 2's weights, and the summary reports them."""
    from knnlm import train as train_module
    from knnlm.checkpoint import latest_checkpoint, latest_meta, model_checkpoint
    from knnlm.config import load_config
    from knnlm.pipeline import run_pipeline

    corpus = micro_corpus(tmp_path / "corpus")
    planted = iter([50.0, 40.0, 45.0, 47.0])
    real = train_module.block_perplexity
    calls = []

    def fake(model, corpus_, cfg, split, max_tokens=0):
        if split == "valid" and len(calls) < 4:
            calls.append(split)
            return next(planted)
        return real(model, corpus_, cfg, split, max_tokens)

    monkeypatch.setattr(train_module, "block_perplexity", fake)
    cfg = load_config(None, [*MICRO, f"data.path={corpus}", "train.epochs=6", "train.checkpoint_every=1000",
                             "train.keep_best=true", "train.patience=2"])
    out = tmp_path / "run"
    results = run_pipeline(cfg, out, progress=False)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    epochs = [r for r in rows if "valid_ppl" in r]
    steps_per_epoch = epochs[0]["step"]
    assert [r["valid_ppl"] for r in epochs] == [50.0, 40.0, 45.0, 47.0]  # stopped after the 4th epoch of 6
    summary = results["train"]
    assert summary["stopped_early"] and summary["best_step"] == 2 * steps_per_epoch
    assert summary["steps"] == 4 * steps_per_epoch and summary["epochs"] == 4
    best = model_checkpoint(out)
    assert best.name == "best" and json.loads((best / "meta.json").read_text())["step"] == 2 * steps_per_epoch
    assert latest_checkpoint(out).name == f"step_{4 * steps_per_epoch:08d}"  # resume reads the latest
    ds = json.loads((out / "datastore" / "meta.json").read_text())
    assert ds["model_sha256"] == latest_meta(out)["model_sha256"] == json.loads((best / "meta.json").read_text())["model_sha256"]
    assert summary["penalty"]["start"]["omega_reg_loss"] == pytest.approx(0.01 * rows[0]["reg_loss"])
    # a rerun finds every step done (the datastore of the best checkpoint is not rebuilt)
    before = (out / "datastore" / "meta.json").stat().st_mtime_ns
    run_pipeline(cfg, out, progress=False)
    assert (out / "datastore" / "meta.json").stat().st_mtime_ns == before


def test_learning_curves_record_train_perplexity_each_epoch_as_the_summary_measures_it(tmp_path):
    """train.curves: every epoch's metrics row holds the train split's perplexity beside valid's; the last one
    is the summary's (same model, same blocks), and without the option the rows stay as they were."""
    from knnlm.config import load_config
    from knnlm.train import train

    corpus = micro_corpus(tmp_path / "corpus")
    rows = {}
    for curves in (True, False):
        cfg = load_config(None, [*MICRO, f"data.path={corpus}", "train.epochs=3", f"train.curves={str(curves).lower()}"])
        out = tmp_path / f"run_{curves}"
        summary = train(cfg, out, progress=False)
        rows[curves] = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        epochs = [r for r in rows[curves] if "valid_ppl" in r]
        assert len(epochs) == 3
        if curves:
            assert all(r["train_ppl"] > 1 for r in epochs) and epochs[-1]["train_ppl"] == summary["train_ppl"]
            assert epochs[-1]["valid_ppl"] == summary["valid_ppl"]
        else:
            assert not any("train_ppl" in r for r in epochs)
    strip = lambda rs: [{k: v for k, v in r.items() if k not in ("train_ppl", "tokens_per_s")} for r in rs]
    assert strip(rows[True]) == strip(rows[False])  # measuring train perplexity changes no training step

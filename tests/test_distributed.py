"""Two gloo processes under torchrun train the same weights as one process on the same global batch, write the same
datastore, and find the same neighbours with the store split between them."""

import json
import math
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, TINY, knnlm
from knnlm.checkpoint import latest_checkpoint
from knnlm.search.base import merge_nearest

pytestmark = [pytest.mark.slow, pytest.mark.wikitext]  # torchrun launches and full training runs

ARGS = ["data.max_train_tokens=8192", "data.max_eval_tokens=1000", "model.context=32", "model.dropout=0.0",
        "train.batch_size=8", "train.epochs=1", "train.warmup_steps=2", "train.bf16=false", "train.eval_tokens=1000",
        "train.threads=1"]  # one thread everywhere: the same kernels, so only the all-reduce order differs


def same_weights(a, b):
    """Equal up to the order of floating-point sums in the gradient all-reduce. The attention key bias is excluded:
    softmax ignores it, so its gradient is pure rounding noise that Adam scales up to full-size steps."""
    assert a.keys() == b.keys()
    for k in a:
        x, y = a[k], b[k]
        if k.endswith("attn.qkv.bias"):
            d = x.numel() // 3
            x, y = torch.cat([x[:d], x[2 * d :]]), torch.cat([y[:d], y[2 * d :]])
        assert torch.allclose(x, y, rtol=1e-4, atol=1e-5), k
    return True


def torchrun(*args, nproc=2):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "knnlm.cli", *map(str, args)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env={**os.environ, "TQDM_DISABLE": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.mark.parametrize("regularizer", ["l2", "moco"])
def test_two_gloo_ranks_match_one_process(regularizer, tmp_path):
    extra = [f"train.regularizer={regularizer}", "train.omega=0.01", "train.queue_len=2"]
    single, double = tmp_path / "single", tmp_path / "double"
    knnlm("train", "--config", TINY, "--out", single, *ARGS, *extra)
    torchrun("train", "--config", TINY, "--out", double, *ARGS, *extra)
    a = load_file(str(latest_checkpoint(single) / "model.safetensors"))
    b = load_file(str(latest_checkpoint(double) / "model.safetensors"))
    assert same_weights(a, b)
    if regularizer == "moco":
        qa = load_file(str(latest_checkpoint(single) / "regularizer.safetensors"))
        qb = load_file(str(latest_checkpoint(double) / "regularizer.safetensors"))
        assert torch.equal(qa["queue.ptr"], qb["queue.ptr"]) and torch.equal(qa["queue.filled"], qb["queue.filled"])
        assert torch.allclose(qa["queue.keys"], qb["queue.keys"], rtol=1e-3, atol=1e-4)


def test_resume_on_another_number_of_ranks(tmp_path):
    ref = tmp_path / "ref"
    knnlm("train", "--config", TINY, "--out", ref, *ARGS, "train.checkpoint_every=16")  # 32 steps, saved at 16, 32
    out = tmp_path / "run"
    shutil.copytree(ref, out)
    shutil.rmtree(latest_checkpoint(out))  # back to step 16, as if one process had been stopped there
    torchrun("train", "--config", TINY, "--out", out, "--resume", *ARGS, "train.checkpoint_every=16")  # rest on two
    assert json.loads((latest_checkpoint(out) / "meta.json").read_text())["step"] == 32
    a = load_file(str(latest_checkpoint(ref) / "model.safetensors"))
    b = load_file(str(latest_checkpoint(out) / "model.safetensors"))
    assert same_weights(a, b)


def test_sharded_datastore_equals_one_process(tmp_path):
    run = tmp_path / "run"
    knnlm("train", "--config", TINY, "--out", run, *ARGS)
    knnlm("datastore", "--out", run)
    keys1 = np.load(run / "datastore" / "keys.npy")
    vals1 = np.load(run / "datastore" / "vals.npy")
    torchrun("datastore", "--out", run)
    meta = json.loads((run / "datastore" / "meta.json").read_text())
    assert meta["ranks"] == 2 and meta["N"] == 8192
    assert np.array_equal(np.load(run / "datastore" / "vals.npy"), vals1)
    assert np.allclose(np.load(run / "datastore" / "keys.npy").astype(np.float32), keys1.astype(np.float32), atol=1e-3)


def test_sharded_evaluation_equals_one_process(tmp_path):
    """`knnlm evaluate` under torchrun splits the store across 2 gloo ranks: the same neighbours and perplexities."""
    run = tmp_path / "run"
    knnlm("train", "--config", TINY, "--out", run, *ARGS)
    knnlm("datastore", "--out", run)
    ev = ["eval.index=Flat", "eval.k_max=64", "eval.k=8,64"]
    knnlm("evaluate", "--out", run, *ev)
    folder = run / "eval" / "valid"
    one = {a: np.load(folder / f"{a}.npy") for a in ("neighbors", "distances", "targets", "lm_logprobs")}
    one_summary = json.loads((folder / "summary.json").read_text())
    shutil.rmtree(run / "eval")
    proc = torchrun("evaluate", "--out", run, "--json", *ev)
    assert proc.stdout.count('"split": "valid"') == 1  # rank 0 alone reports
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["search_ranks"] == 2 and meta["searched_queries"] == meta["tokens"] == len(one["targets"])
    assert np.array_equal(np.load(folder / "targets.npy"), one["targets"])
    assert np.array_equal(np.load(folder / "lm_logprobs.npy"), one["lm_logprobs"])
    d, i = merge_nearest(one["distances"], one["neighbors"].astype(np.int64), 64)  # ties ordered by id, as merged
    assert np.array_equal(np.load(folder / "neighbors.npy"), i)
    assert np.allclose(np.load(folder / "distances.npy"), d, rtol=1e-6)
    two_summary = json.loads((folder / "summary.json").read_text())
    for p in ("tuned", "paper"):
        assert math.isclose(two_summary["protocols"][p]["knnlm_ppl"], one_summary["protocols"][p]["knnlm_ppl"], rel_tol=1e-6)

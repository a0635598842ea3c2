"""Nothing lost: jobs killed at random points finish with the same result, bad input leaves files untouched,
untrusted files are never executed."""

import os
import pickle
import random
import resource
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, TINY, fails, knnlm, snapshot
from knnlm.checkpoint import latest_checkpoint

SMALL = ["data.max_train_tokens=20000", "data.max_eval_tokens=2000", "model.context=32", "model.dropout=0.1",
         "train.batch_size=8", "train.epochs=2", "train.checkpoint_every=10", "train.warmup_steps=5",
         "eval.k_max=32", "eval.k=8,32"]


def kill_after(args, delay, **popen):
    proc = subprocess.Popen([sys.executable, "-m", "knnlm.cli", *map(str, args)], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, **popen)
    try:
        proc.wait(timeout=delay)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    return proc.returncode


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("small") / "run"
    knnlm("run", "--config", TINY, "--out", out, *SMALL)
    return out


def test_training_killed_at_random_points_ends_with_the_same_weights(small_run, tmp_path):
    seed = random.randrange(10**6)
    print(f"kill points seed: {seed}")
    rng = random.Random(seed)
    out = tmp_path / "killed"
    for _ in range(3):
        kill_after(["train", "--config", TINY, "--out", out, "--resume", *SMALL], rng.uniform(1.0, 6.0))
    knnlm("train", "--config", TINY, "--out", out, "--resume", *SMALL)
    a = load_file(str(latest_checkpoint(small_run) / "model.safetensors"))
    b = load_file(str(latest_checkpoint(out) / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a), f"weights differ (seed {seed})"


def test_datastore_killed_at_random_points_ends_with_the_same_files(small_run, tmp_path):
    seed = random.randrange(10**6)
    print(f"kill points seed: {seed}")
    rng = random.Random(seed)
    reference = snapshot(small_run / "datastore")
    run = tmp_path / "run"
    shutil.copytree(small_run, run, ignore=shutil.ignore_patterns("datastore", "eval"))
    for _ in range(3):
        kill_after(["datastore", "--out", run], rng.uniform(0.5, 4.0))
        # a killed build never leaves something that looks complete
        assert not (run / "datastore").exists() or (run / "datastore" / "meta.json").is_file()
    knnlm("datastore", "--out", run)
    got = snapshot(run / "datastore")
    ref_meta = {k: v for k, v in reference.items() if k != "meta.json"}
    assert {k: v for k, v in got.items() if k != "meta.json"} == ref_meta, f"seed {seed}"


# ---- the bad input matrix: one line, non-zero exit, nothing changed -------------------------------------------

def corpus(folder, train="a b c\n", valid="a b\n", test="c\n"):
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in (("train", train), ("valid", valid), ("test", test)):
        if text is not None:
            (folder / f"{name}.txt").write_bytes(text if isinstance(text, bytes) else text.encode())
    return folder


@pytest.mark.parametrize("case", ["missing", "empty_split", "not_utf8", "some_splits"])
def test_bad_data_folders(case, tmp_path, small_run):
    make = {"missing": lambda: tmp_path / "nope",
            "empty_split": lambda: corpus(tmp_path / "d", valid=""),
            "not_utf8": lambda: corpus(tmp_path / "d", train=b"caf\xe9 au lait\n"),
            "some_splits": lambda: corpus(tmp_path / "d", test=None)}
    data = make[case]()
    expect = {"missing": "data folder not found", "empty_split": "valid split is empty",
              "not_utf8": "not UTF-8", "some_splits": "only some splits"}[case]
    out = tmp_path / "out"
    fails(knnlm("train", "--config", TINY, "--out", out, f"data.path={data}", check=False), expect)
    assert not out.exists() or not any(out.iterdir())


@pytest.mark.parametrize("args,expect", [
    (["train.nonsense=1"], "unknown config key 'nonsense'"),
    (["train.epochs=many"], "train.epochs: expected a number"),
    (["train.batch_size=2.5"], "train.batch_size: expected an integer"),
    (["eval.temperature=0"], "eval.temperature"),
    (["eval.k=0"], "eval.k"),
    (["--omega", "-1"], "train.omega"),
])
def test_bad_config_values(args, expect, tmp_path):
    out = tmp_path / "out"
    fails(knnlm("train", "--config", TINY, "--out", out, *args, check=False), expect)
    assert not out.exists()


def test_unknown_key_in_config_file(tmp_path):
    cfg = tmp_path / "bad.toml"
    cfg.write_text(TINY.read_text() + "\n[extra]\nfoo = 1\n")
    fails(knnlm("train", "--config", cfg, "--out", tmp_path / "o", check=False), "unknown config key 'extra'")


@pytest.mark.parametrize("args,expect", [
    (["--lmbda", "-0.1"], "--lmbda"), (["--lmbda", "1.01"], "--lmbda"),
    (["--k", "0"], "--k: expected k > 0"), (["--k", "10000000"], "larger than the datastore"),
    (["eval.temperature=-1"], "eval.temperature"),
])
def test_bad_evaluation_options(args, expect, small_run):
    before = snapshot(small_run)
    fails(knnlm("evaluate", "--out", small_run, *args, check=False), expect)
    assert snapshot(small_run) == before


def test_truncated_keys_are_refused(small_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(small_run, run, ignore=shutil.ignore_patterns("eval"))
    keys = run / "datastore" / "keys.npy"
    with open(keys, "r+b") as f:
        f.truncate(keys.stat().st_size // 2)
    before = snapshot(run)
    fails(knnlm("evaluate", "--out", run, check=False), "keys.npy")
    assert snapshot(run) == before


def test_checkpoint_from_another_vocabulary(small_run, tmp_path):
    data = corpus(tmp_path / "other", train="x y z\n" * 50, valid="x y\n", test="z\n")
    before = snapshot(small_run)
    fails(knnlm("datastore", "--out", small_run, f"data.path={data}", check=False), "another vocabulary")
    assert snapshot(small_run) == before


def test_unwritable_output_folder(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    fails(knnlm("train", "--config", TINY, "--out", blocker / "run", check=False), "cannot")
    assert blocker.read_text() == "not a folder"


def test_full_disk_keeps_the_last_good_checkpoint(small_run, tmp_path):
    """A file-size limit stands in for a full disk: every write past it fails (EFBIG) like ENOSPC would."""
    run = tmp_path / "run"
    shutil.copytree(small_run, run, ignore=shutil.ignore_patterns("datastore", "eval"))
    before = snapshot(run)

    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))

    proc = subprocess.run([sys.executable, "-m", "knnlm.cli", "datastore", "--out", str(run)], cwd=REPO,
                          capture_output=True, text=True, preexec_fn=limit, env={**os.environ, "TQDM_DISABLE": "1"})
    fails(proc)
    assert snapshot(run) == before  # no half-written datastore, checkpoints untouched
    assert not (run / "datastore").exists()


def test_nan_loss_stops_with_the_step_and_last_good_checkpoint(tmp_path):
    out = tmp_path / "nan"
    proc = knnlm("train", "--config", TINY, "--out", out, *SMALL, "train.lr=1e12", "train.grad_clip=1e30",
                 "train.warmup_steps=1", "train.checkpoint_every=1", check=False)
    fails(proc, "loss became", "at step")
    for ckpt in (out / "checkpoints").glob("step_*"):
        assert (ckpt / "meta.json").is_file()


class Payload:
    def __reduce__(self):
        return (os.system, (f"touch {MARKER}",))


MARKER = ""


def test_planted_pickle_is_refused_not_run(small_run, tmp_path):
    global MARKER
    run = tmp_path / "run"
    shutil.copytree(small_run, run, ignore=shutil.ignore_patterns("datastore", "eval"))
    MARKER = str(tmp_path / "pwned")
    ckpt = latest_checkpoint(run)
    (ckpt / "model.safetensors").write_bytes(pickle.dumps(Payload()))
    fails(knnlm("datastore", "--out", run, check=False), "model.safetensors")
    assert not os.path.exists(MARKER)
    # the config, arrays and meta files are JSON/TOML/.npy: a pickled .npy is refused too
    np.save(run / "pickled.npy", np.array([Payload()], dtype=object), allow_pickle=True)
    from knnlm.artifacts import UserError, load_npy
    with pytest.raises(UserError):
        load_npy(run / "pickled.npy")
    assert not os.path.exists(MARKER)


@pytest.mark.parametrize("damage,expect", [
    ("datastore_meta", "no complete datastore"),
    ("eval_array", "disagrees with meta.json"),
    ("checkpoint_meta", "no complete checkpoint"),
])
def test_incomplete_artifacts_are_refused(damage, expect, small_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(small_run, run)
    if damage == "datastore_meta":
        (run / "datastore" / "meta.json").unlink()
    elif damage == "eval_array":
        np.save(run / "eval" / "valid" / "targets.npy", np.load(run / "eval" / "valid" / "targets.npy")[:-5])
    else:
        for meta in (run / "checkpoints").glob("step_*/meta.json"):
            meta.unlink()
    before = snapshot(run)
    fails(knnlm("evaluate", "--out", run, check=False), expect)
    assert snapshot(run) == before

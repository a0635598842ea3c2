"""Nothing lost: jobs killed at chosen steps finish with the same result, bad input leaves files untouched,
untrusted files are never executed. Checks on a small WikiText-2 run are end to end and marked slow; bad input
that is refused before any work is checked in this process (fast)."""

import json
import os
import pickle
import resource
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, TINY, fails, knnlm, main_fails, snapshot
from knnlm.checkpoint import latest_checkpoint

slow = pytest.mark.slow

SMALL = ["data.max_train_tokens=20000", "data.max_eval_tokens=2000", "model.context=32", "model.dropout=0.1",
         "train.batch_size=8", "train.epochs=2", "train.checkpoint_every=10", "train.warmup_steps=5",
         "eval.k_max=32", "eval.k=8,32"]


def killed_at(point, args):
    """Run a command that SIGKILLs itself at `point` ("train:<step>" or "datastore:<batch>", knnlm.artifacts.kill_point)."""
    proc = subprocess.run([sys.executable, "-m", "knnlm.cli", *map(str, args)], cwd=REPO, capture_output=True,
                          text=True, env={**os.environ, "TQDM_DISABLE": "1", "KNNLM_KILL_AT": point})
    assert proc.returncode == -signal.SIGKILL, f"not killed at {point}: {proc.returncode}\n{proc.stderr[-2000:]}"


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("small") / "run"
    knnlm("run", "--config", TINY, "--out", out, *SMALL)
    yield out
    shutil.rmtree(out.parent)  # module-scoped folders go with their module: CI's disk is not large


@slow
@pytest.mark.guarantee("resumable")
def test_training_killed_at_chosen_steps_ends_with_the_same_weights(small_run, tmp_path):
    # 79 steps an epoch, 158 in all, checkpoints every 10: killed before the first checkpoint, at a checkpoint's
    # step before it is written (so resumed from 30), and just after the epoch boundary (resumed from 80)
    out = tmp_path / "killed"
    for point in ("train:7", "train:40", "train:83"):
        killed_at(point, ["train", "--config", TINY, "--out", out, "--resume", *SMALL])
    assert json.loads((latest_checkpoint(out) / "meta.json").read_text())["step"] == 80
    knnlm("train", "--config", TINY, "--out", out, "--resume", *SMALL)
    a = load_file(str(latest_checkpoint(small_run) / "model.safetensors"))
    b = load_file(str(latest_checkpoint(out) / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


@slow
@pytest.mark.guarantee("resumable")
def test_datastore_killed_at_chosen_batches_ends_with_the_same_files(small_run, tmp_path):
    reference = snapshot(small_run / "datastore")
    run = tmp_path / "run"
    shutil.copytree(small_run, run, ignore=shutil.ignore_patterns("datastore", "eval"))
    for point in ("datastore:1", "datastore:40", "datastore:78"):  # of 79 batches of 16 windows
        killed_at(point, ["datastore", "--out", run])
        # a killed build never leaves something that looks complete
        assert not (run / "datastore").exists() or (run / "datastore" / "meta.json").is_file()
    knnlm("datastore", "--out", run)
    got = snapshot(run / "datastore")
    ref_meta = {k: v for k, v in reference.items() if k != "meta.json"}
    assert {k: v for k, v in got.items() if k != "meta.json"} == ref_meta


@slow
@pytest.mark.guarantee("resumable")
def test_evaluation_killed_at_chosen_batches_ends_with_the_same_arrays(small_run, tmp_path):
    reference = snapshot(small_run / "eval" / "valid")
    run = tmp_path / "run"
    shutil.copytree(small_run, run, ignore=shutil.ignore_patterns("eval"))
    for point in ("evaluate:1", "evaluate:3"):  # of 8 batches of 16 windows (2,000 tokens, stride 16)
        killed_at(point, ["evaluate", "--out", run])
        assert not (run / "eval" / "valid").exists()  # nothing that looks complete
    knnlm("evaluate", "--out", run)
    got = snapshot(run / "eval" / "valid")
    timed = ("meta.json", "summary.json")  # these record stage times; everything else is byte-identical
    assert {k: v for k, v in got.items() if k not in timed} == {k: v for k, v in reference.items() if k not in timed}
    drop = lambda d: {k: v for k, v in d.items() if k not in ("seconds", "searched_queries")}  # noqa: E731
    for name in timed:
        a = json.loads((run / "eval" / "valid" / name).read_text())
        b = json.loads((small_run / "eval" / "valid" / name).read_text())
        assert drop(a) == drop(b), name


@slow
@pytest.mark.guarantee("resumable")
def test_analysis_killed_between_records_ends_with_the_same_files(small_run, tmp_path):
    args = ["analyze", small_run, "--labels", "ω=0", "--gmm-repeats", "1"]
    knnlm(*args, "--out", tmp_path / "ref")
    for point in ("analyze:1", "analyze:3"):
        killed_at(point, [*args, "--out", tmp_path / "killed"])
    knnlm(*args, "--out", tmp_path / "killed")
    assert snapshot(tmp_path / "killed") == snapshot(tmp_path / "ref")


# ---- the bad input matrix: one line, non-zero exit, nothing changed -------------------------------------------

def corpus(folder, train="a b c\n", valid="a b\n", test="c\n"):
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in (("train", train), ("valid", valid), ("test", test)):
        if text is not None:
            (folder / f"{name}.txt").write_bytes(text if isinstance(text, bytes) else text.encode())
    return folder


@pytest.mark.parametrize("case", ["missing", "empty_split", "not_utf8", "some_splits"])
@pytest.mark.guarantee("options")
def test_bad_data_folders(case, tmp_path, capsys):
    make = {"missing": lambda: tmp_path / "nope",
            "empty_split": lambda: corpus(tmp_path / "d", valid=""),
            "not_utf8": lambda: corpus(tmp_path / "d", train=b"caf\xe9 au lait\n"),
            "some_splits": lambda: corpus(tmp_path / "d", test=None)}
    data = make[case]()
    expect = {"missing": "data folder not found", "empty_split": "valid split is empty",
              "not_utf8": "not UTF-8", "some_splits": "only some splits"}[case]
    out = tmp_path / "out"
    assert expect in main_fails(capsys, "train", "--config", TINY, "--out", out, f"data.path={data}")
    assert not out.exists() or not any(out.iterdir())


@pytest.mark.parametrize("args,expect", [
    (["train.nonsense=1"], "unknown config key 'nonsense'"),
    (["train.epochs=many"], "train.epochs: expected a number"),
    (["train.batch_size=2.5"], "train.batch_size: expected an integer"),
    (["eval.temperature=0"], "eval.temperature"),
    (["eval.k=0"], "eval.k"),
    (["--omega", "-1"], "train.omega"),
])
@pytest.mark.guarantee("options")
def test_bad_config_values(args, expect, tmp_path, capsys):
    out = tmp_path / "out"
    assert expect in main_fails(capsys, "train", "--config", TINY, "--out", out, *args)
    assert not out.exists()


@pytest.mark.guarantee("options")
def test_unknown_key_in_config_file(tmp_path, capsys):
    cfg = tmp_path / "bad.toml"
    cfg.write_text(TINY.read_text() + "\n[extra]\nfoo = 1\n")
    assert "unknown config key 'extra'" in main_fails(capsys, "train", "--config", cfg, "--out", tmp_path / "o")


@slow
@pytest.mark.parametrize("args,expect", [
    (["--lmbda", "-0.1"], "--lmbda"), (["--lmbda", "1.01"], "--lmbda"),
    (["--k", "0"], "--k: expected k > 0"), (["--k", "10000000"], "larger than the datastore"),
    (["--temperature", "0"], "--temperature: expected a finite value > 0"), (["--temperature", "nan"], "--temperature"),
    (["eval.temperature=-1"], "eval.temperature"),
])
@pytest.mark.guarantee("options")
def test_bad_evaluation_options(args, expect, small_run):
    before = snapshot(small_run)
    fails(knnlm("evaluate", "--out", small_run, *args, check=False), expect)
    assert snapshot(small_run) == before


@slow
@pytest.mark.guarantee("damaged")
def test_truncated_keys_are_refused(small_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(small_run, run, ignore=shutil.ignore_patterns("eval"))
    keys = run / "datastore" / "keys.npy"
    with open(keys, "r+b") as f:
        f.truncate(keys.stat().st_size // 2)
    before = snapshot(run)
    fails(knnlm("evaluate", "--out", run, check=False), "keys.npy")
    assert snapshot(run) == before


@slow
@pytest.mark.guarantee("damaged")
def test_checkpoint_from_another_vocabulary(small_run, tmp_path):
    data = corpus(tmp_path / "other", train="x y z\n" * 50, valid="x y\n", test="z\n")
    before = snapshot(small_run)
    fails(knnlm("datastore", "--out", small_run, f"data.path={data}", check=False), "another vocabulary")
    assert snapshot(small_run) == before


@pytest.mark.guarantee("no-leftovers")
def test_unwritable_output_folder(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    assert "cannot" in main_fails(capsys, "train", "--config", TINY, "--out", blocker / "run")
    assert blocker.read_text() == "not a folder"


@slow
@pytest.mark.guarantee("no-leftovers")
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


@slow
@pytest.mark.wikitext
@pytest.mark.guarantee("no-leftovers")
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


@slow
@pytest.mark.guarantee("damaged")
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


@slow
@pytest.mark.parametrize("damage,expect", [
    ("datastore_meta", "no complete datastore"),
    ("eval_array", "disagrees with meta.json"),
    ("checkpoint_meta", "no complete checkpoint"),
])
@pytest.mark.guarantee("damaged")
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

"""Nothing lost, round two: every option is range-checked before a file is made, NaN never reaches a JSON file,
array digests catch files changed after they were written, one writer at a time per run folder, and damaged
artifacts are refused with one line. Refusals of bad options run in this process (fast); checks on a micro run
(a few seconds to build) are marked slow."""

import dataclasses
import json
import os
import pickle
import shutil
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from conftest import REPO, TINY, interrupt_training_at, knnlm, snapshot
from knnlm.artifacts import UserError, file_sha256, nan_to_null, write_json, writing_into
from knnlm.cli import main
from knnlm.config import Config, from_dict, load_config

slow = pytest.mark.slow

MICRO = ["data.max_train_tokens=5000", "data.max_eval_tokens=500", "train.epochs=1", "model.d_model=32",
         "model.d_ff=64", "eval.k_max=16", "eval.k=4,16"]


def refused(capsys, *args) -> str:
    """Run the command line in this process: exit status 2, one `knnlm: error:` line and no traceback."""
    code = main([str(a) for a in args])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and lines[-1].startswith("knnlm: error:") and "Traceback" not in err, (code, err)
    assert sum(line.startswith("knnlm: error:") for line in lines) == 1, err
    return lines[-1]


# ---------------------------------------------------------------------------------------------------------------
# 1. every option validated in one place, before anything is written

ISSUE_CASES = [  # (override, what the one line must say): the cases of the issue
    ("model.n_heads=0", "model.n_heads"), ("model.n_layers=0", "model.n_layers"),
    ("model.key_site=foo", "model.key_site"), ("model.dropout=1.5", "model.dropout"),
    ("model.d_model=-64", "model.d_model"), ("train.threads=-1", "train.threads"),
    ("train.epochs=inf", "train.epochs"), ("train.epochs=nan", "train.epochs"),
    ("datastore.stride=1000", "datastore.stride"), ("datastore.batch_size=0", "datastore.batch_size"),
    ("eval.k=", "eval.k"), ("eval.temperature=", "eval.temperature"), ("eval.temperature=nan", "eval.temperature"),
]
MORE_CASES = [
    ("model.n_heads=3", "model.n_heads"),  # does not divide d_model = 64
    ("model.d_ff=0", "model.d_ff"), ("model.context=1", "model.context"),
    ("model.attn_dropout=-0.1", "model.attn_dropout"), ("model.key_layer=2", "model.key_layer"),
    ("model.key_io=middle", "model.key_io"), ("model.div_factor=0", "model.div_factor"),
    ("model.cutoffs=5000,1000", "model.cutoffs"), ("train.batch_size=0", "train.batch_size"),
    ("train.epochs=-1", "train.epochs"), ("train.lr=0", "train.lr"), ("train.lr=inf", "train.lr"),
    ("train.grad_clip=0", "train.grad_clip"), ("train.regularizer=l3", "train.regularizer"),
    ("train.seed=-1", "train.seed"), ("train.checkpoint_every=0", "train.checkpoint_every"),
    ("train.omega=1e400", "train.omega"), ("train.min_lr_ratio=2", "train.min_lr_ratio"),
    ("train.queue_len=0", "train.queue_len"), ("train.momentum=1", "train.momentum"),
    ("data.max_train_tokens=-5", "data.max_train_tokens"), ("datastore.stride=-1", "datastore.stride"),
    ("eval.k_max=0", "eval.k_max"), ("eval.k=4,128", "eval.k"), ("eval.lmbda=", "eval.lmbda"),
    ("eval.lmbda=0.5,nan", "eval.lmbda"), ("eval.index=IVF 16", "eval.index"), ("eval.index=", "eval.index"),
    ("eval.nprobe=0", "eval.nprobe"), ("eval.splits=", "eval.splits"), ("eval.splits=train", "eval.splits"),
    ("model.n_layers=99999999999999999999", "model.n_layers"),
]


@pytest.mark.parametrize("override,key", ISSUE_CASES + MORE_CASES)
@pytest.mark.guarantee("options")
def test_bad_option_is_one_line_naming_it_and_nothing_is_created(override, key, tmp_path, capsys):
    out = tmp_path / "out"
    line = refused(capsys, "train", "--config", TINY, "--out", out, override)
    assert line.startswith(f"knnlm: error: {key}: expected ") and ", got " in line, line  # option, range, value
    assert not out.exists()


@pytest.mark.guarantee("options")
def test_the_line_says_what_was_expected():
    with pytest.raises(UserError) as e:
        load_config(TINY, ["model.dropout=1.5"])
    assert str(e.value) == "model.dropout: expected a probability in [0, 1), got 1.5"


@pytest.mark.guarantee("no-leftovers")
def test_a_failed_train_leaves_no_folder_behind(tmp_path, capsys):
    out = tmp_path / "new" / "run"  # neither folder exists: both were made for the run, both go again
    assert "data folder not found" in refused(capsys, "train", "--config", TINY, "--out", out,
                                              f"data.path={tmp_path / 'no-data'}")
    assert not (tmp_path / "new").exists()


# every key of the config dataclasses, a few that do not exist, and values of every kind
KEYS = [f"{s.name}.{f.name}" for s in dataclasses.fields(Config) for f in dataclasses.fields(getattr(Config(), s.name))]
VALUES = st.one_of(
    st.sampled_from(["", "nan", "-nan", "inf", "-inf", "1e400", "-1e400", "0", "-1", "1.5", "true", "foo", ",", "1,,2",
                     "nan,1", "[1]", "Flat", "IVF16,PQ8", "l2", "ffn_input", "valid,test", "=", " ", "0x10"]),
    st.integers(-3, 3).map(str),
    st.integers(-(2**70), 2**70).map(str),
    st.floats().map(repr),
    st.lists(st.one_of(st.integers(-10**6, 10**6), st.floats(), st.text(max_size=3)), max_size=4).map(
        lambda xs: ",".join(map(str, xs))),
    st.text(max_size=20),
)


@settings(max_examples=300, deadline=None)
@given(key=st.one_of(st.sampled_from(KEYS), st.text(max_size=12)), value=VALUES)
@pytest.mark.guarantee("options")
def test_any_override_is_accepted_or_refused_as_user_error(key, value):
    try:
        cfg = load_config(TINY, [f"{key}={value}"])
    except UserError as e:
        assert "\n" not in str(e)
        return
    json.dumps(cfg.to_dict(), allow_nan=False)  # what is accepted holds no nan/inf: it can be written as JSON


SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-3, 3), st.integers(-(2**80), 2**80), st.just(10**400),
                    st.sampled_from([float("nan"), float("inf"), -float("inf"), 0.0, 1.5]), st.floats(),
                    st.text(max_size=8))
JSON_VALUES = st.recursive(
    SCALARS, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=6)


@settings(max_examples=300, deadline=None)
@given(key=st.sampled_from(KEYS), value=JSON_VALUES)
@pytest.mark.guarantee("options")
def test_any_config_file_value_is_accepted_or_refused_as_user_error(key, value):
    section, name = key.split(".")  # a config.json or TOML table holding values of any JSON type
    try:
        cfg = from_dict({section: {name: value}})
    except UserError as e:
        assert "\n" not in str(e)
        return
    json.dumps(cfg.to_dict(), allow_nan=False)


@pytest.mark.parametrize("override", ["model.n_heads=0", *(pytest.param(o, marks=slow) for o in  # one in the fast suite
                                                               ("train.epochs=nan", "eval.k=", "model.key_site=foo"))])
@pytest.mark.guarantee("options")
def test_bad_option_through_the_real_command_line(override, tmp_path):
    out = tmp_path / "D"
    proc = knnlm("train", "--config", TINY, "--out", out, override, check=False)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("knnlm: error: "), proc.stderr
    assert override.split("=")[0] in lines[0] and not out.exists()


# ---------------------------------------------------------------------------------------------------------------
# 2. NaN never reaches a JSON file

@pytest.mark.guarantee("no-leftovers")
def test_write_json_refuses_nan_naming_the_file_and_place(tmp_path):
    path = tmp_path / "summary.json"
    path.write_text('{"old": 1}\n')
    with pytest.raises(UserError, match=r"summary\.json: refusing to write NaN \(at protocols\.tuned\[1\]\)"):
        write_json(path, {"protocols": {"tuned": [1.0, float("nan")]}})
    assert path.read_text() == '{"old": 1}\n' and [p.name for p in tmp_path.iterdir()] == ["summary.json"]
    write_json(path, {"ppl": float("inf")})  # a λ = 1 row of a tuning grid: infinite where p_kNN = 0
    assert json.loads(path.read_text()) == {"ppl": float("inf")}
    assert nan_to_null({"a": [float("nan"), 1.0], "b": (2, float("nan"))}) == {"a": [None, 1.0], "b": [2, None]}


# ---------------------------------------------------------------------------------------------------------------
# 5. one writer per run folder

@pytest.mark.guarantee("one-writer")
def test_second_writer_is_refused_by_another_process_and_changes_nothing(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "notes.txt").write_text("mine")
    with writing_into(run):
        before = snapshot(run)
        proc = knnlm("train", "--config", TINY, "--out", run, check=False)
        assert snapshot(run) == before
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and lines == [f"knnlm: error: {run} is in use by process {os.getpid()} "
                                              "(one command at a time writes into a run folder)"], proc.stderr
    assert (run / ".lock").read_text() == ""  # released: empty


@pytest.mark.guarantee("one-writer")
def test_lock_of_a_killed_holder_is_released_and_only_rank_0_takes_it(tmp_path, monkeypatch):
    run = tmp_path / "run"
    holder = ("import os, sys\nfrom knnlm.artifacts import writing_into\n"
              "held = writing_into(sys.argv[1])\nheld.__enter__()\nos.kill(os.getpid(), 9)\n")
    proc = subprocess.run([sys.executable, "-c", holder, str(run)], cwd=REPO)
    assert proc.returncode == -9 and (run / ".lock").read_text().strip().isdigit()  # its pid is still written
    with writing_into(run):  # ...but the OS released its lock
        assert (run / ".lock").read_text() == f"{os.getpid()}\n"
        monkeypatch.setenv("RANK", "1")  # another rank of the same torchrun job shares the folder
        with writing_into(run):
            pass
        monkeypatch.setenv("RANK", "0")
        with pytest.raises(UserError, match="is in use by process"):
            with writing_into(run):
                pass


# ---------------------------------------------------------------------------------------------------------------
# end to end on a micro run

@pytest.fixture(scope="module")
def micro_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("micro") / "run"
    knnlm("run", "--config", TINY, "--out", out, *MICRO)
    yield out
    shutil.rmtree(out.parent)  # module-scoped folders go with their module: CI's disk is not large


@pytest.fixture
def run(micro_run, tmp_path):
    """A private copy of the micro run, to damage."""
    copy = tmp_path / "run"
    shutil.copytree(micro_run, copy)
    return copy


def edit_json(path, change):
    record = json.loads(path.read_text())
    change(record)
    path.write_text(json.dumps(record))


@slow
@pytest.mark.parametrize("override", ["eval.temperature=", "eval.lmbda=", "eval.temperature=nan", "eval.k=0"])
@pytest.mark.guarantee("options")
def test_bad_grid_on_evaluate_leaves_the_tuning_untouched(override, run, capsys):
    before = snapshot(run)
    assert override.split("=")[0] in refused(capsys, "evaluate", "--out", run, override)
    assert snapshot(run) == before


@slow
@pytest.mark.parametrize("command", [["evaluate"], ["datastore"], ["run", "--config", TINY, *MICRO]])
@pytest.mark.guarantee("one-writer")
def test_commands_are_refused_while_another_writes_the_run(command, run, capsys):
    with writing_into(run):
        before = snapshot(run)
        assert f"{run} is in use by process {os.getpid()}" in refused(capsys, command[0], "--out", run, *command[1:])
        assert snapshot(run) == before


# 4. integrity digests

@slow
@pytest.mark.guarantee("digests")
def test_datastore_records_digests_and_verify_checks_every_array(run, capsys):
    meta = json.loads((run / "datastore" / "meta.json").read_text())
    # keys' digest is taken while writing: it must be the file's
    assert meta["sha256"] == {name: file_sha256(run / "datastore" / name) for name in ("keys.npy", "vals.npy")}
    assert main(["verify", "--out", str(run)]) == 0
    assert capsys.readouterr().out.startswith(f"OK: {run}: 8 files match")  # weights, keys, vals, 5 eval arrays
    keys = run / "datastore" / "keys.npy"
    data = bytearray(keys.read_bytes())
    data[-1] ^= 0x01  # one bit of the last key: same shape, other contents
    keys.write_bytes(bytes(data))
    line = refused(capsys, "verify", "--out", run)
    assert str(keys) in line and "digest" in line


@slow
@pytest.mark.guarantee("digests")
def test_shuffled_vals_are_refused_on_load(run, capsys):
    path = run / "datastore" / "vals.npy"
    vals = np.load(path)
    shuffled = np.random.default_rng(0).permutation(vals)
    assert not np.array_equal(shuffled, vals)
    np.save(path, shuffled)
    before = snapshot(run)
    line = refused(capsys, "evaluate", "--out", run)
    assert line == (f"knnlm: error: {path}: sha256 digest differs from the one meta.json recorded "
                    "(the file was changed or damaged after it was written)")
    assert snapshot(run) == before


@slow
@pytest.mark.guarantee("digests")
def test_datastore_without_digests_loads_as_before(run, capsys):
    edit_json(run / "datastore" / "meta.json", lambda m: (m.pop("sha256"), m.pop("format")))  # as knnlm < 0.2's
    assert main(["evaluate", "--out", str(run), "eval.k=4"]) == 0
    capsys.readouterr()
    assert main(["verify", "--out", str(run)]) == 0
    out = capsys.readouterr().out
    assert "6 files match" in out and "; datastore: no digests recorded" in out


# 6. damaged artifacts

@slow
@pytest.mark.parametrize("damage,expect", [
    (lambda m: m.pop("N"), "no 'N' entry"),
    (lambda m: m.update(N=[]), "'N' should be an integer, found []"),
    (lambda m: m.update(d="32"), "'d' should be an integer, found '32'"),
])
@pytest.mark.guarantee("damaged")
def test_damaged_datastore_meta_is_refused(damage, expect, run, capsys):
    edit_json(run / "datastore" / "meta.json", damage)
    before = snapshot(run)
    line = refused(capsys, "evaluate", "--out", run)
    assert str(run / "datastore" / "meta.json") in line and expect in line
    assert snapshot(run) == before


@slow
@pytest.mark.guarantee("damaged")
def test_evaluation_meta_without_tokens_is_refused(run):
    from knnlm.evaluate import tuning_arrays

    edit_json(run / "eval" / "valid" / "meta.json", lambda m: m.pop("tokens"))
    with pytest.raises(UserError, match=r"valid/meta\.json: no 'tokens' entry"):
        tuning_arrays(run, "valid")


@slow
@pytest.mark.parametrize("bad", [10**6, -2])
@pytest.mark.guarantee("damaged")
def test_neighbour_id_out_of_range_is_refused(bad, run, capsys):
    path = run / "eval" / "valid" / "neighbors.npy"
    ids = np.load(path)
    ids[3, 1] = bad
    np.save(path, ids)
    before = snapshot(run)
    line = refused(capsys, "evaluate", "--out", run)
    assert str(path) in line and f"neighbour id {bad} is outside" in line
    assert snapshot(run) == before


class Payload:
    """Unpickling it would create a file: proof that the optimizer file was never unpickled."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return open, (self.marker, "w")


@slow
@pytest.mark.guarantee("damaged")
def test_pickle_in_place_of_the_optimizer_is_refused_on_resume(run, tmp_path, capsys):
    ckpt = sorted((run / "checkpoints").glob("step_*"))[-1]
    marker = tmp_path / "executed"
    (ckpt / "optimizer.safetensors").write_bytes(pickle.dumps(Payload(str(marker))))
    before = snapshot(run)
    line = refused(capsys, "train", "--config", TINY, "--out", run, "--resume", *MICRO)
    assert str(ckpt / "optimizer.safetensors") in line and "not a safetensors file" in line
    assert not marker.exists() and snapshot(run) == before


# ---------------------------------------------------------------------------------------------------------------
# a full disk

@pytest.mark.slow
@pytest.mark.guarantee("no-leftovers")
def test_a_full_disk_during_the_datastore_is_one_line_and_keeps_the_old_datastore(run, capsys, monkeypatch):
    """posix_fallocate reserves the memory-mapped arrays' blocks before they are written: with no space left the
    build stops there with one line (not a SIGBUS on a page fault), removes its temporary folder and keeps the
    datastore that was there."""
    import errno

    before = snapshot(run / "datastore")

    def no_space(fd, offset, length):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "posix_fallocate", no_space)
    from conftest import main_fails

    line = main_fails(capsys, "datastore", "--out", run)
    assert "not enough disk space" in line and "bytes needed" in line and str(run) in line
    assert snapshot(run / "datastore") == before
    assert not (run / ".datastore.tmp").exists()


@pytest.mark.guarantee("no-leftovers")
def test_reserve_allocates_the_whole_file(tmp_path):
    from knnlm.artifacts import reserve

    path = tmp_path / "a.npy"
    np.lib.format.open_memmap(path, mode="w+", dtype=np.float16, shape=(4096, 64)).flush()
    reserve(path, "a test array")
    assert os.stat(path).st_blocks * 512 >= 4096 * 64 * 2


# ---------------------------------------------------------------------------------------------------------------
# Nothing lost, round three (issue 32)

@pytest.mark.guarantee("one-writer")
def test_lock_that_is_a_symlink_is_refused_and_its_target_untouched(tmp_path, capsys):
    """`ln -s FILE RUN/.lock` used to truncate FILE (and a dangling link created its target)."""
    run, victim = tmp_path / "run", tmp_path / "victim.txt"
    run.mkdir()
    victim.write_text("precious")
    (run / ".lock").symlink_to(victim)
    line = refused(capsys, "train", "--config", TINY, "--out", run)
    assert line == f"knnlm: error: {run / '.lock'}: is a symbolic link; expected the run's own lock file (remove the link)"
    assert victim.read_text() == "precious"
    (run / ".lock").unlink()
    (run / ".lock").symlink_to(tmp_path / "created")  # dangling
    assert ".lock: is a symbolic link" in refused(capsys, "train", "--config", TINY, "--out", run)
    assert not (tmp_path / "created").exists() and (run / ".lock").is_symlink()


@pytest.mark.guarantee("one-writer")
def test_lock_that_is_a_hard_link_or_a_folder_is_refused(tmp_path):
    run, victim = tmp_path / "run", tmp_path / "victim.txt"
    run.mkdir()
    victim.write_text("precious")
    os.link(victim, run / ".lock")
    with pytest.raises(UserError, match=r"\.lock: is a hard link to another file"):
        with writing_into(run):
            pass
    assert victim.read_text() == "precious"
    (run / ".lock").unlink()
    (run / ".lock").mkdir()
    with pytest.raises(UserError, match=r"\.lock: is a folder"):
        with writing_into(run):
            pass


@pytest.mark.guarantee("one-writer")
def test_lock_that_cannot_be_opened_still_keeps_a_second_writer_out(tmp_path, monkeypatch):
    """Another user's `.lock` (EACCES for read-write) used to be skipped: two writers ran at once. flock needs no
    write permission, so the file is locked read-only; a lock file that cannot be opened at all stops the writer."""
    run = tmp_path / "run"
    run.mkdir()
    real_open = os.open
    refuse = {"flags": os.O_RDWR}

    def open_as_another_user(path, flags, *args):
        if str(path).endswith(".lock") and flags & refuse["flags"] == refuse["flags"]:
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, flags, *args)

    with writing_into(run):  # the other user's command holds the lock
        monkeypatch.setattr(os, "open", open_as_another_user)
        with pytest.raises(UserError, match="is in use by process"):
            with writing_into(run):
                pass
        refuse["flags"] = 0  # not even readable
        with pytest.raises(UserError, match=r"\.lock: the run's lock cannot be taken \(Permission denied\)"):
            with writing_into(run):
                pass
        monkeypatch.setattr(os, "open", real_open)
    (run / ".lock").unlink()  # a folder where the lock cannot even be created cannot be written
    monkeypatch.setattr(os, "open", open_as_another_user)
    with pytest.raises(UserError, match="folder cannot be written"):
        with writing_into(run):
            pass
    with writing_into(run, read_only=True):  # ...which a command that writes nothing does not mind
        pass


@pytest.mark.parametrize("entry", ["eval", "datastore", "checkpoints", "config.json", "eval/valid"])
@pytest.mark.guarantee("one-writer")
def test_run_entries_that_are_symlinks_are_refused(entry, tmp_path):
    run, elsewhere = tmp_path / "run", tmp_path / "elsewhere"
    (run / entry).parent.mkdir(parents=True, exist_ok=True)
    elsewhere.mkdir()
    (elsewhere / "valid").mkdir()
    (elsewhere / "valid" / "summary.json").write_text("{}")
    (run / entry).symlink_to(elsewhere)
    before = snapshot(elsewhere)
    with pytest.raises(UserError, match=f"{run / entry}: is a symbolic link"):
        with writing_into(run):
            pass
    assert snapshot(elsewhere) == before


@pytest.mark.guarantee("one-writer")
def test_atomic_dir_never_replaces_a_link_and_clears_linked_leftovers(tmp_path):
    from knnlm.artifacts import atomic_dir

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "keep").write_text("keep")
    (tmp_path / "ds").symlink_to(elsewhere)
    with pytest.raises(UserError, match="ds: is a symbolic link"):
        with atomic_dir(tmp_path / "ds"):
            pass
    (tmp_path / "ds").unlink()
    (tmp_path / ".ds.old").symlink_to(elsewhere)  # what the old code left behind: rmtree refused it
    with atomic_dir(tmp_path / "ds") as tmp:
        (tmp / "new").write_text("new")
    assert (tmp_path / "ds" / "new").read_text() == "new" and not (tmp_path / ".ds.old").exists()
    assert snapshot(elsewhere) == {"keep": file_sha256(elsewhere / "keep")}


@pytest.mark.guarantee("one-writer")
def test_symlinked_eval_folder_is_refused_through_the_command_line(tmp_path, capsys):
    """`RUN/eval` → an outside folder: `knnlm evaluate` used to replace the outside `valid/`."""
    run, elsewhere = tmp_path / "run", tmp_path / "elsewhere"
    (elsewhere / "valid").mkdir(parents=True)
    (elsewhere / "valid" / "summary.json").write_text('{"mine": 1}')
    run.mkdir()
    (run / "eval").symlink_to(elsewhere)
    before = snapshot(elsewhere)
    line = refused(capsys, "evaluate", "--config", TINY, "--out", run)
    assert f"{run / 'eval'}: is a symbolic link (to {elsewhere})" in line
    assert snapshot(elsewhere) == before


@slow
@pytest.mark.guarantee("what-if")
def test_what_if_that_needs_a_new_search_is_refused_and_the_results_stay(run, capsys):
    """`--k` above the run's eval.k_max used to search again and replace eval/valid: summary.json, tuning.json and
    knn_logprobs.npy were gone. A what-if reads the saved search and writes nothing."""
    before = snapshot(run)
    line = refused(capsys, "evaluate", "--out", run, "--k", "128", "--lmbda", "0.25")
    assert f"{run / 'eval' / 'valid'} stores 16 neighbours per token, this what-if needs 128; raise eval.k_max" in line
    assert "without --k/--lmbda/--temperature" in line
    assert snapshot(run) == before and {"summary.json", "tuning.json", "knn_logprobs.npy"} <= set(
        p.name for p in (run / "eval" / "valid").iterdir())
    # no saved test search: refused too (it used to search test, and to tune and save valid on the what-if's grid)
    assert "holds no saved search" in refused(capsys, "evaluate", "--out", run, "--split", "test", "--k", "4")
    assert snapshot(run) == before
    assert main(["evaluate", "--out", str(run), "--k", "8", "--lmbda", "0.25", "--json"]) == 0  # a stored k: answered
    assert json.loads(capsys.readouterr().out)["k"] == 8 and snapshot(run) == before


@pytest.fixture(scope="module")
def tested_run(micro_run, tmp_path_factory):
    """A copy of the micro run with test evaluated too."""
    copy = tmp_path_factory.mktemp("tested") / "run"
    shutil.copytree(micro_run, copy)
    knnlm("evaluate", "--out", copy, "--split", "test")
    return copy


@slow
@pytest.mark.parametrize("field,value,expect", [
    ("temperature", -1, "protocols.tuned.temperature: expected a finite number > 0, found -1"),
    ("temperature", 0, "protocols.tuned.temperature: expected a finite number > 0, found 0"),
    ("lambda", 2, "protocols.tuned.lambda: expected a number in [0, 1], found 2"),
    ("k", "abc", "protocols.tuned.k: expected an integer in [1, 16]"),
    ("k", None, "protocols.tuned.k: expected an integer in [1, 16]"),
    ("k", 2.7, "protocols.tuned.k: expected an integer in [1, 16]"),
    ("k", 17, "protocols.tuned.k: expected an integer in [1, 16]"),
])
@pytest.mark.guarantee("damaged")
def test_hand_edited_valid_choice_is_refused_on_test(field, value, expect, tested_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(tested_run, run)
    (run / "eval" / "test" / "knn_logprobs.npy").unlink()  # a failed evaluation must not write it
    edit_json(run / "eval" / "valid" / "summary.json", lambda s: s["protocols"]["tuned"].update({field: value}))
    before = snapshot(run)
    line = refused(capsys, "evaluate", "--out", run, "--split", "test")
    assert line.startswith(f"knnlm: error: {run / 'eval' / 'valid' / 'summary.json'}: ") and expect in line, line
    assert snapshot(run) == before


EDITS = st.one_of(  # (file, path of keys, value): one hand edit of a summary or an evaluation meta
    st.tuples(st.just("eval/valid/summary.json"),
              st.tuples(st.just("protocols"), st.sampled_from(["tuned", "paper"]),
                        st.sampled_from(["k", "temperature", "lambda"])), JSON_VALUES),
    st.tuples(st.just("eval/valid/summary.json"), st.tuples(st.sampled_from(["protocols", "split"])), JSON_VALUES),
    st.tuples(st.just("eval/test/meta.json"),
              st.tuples(st.sampled_from(["k_max", "tokens", "inputs", "index", "model_sha256", "datastore_size",
                                         "rerank", "sha256", "seconds", "words"])), JSON_VALUES),
)


@slow
@settings(max_examples=40, deadline=None)
@given(edit=EDITS)
@pytest.mark.guarantee("damaged")
def test_any_hand_edit_of_a_summary_or_meta_is_used_or_refused_in_one_line(edit, tested_run):
    """`evaluate --split test` after any one edit of valid's summary.json or test's meta.json: it either succeeds with
    choices inside their ranges, or is refused with one line naming the edited file, changing nothing."""
    import contextlib
    import io
    import math
    import tempfile
    from pathlib import Path

    name, keys, value = edit
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "run"
        shutil.copytree(tested_run, run)

        def change(record):
            for key in keys[:-1]:
                record = record[key]
            record[keys[-1]] = value

        edit_json(run / name, change)
        before = snapshot(run)
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(["evaluate", "--out", str(run), "--split", "test", "--json"])
        lines = [line for line in err.getvalue().splitlines() if line.startswith("knnlm:")]
        if code == 0:
            summary = json.loads(out.getvalue())
            stored = np.load(run / "eval" / "test" / "neighbors.npy").shape[1]
            for p in summary["protocols"].values():
                assert isinstance(p["k"], int) and 1 <= p["k"] <= stored
                assert 0 < p["temperature"] < math.inf and 0 <= p["lambda"] <= 1
            assert math.isfinite(summary["knnlm_ppl"])
        else:
            assert code == 2 and len(lines) == 1 and str(run / name) in lines[0], (code, err.getvalue())
            assert "Traceback" not in err.getvalue() and snapshot(run) == before


@slow
@pytest.mark.guarantee("damaged")
def test_deleted_config_json_does_not_bypass_the_changed_training_guard(run, capsys):
    """The checkpoint's meta.json holds the config it was trained with: it answers when config.json is gone."""
    (run / "config.json").unlink()
    before = snapshot(run)
    line = refused(capsys, "run", "--config", TINY, "--out", run, *MICRO, "model.dropout=0.1")
    recorded = json.loads(sorted((run / "checkpoints").glob("step_*"))[-1].joinpath("meta.json").read_text())
    assert f"model.dropout: {recorded['config']['model']['dropout']!r} → 0.1" in line and "meta.json records" in line
    assert snapshot(run) == before
    assert main(["run", "--config", str(TINY), "--out", str(run), *MICRO]) == 0  # its own settings: reused


SAVE_ONE_MODEL = """
import sys, torch
from knnlm.checkpoint import save_checkpoint
from knnlm.config import load_config
from knnlm.models import build_model
cfg = load_config(sys.argv[2], ["model.d_model=32", "model.d_ff=64", "model.cutoffs=20,100"])
torch.manual_seed(0)
model = build_model(cfg.model, 300)
opt = torch.optim.AdamW(model.parameters())
print(save_checkpoint(sys.argv[1], 1, model, opt, torch.nn.Module(), {}, cfg, "v"))
"""


@pytest.mark.guarantee("digests")
def test_model_digest_depends_on_the_weights_only(tmp_path):
    """One model saved by processes with different PYTHONHASHSEEDs used to give one digest each: the tied weights'
    metadata came out in another order every time."""
    from knnlm.checkpoint import load_model

    digests = set()
    seeds = ("0", "1", "2")
    procs = [subprocess.Popen([sys.executable, "-c", SAVE_ONE_MODEL, str(tmp_path / f"run{seed}"), str(TINY)],
                              cwd=REPO, env={**os.environ, "PYTHONHASHSEED": seed}) for seed in seeds]  # side by side
    assert [proc.wait() for proc in procs] == [0, 0, 0]
    for seed in seeds:
        ckpt = tmp_path / f"run{seed}" / "checkpoints" / "step_00000001"
        meta = json.loads((ckpt / "meta.json").read_text())
        assert meta["model_sha256"] == file_sha256(ckpt / "model.safetensors")
        digests.add(meta["model_sha256"])
    assert len(digests) == 1
    import torch
    from knnlm.models import build_model

    model, cfg, _ = load_model(tmp_path / "run0")  # the file still loads into the model, tied weights and all
    torch.manual_seed(0)
    reference = build_model(cfg.model, 300).state_dict()
    assert reference.keys() == model.state_dict().keys()
    assert all(torch.equal(reference[k], v) for k, v in model.state_dict().items())


@slow
@pytest.mark.guarantee("digests")
def test_datastore_meta_without_digests_is_refused_unless_it_is_of_the_old_format(run, capsys):
    """Deleting `sha256` from meta.json used to turn the vals check off; datastores now record `"format": 2`."""
    assert json.loads((run / "datastore" / "meta.json").read_text())["format"] == 2
    edit_json(run / "datastore" / "meta.json", lambda m: m.pop("sha256"))
    before = snapshot(run)
    line = refused(capsys, "evaluate", "--out", run)
    assert str(run / "datastore" / "meta.json") in line and "no sha256 digest of keys.npy and vals.npy" in line
    assert "no sha256 digest" in refused(capsys, "verify", "--out", run)
    assert snapshot(run) == before
    edit_json(run / "datastore" / "meta.json", lambda m: m.update(format=3, sha256={}))
    assert "'format' should be 2" in refused(capsys, "verify", "--out", run)


@slow
@pytest.mark.parametrize("folder,change,expect", [
    ("datastore", lambda m: m.update(N=m["N"] - 1), "keys.npy: expected float16 keys of shape"),
    ("eval/valid", lambda m: m.update(tokens=m["tokens"] + 1), "disagrees with meta.json"),
    ("eval/valid", lambda m: m.update(k_max=8), "disagrees with meta.json"),
])
@pytest.mark.guarantee("digests")
def test_verify_checks_the_arrays_shapes_against_meta(folder, change, expect, run, capsys):
    """`verify` used to say OK when meta.json's N disagreed with the arrays (the digests still matched)."""
    edit_json(run / folder / "meta.json", change)
    line = refused(capsys, "verify", "--out", run)
    assert str(run / folder) in line and expect in line


@slow
@pytest.mark.guarantee("options")
def test_score_and_generate_refuse_bad_input_in_one_line(run, tmp_path, capsys):
    """Each of these used to end in a traceback (or exit 1, or score an empty file as one token)."""
    text = tmp_path / "text.txt"
    text.write_text("the cat\n")
    assert "expected a seed in [0, 2^64)" in refused(capsys, "generate", "--out", run, "--seed", 10**23)
    assert "finite sampling temperature" in refused(capsys, "generate", "--out", run, "--lmbda", "1",
                                                     "--sample-temperature", "inf")
    assert f"{tmp_path / 'gone.txt'}: cannot read" in refused(capsys, "score", "--out", run, tmp_path / "gone.txt")
    assert f"{tmp_path}: cannot read" in refused(capsys, "score", "--out", run, tmp_path)
    (tmp_path / "empty.txt").write_text("")
    assert "empty.txt: the file is empty" in refused(capsys, "score", "--out", run, tmp_path / "empty.txt")
    summary = run / "eval" / "valid" / "summary.json"
    kept = summary.read_text()
    edit_json(summary, lambda s: s["protocols"]["tuned"].update(k="abc"))
    line = refused(capsys, "score", "--out", run, text)
    assert str(summary) in line and "protocols.tuned.k: expected an integer" in line
    summary.write_text(kept)
    # a token id beyond the vocabulary, with the digest recomputed: the digest cannot catch it, the range check does
    vals_path = run / "datastore" / "vals.npy"
    vals = np.load(vals_path)
    vals[7] = 10**6
    np.save(vals_path, vals)
    edit_json(run / "datastore" / "meta.json", lambda m: m["sha256"].update({"vals.npy": file_sha256(vals_path)}))
    line = refused(capsys, "generate", "--out", run, "--max-tokens", "2")
    assert str(vals_path) in line and "token id 1000000 is outside the model's vocabulary" in line


@slow
@pytest.mark.guarantee("options")
def test_a_tiny_sampling_temperature_samples_the_most_likely_token(run, capsys):
    """--sample-temperature 1e-310 divided the log-probabilities into −inf everywhere (a NaN softmax); sampling at a
    temperature that small is greedy decoding."""
    assert main(["generate", "--out", str(run), "--prompt", "the", "--max-tokens", "5", "--greedy"]) == 0
    greedy = capsys.readouterr().out
    assert main(["generate", "--out", str(run), "--prompt", "the", "--max-tokens", "5", "--seed", "3",
                 "--sample-temperature", "1e-310"]) == 0
    assert capsys.readouterr().out == greedy


@slow
@pytest.mark.guarantee("resumable")
def test_sigterm_is_handled_like_ctrl_c_and_leaves_no_temporary_folder(run):
    """A SIGTERM (a scheduler's stop) used to kill the datastore build outright, leaving `.datastore.tmp`."""
    before = snapshot(run / "datastore")
    env = {**os.environ, "TQDM_DISABLE": "1", "KNNLM_KILL_AT": "datastore:1:TERM"}
    proc = subprocess.run([sys.executable, "-m", "knnlm.cli", "datastore", "--out", str(run)], capture_output=True,
                          text=True, cwd=REPO, env=env)
    lines = [line[line.index("knnlm:"):] for line in proc.stderr.splitlines() if "knnlm:" in line]  # after a bar
    assert proc.returncode == 143 and lines == ["knnlm: terminated; rerun the same command to continue"], proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (run / ".datastore.tmp").exists() and snapshot(run / "datastore") == before
    assert (run / ".lock").read_text() == ""  # released


@slow
@pytest.mark.guarantee("resumable")
def test_interrupted_training_says_to_rerun_with_resume(tmp_path, monkeypatch, capsys):
    """`knnlm train` refuses to rerun into a run that holds a checkpoint without --resume: the message says so."""
    interrupt_training_at(monkeypatch, 3)
    out = tmp_path / "run"
    assert main(["train", "--config", str(TINY), "--out", str(out), *MICRO, "train.checkpoint_every=2"]) == 130
    err = capsys.readouterr().err
    assert [line[line.index("knnlm:"):] for line in err.splitlines() if "knnlm:" in line] == \
        ["knnlm: interrupted; rerun it with --resume to continue"], err  # (after a progress bar)
    monkeypatch.undo()
    assert main(["train", "--config", str(TINY), "--out", str(out), "--resume", *MICRO,
                 "train.checkpoint_every=2"]) == 0


@slow
@pytest.mark.guarantee("what-if")
def test_k_max_larger_than_the_training_split_is_refused_before_training(tmp_path, capsys):
    out = tmp_path / "run"
    line = refused(capsys, "run", "--config", TINY, "--out", out, "data.max_train_tokens=4")
    assert line == ("knnlm: error: eval.k_max: 64 is larger than the datastore will be (4 keys, one per training "
                    "token); expected at most 4")
    assert not out.exists()


@slow
@pytest.mark.guarantee("what-if")
def test_read_only_run_is_refused_before_the_search(run, capsys, monkeypatch):
    """A run folder that cannot be written used to fail at the end of a full search, naming a temporary file."""
    import tempfile

    import knnlm.evaluate

    shutil.rmtree(run / "eval" / "valid")  # a full search would be needed
    real = tempfile.mkstemp

    def read_only(*args, dir=None, **kwargs):
        if dir is not None and str(dir).startswith(str(run)):
            raise PermissionError(13, "Permission denied")
        return real(*args, dir=dir, **kwargs)

    def no_search(*args, **kwargs):
        raise AssertionError("searched")

    monkeypatch.setattr(tempfile, "mkstemp", read_only)
    monkeypatch.setattr(knnlm.evaluate, "search_all", no_search)
    before = snapshot(run)
    assert refused(capsys, "evaluate", "--out", run) == \
        f"knnlm: error: --out {run}: folder cannot be written (Permission denied)"
    assert refused(capsys, "datastore", "--out", run) == \
        f"knnlm: error: --out {run}: folder cannot be written (Permission denied)"
    assert snapshot(run) == before


def _write_store(folder, value: int) -> None:
    """A small complete datastore whose every key and value is `value` (so a half-swapped read would mix two)."""
    from knnlm.artifacts import atomic_dir, file_sha256, write_json

    with atomic_dir(folder) as tmp:
        np.save(tmp / "keys.npy", np.full((64, 4), value, dtype=np.float16))
        np.save(tmp / "vals.npy", np.full(64, value, dtype=np.int32))
        write_json(tmp / "meta.json", {"N": 64, "d": 4, "model_sha256": f"m{value}", "key_site": "ffn_input",
                                       "key_layer": -1, "checkpoint": "c", "format": 2,
                                       "sha256": {n: file_sha256(tmp / n) for n in ("keys.npy", "vals.npy")},
                                       "value": value})


@slow  # a stress test: 3,000 opens against a writer
@pytest.mark.guarantee("readers")
def test_readers_never_see_a_datastore_half_swapped(tmp_path):
    """Issue 32, case 9: a writer replaces the datastore again and again while another process opens it 3,000 times;
    every open succeeds and sees one version whole (meta, keys and values of the same write)."""
    import multiprocessing

    from knnlm.datastore import Datastore

    folder = tmp_path / "run" / "datastore"
    folder.parent.mkdir()
    _write_store(folder, 1)
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(1) as pool:
        reading = pool.apply_async(_open_many, (str(folder), 3000))
        writes = 0
        while not reading.ready():  # until the reader is done (it starts a few seconds late: a new interpreter)
            _write_store(folder, 2 + writes % 50)
            writes += 1
        failures = reading.get(timeout=600)
    assert writes >= 300 and failures == [], (writes, failures[:5])
    assert Datastore(folder).meta["value"] == 2 + (writes - 1) % 50


def _open_many(folder: str, n: int) -> list[str]:
    from knnlm.datastore import Datastore

    failures = []
    for _ in range(n):
        try:
            ds = Datastore(folder)
            v = ds.meta["value"]
            if not ((ds.keys == v).all() and (ds.vals == v).all() and ds.meta["model_sha256"] == f"m{v}"):
                failures.append(f"mixed versions: meta {v}, keys {ds.keys[0, 0]}, vals {ds.vals[0]}")
        except Exception as e:  # noqa: BLE001 - any failure to open is what this test counts
            failures.append(f"{type(e).__name__}: {e}")
    return failures

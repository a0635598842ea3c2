"""Shared fixtures: a tiny run trained once per test session (the README pipeline on configs/tiny.toml).

`pytest -n 2` runs the fast unit tests (under a minute on 2 cores); tests marked `slow` (end to end: full runs,
torchrun, fine-tunes, killed jobs, large indexes; every user of `tiny_run`) run with `--runslow`, as CI does."""

import hashlib
import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from knnlm.data import default_data_dir

REPO = Path(__file__).resolve().parent.parent
TINY = REPO / "configs" / "tiny.toml"


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", help="run tests marked slow")


# fixtures that train on WikiText-2; tests that read it otherwise carry @pytest.mark.wikitext
WIKITEXT_FIXTURES = {"tiny_run", "small_run", "micro_run", "study", "corpus_dir"}


def engine_studies() -> list[Path]:
    """The study files of the sweep engine: experiments/*.toml with a `stages` key (the distillation study has its
    own script and none; the word in a comment does not count)."""
    return sorted(p for p in (REPO / "experiments").glob("*.toml") if "stages" in tomllib.loads(p.read_text()))


def have_wikitext() -> bool:
    folder = default_data_dir()
    return all((folder / f"wiki.{s}.tokens").is_file() for s in ("train", "valid", "test"))


GUARANTEES = pytest.StashKey[dict]()  # the whole suite's count of tests per safety guarantee, when it is collected


@pytest.hookimpl(tryfirst=True)  # before -k/-m deselect anything
def pytest_collection_modifyitems(config, items):
    counts = {}  # tests/test_docs.py: how many tests show each safety guarantee
    for item in items:
        for mark in item.iter_markers("guarantee"):
            counts[mark.args[0]] = counts.get(mark.args[0], 0) + 1
    if os.environ.get("KNNLM_COUNT_GUARANTEES"):
        Path(os.environ["KNNLM_COUNT_GUARANTEES"]).write_text(json.dumps(counts))
    if not config.option.file_or_dir:  # `pytest` with no paths: the whole of testpaths was collected
        config.stash[GUARANTEES] = counts
    for item in items:  # the tiny run takes minutes: whatever uses it is end to end
        if "tiny_run" in getattr(item, "fixturenames", ()) and "slow" not in item.keywords:
            raise pytest.UsageError(f"{item.nodeid} uses the tiny_run fixture: mark it @pytest.mark.slow")
    if not have_wikitext():  # a clone outside this workspace: say how to get the data instead of failing
        no_data = pytest.mark.skip(reason=f"WikiText-2 not found at {default_data_dir()}: run `knnlm data wikitext-2 "
                                          f"--dest DIR` and `export KNNLM_DATA=DIR`")
        for item in items:
            if "wikitext" in item.keywords or WIKITEXT_FIXTURES & set(getattr(item, "fixturenames", ())):
                item.add_marker(no_data)
    if config.getoption("--runslow"):
        return
    skip = pytest.mark.skip(reason="slow: pass --runslow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    os.environ["KNNLM_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    yield


def knnlm(*args, check=True, cwd=None):
    """Run the command-line tool in a subprocess, as a user would."""
    proc = subprocess.run([sys.executable, "-m", "knnlm.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd or REPO, env={**os.environ, "TQDM_DISABLE": "1"})
    if check and proc.returncode != 0:
        raise AssertionError(f"knnlm {' '.join(map(str, args))} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """A tiny model trained, its datastore built and valid evaluated: the README's pipeline, once."""
    out = tmp_path_factory.mktemp("tiny") / "run"
    proc = knnlm("run", "--config", TINY, "--out", out)
    return out, proc.stdout


def main_fails(capsys, *args):
    """Run the command line in this process (no start-up cost, for input refused before any work); it must exit
    non-zero with one `knnlm: error:` line on stderr, which is returned."""
    from knnlm.cli import main

    code = main([str(a) for a in args])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code != 0 and len(lines) == 1 and lines[0].startswith("knnlm: error:"), (code, lines)
    return lines[0]


def snapshot(folder):
    """SHA-256 of every file below a folder, to show that a failed command changed nothing."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def fails(proc, *fragments):
    """A non-zero exit whose last stderr line is the one `knnlm: error:` line (progress bars may precede it),
    containing each fragment, and no traceback."""
    assert proc.returncode != 0, proc.stdout
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith("knnlm: error:") and "Traceback" not in proc.stderr, proc.stderr
    assert sum(line.startswith("knnlm: error:") for line in lines) == 1
    for f in fragments:
        assert f in lines[-1], lines[-1]


def interrupt_training_at(monkeypatch, step: int) -> None:
    """Make `knnlm train` raise KeyboardInterrupt (as Ctrl-C would) when it reaches optimizer step `step`."""
    import knnlm.train

    lr_at = knnlm.train.lr_at

    def stop(s, total, cfg):
        if s == step:
            raise KeyboardInterrupt
        return lr_at(s, total, cfg)

    monkeypatch.setattr(knnlm.train, "lr_at", stop)

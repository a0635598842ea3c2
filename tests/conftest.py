"""Shared fixtures: a tiny run trained once per test session (the README pipeline on configs/tiny.toml)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
TINY = REPO / "configs" / "tiny.toml"


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", help="run tests marked slow")


def pytest_collection_modifyitems(config, items):
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

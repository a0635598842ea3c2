"""Every committed study's tables and figures are what `knnlm sweep STUDY --tables-only` writes from its committed
records: the Markdown and JSON byte for byte, and the same set of figures (PNG bytes vary with matplotlib).

A study here is an experiments/*.toml with `stages` whose results/<study>/runs/ holds records. The rescaling control
alone reads more than the records (the ω = 0 runs' saved neighbours, gone with their machines): its committed
rescale.json is given as the cache it is, and must come back unchanged, i.e. computed from these same records.

Run: `python -m pytest -q tests/test_committed_studies.py` (no training; a few seconds a study).
"""

import shutil
from pathlib import Path

import pytest

from conftest import REPO
from knnlm.studies.engine import run_sweep

STUDIES = sorted(p.stem for p in (REPO / "experiments").glob("*.toml")
                 if "stages" in p.read_text() and any((REPO / "results" / p.stem / "runs").glob("*.json")))
CACHES = ("rescale.json",)  # computed from run folders, kept while the records they came from are unchanged


def test_every_study_with_records_is_checked():
    assert {"omega_study", "key_site_study", "objectives_study", "overfit_study"} <= set(STUDIES)


@pytest.mark.parametrize("name", STUDIES)
def test_tables_only_rewrites_the_committed_tables_and_figures(name, tmp_path):
    committed = REPO / "results" / name
    results = tmp_path / name
    shutil.copytree(committed / "runs", results / "runs")
    for cache in CACHES:
        if (committed / cache).is_file():
            shutil.copy(committed / cache, results / cache)
    run_sweep(REPO / "experiments" / f"{name}.toml", tmp_path / "no-run-folders", results=str(results),
              tables_only=True)
    written = {p.name for p in results.iterdir() if p.is_file()}
    assert written == {p.name for p in committed.iterdir() if p.is_file()}
    for file in sorted(written):
        if not file.endswith(".png"):
            assert (results / file).read_bytes() == (committed / file).read_bytes(), f"{name}/{file}"
    assert not (tmp_path / "no-run-folders").exists()  # nothing was trained or evaluated

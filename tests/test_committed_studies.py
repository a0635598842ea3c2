"""Every committed study's tables and figures are what `knnlm sweep STUDY --tables-only` writes from its committed
records: the Markdown byte for byte, the JSON's numbers to 1e-9 (a fit's last digits vary with the CPU's BLAS: an
Intel AMX machine's slope differs from a Zen 3's in the 16th digit), and the same set of figures (PNG bytes vary
with matplotlib).

A study here is an experiments/*.toml with `stages` whose results/<study>/runs/ holds records. The rescaling control
alone reads more than the records (the ω = 0 runs' saved neighbours, gone with their machines): its committed
rescale.json is given as the cache it is, and must come back unchanged, i.e. computed from these same records.

Run: `python -m pytest -q tests/test_committed_studies.py` (no training; a few seconds a study).
"""

import json
import math
import shutil
from pathlib import Path

import pytest

from conftest import REPO, engine_studies
from knnlm.studies.engine import run_sweep

STUDIES = [p.stem for p in engine_studies() if any((REPO / "results" / p.stem / "runs").glob("*.json"))]
CACHES = ("rescale.json",)  # computed from run folders, kept while the records they came from are unchanged


def test_every_study_with_records_is_checked():
    assert {"omega_study", "key_site_study", "objectives_study", "overfit_study"} <= set(STUDIES)


def same(a, b, rel: float = 1e-9) -> bool:
    """Equal JSON values, floats to `rel` (booleans, ints, strings, keys and structure exactly)."""
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, float) or isinstance(b, float):
        return isinstance(a, (int, float)) and isinstance(b, (int, float)) and math.isclose(a, b, rel_tol=rel, abs_tol=1e-12)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k], rel) for k in a)
    if isinstance(a, list):
        return isinstance(b, list) and len(a) == len(b) and all(same(x, y, rel) for x, y in zip(a, b))
    return a == b


def test_same_tells_json_apart_only_beyond_its_tolerance():
    assert same({"s": 1.0722839835378999, "n": [1, "a"]}, {"s": 1.0722839835379, "n": [1, "a"]})
    assert not same({"s": 1.07}, {"s": 1.0700001}) and not same({"n": [1, 2]}, {"n": [1]}) and not same(1, "1")
    assert not same({"a": 1}, {"b": 1}) and not same(True, 1.0)


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
        if file.endswith(".json"):
            assert same(json.loads((results / file).read_text()), json.loads((committed / file).read_text())), \
                f"{name}/{file}"
        elif not file.endswith(".png"):
            assert (results / file).read_bytes() == (committed / file).read_bytes(), f"{name}/{file}"
    assert not (tmp_path / "no-run-folders").exists()  # nothing was trained or evaluated

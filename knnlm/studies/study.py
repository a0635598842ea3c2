"""A study file (TOML under experiments/): the base config, the grid, and the stages that make its tables.

    base = "../configs/wikitext-2.toml"       # relative to the study file
    overrides = ["train.epochs=6"]
    regularizer = "l2"                        # the grid's regularizer (default: the base config's)
    omegas = [0.0, 1e-4, 1e-3]
    seeds = [0, 1, 2]
    stages = ["table", "paired", "test"]      # knnlm/studies/stages/, in this order
    [compare]                                 # a stage's own settings: a table named after it
    regularizer = "moco"

The study runs one model per (ω, seed) of the grid, then each stage in turn (a stage may train more runs and
writes its own tables and figures from the records).
"""

from __future__ import annotations

import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from ..artifacts import UserError
from ..config import REGULARIZERS, load_config


@dataclass
class Study:
    base: str
    omegas: list[float]
    seeds: list[int]
    overrides: list[str] = field(default_factory=list)
    regularizer: str = ""  # the grid's train.regularizer ("": the base config's)
    results: str = ""  # where the committed numbers go (default results/<study name>)
    title: str = "WikiText-2"  # what the tables and figures say the study is about
    stages: list[str] = field(default_factory=list)
    options: dict[str, dict] = field(default_factory=dict)  # stage name -> its table of the study file
    folder: str = "."  # the study file's folder: paths in the study are relative to it


def _number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _strings(x) -> bool:
    return isinstance(x, list) and all(isinstance(v, str) for v in x)


# each study key: what it must be, and the check
_STUDY_TYPES = [
    ("base", "a config file path", lambda x: isinstance(x, str) and x != ""),
    ("omegas", "a non-empty list of numbers >= 0", lambda x: isinstance(x, list) and x != [] and all(_number(v) and v >= 0 for v in x)),
    ("seeds", "a non-empty list of integers >= 0", lambda x: isinstance(x, list) and x != [] and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in x)),
    ("overrides", "a list of section.key=value strings", _strings),
    ("regularizer", f"one of {', '.join(REGULARIZERS)}", lambda x: x in REGULARIZERS),
    ("results", "a folder path", lambda x: isinstance(x, str)),
    ("title", "a string", lambda x: isinstance(x, str)),
    ("stages", "a list of stage names", _strings),
]
_KEYS = {key for key, _, _ in _STUDY_TYPES}


def load_study(path: Path) -> Study:
    """The study of a TOML file, its keys type-checked; a stage's table is kept as that stage's options (the stage
    checks them when it is made)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: study file not found")
    try:
        raw = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"{path}: not a valid TOML study ({e})") from None
    stages = raw.get("stages", [])
    options = {k: v for k, v in raw.items() if k not in _KEYS and isinstance(v, dict) and k in stages}
    if unknown := set(raw) - _KEYS - set(options):
        raise UserError(f"{path}: unknown study key(s) {sorted(unknown)} (expected {sorted(_KEYS)}, or a table "
                        "named after one of its stages)")
    for key, expect, ok in _STUDY_TYPES:
        if key in raw and not ok(raw[key]):
            raise UserError(f"{path}: {key}: expected {expect}, got {raw[key]!r}")
    if "base" not in raw or "omegas" not in raw or "seeds" not in raw:
        raise UserError(f"{path}: a study needs base, omegas and seeds")
    study = Study(**{k: v for k, v in raw.items() if k in _KEYS}, options=options, folder=str(path.resolve().parent))
    study.base = str((path.parent / study.base).resolve())
    if not study.regularizer:
        study.regularizer = load_config(study.base, study.overrides).train.regularizer
    return study

"""The stages a study file can name (`stages = [...]`), by name. A new stage is a `Stage` subclass in a file of
this folder (knnlm/studies/stages/base.py says what a stage is) and one entry below."""

from __future__ import annotations

from ...artifacts import UserError
from ..study import Study
from .base import Stage, StudyRun
from .compare import Compare
from .held_out import HeldOut
from .k_depth import KDepth
from .more_seeds import MoreSeeds
from .objectives import Objectives
from .paired import Paired
from .rescale import Rescale
from .table import Table
from .test import Test

STAGES: dict[str, type[Stage]] = {s.name: s for s in (Table, Paired, Test, HeldOut, Rescale, Compare, Objectives, KDepth, MoreSeeds)}

__all__ = ["STAGES", "Stage", "StudyRun", "make_stages"]


def make_stages(study: Study) -> list[Stage]:
    """The study's stages in its order, each made with its options (the study file's table named after it)."""
    stages = []
    for name in study.stages:
        if name not in STAGES:
            raise UserError(f"stages: unknown stage {name!r} (expected one of {', '.join(STAGES)})")
        try:
            stages.append(STAGES[name](study, **study.options.get(name, {})))
        except TypeError as e:  # an option the stage does not take
            raise UserError(f"[{name}]: {e}") from None
    return stages

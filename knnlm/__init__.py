"""knnlm: train language models with kNN in mind and evaluate them as kNN-LMs.

Pipeline, in the order data flows: data → model → regularizers → train → datastore → search / knn → evaluate →
sweep → analysis / plots, with `cli` on top. From Python, `knnlm.load(RUN)` gives a finished run's kNN-LM (`knnlm.api`).
"""

from .artifacts import UserError  # bad input (an option, a file): one line naming it and what was expected

__version__ = "0.1.0"
__all__ = ["KNNLM", "UserError", "load", "__version__"]


def __getattr__(name: str):
    # `knnlm.load` and `knnlm.KNNLM` import torch on first use only, so `knnlm --help` and config errors stay quick
    if name in ("load", "KNNLM"):
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'knnlm' has no attribute {name!r}")

"""Distillation (training side): carry the datastore's knowledge into weights: kNN targets of the training set, the KL loss toward them, and a
memory model interpolated with the base LM at test time (no retrieval at inference).

    knnlm targets --out BASE                    # BASE/targets: p_kNN of every training position, its own entry left out
    knnlm train --config C --out DISTIL train.distil_targets=BASE/targets train.beta=1        # CE + β·KL, from scratch
    knnlm train --config C --out MEM train.distil_targets=BASE/targets train.ce_weight=0 train.beta=1 \\
                train.init_from=BASE            # a memory model: KL alone, started from the base LM
    knnlm evaluate --out BASE --memory MEM      # LM + memory model, with and without the kNN on top

Targets (after Memory Decoder, Cao et al. 2025). Training position i of the datastore (its key r_i, next token v_i)
is searched against the whole datastore for its k nearest keys; its own row is dropped (`distill.exclude = "self"`),
or every row within `model.context` positions of it (`"window"`: the rows whose text overlaps i's context, to measure
leakage from overlapping text). p_kNN(w) = Σ_{j: v_j = w} softmax(−d_j / T) over the k kept neighbours, T the base
run's tuned temperature on valid at that k (or `distill.temperature`). Each position keeps its `distill.top` most
probable words and their probabilities; the rest of the mass is one number, `rest`. Arrays (N = training tokens,
m = top), memory-mapped, with meta.json and digests like the datastore's:

    words.npy (N, m) int32, −1 where fewer words carry mass    probs.npy (N, m) float32    rest.npy (N,) float32

The KL term compares the two distributions over the partition {top words of i, every other word}: exact when the
rest of p_kNN is spread like p_LM's over the other words, and never more than the full KL:
    KL_i = Σ_{w ∈ top_i} p(w) log(p(w) / q(w)) + rest_i log(rest_i / q(rest_i)),  q(rest_i) = 1 − Σ_{w ∈ top_i} q(w).

`knnlm.targets` builds the targets; `knnlm.evaluate.evaluate_memory` evaluates a memory model beside its base.
A build is resumable: rows are written in order into `.targets.partial/` and `progress.json` records how far they
are complete (after each batch's arrays are flushed); a rerun of the same command continues from there, and a rerun
with other settings starts over.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from .artifacts import UserError, load_npy, read_meta, swapping, verify_digests

ARRAYS = {"words": np.int32, "probs": np.float32, "rest": np.float32}  # the targets folder's arrays


class Targets:
    """A complete targets folder: memory-mapped words (N, m), probs (N, m), rest (N,), checked against meta.json."""

    FIELDS = {"N": int, "top": int, "k": int, "temperature": float, "model_sha256": str, "vocab_hash": str}

    def __init__(self, folder: str | Path, verify: bool = True):
        self.folder = Path(folder)
        with swapping(self.folder, exclusive=False):  # a rebuild's swap waits until meta and arrays are open
            self.meta = read_meta(self.folder, "kNN targets", self.FIELDS)
            if verify:
                verify_digests(self.folder, self.meta)
            self.arrays = {name: load_npy(self.folder / f"{name}.npy", mmap=True) for name in ARRAYS}
        N, m = self.meta["N"], self.meta["top"]
        for name, dtype in ARRAYS.items():
            shape = (N,) if name == "rest" else (N, m)
            a = self.arrays[name]
            if a.shape != shape or a.dtype != dtype:
                raise UserError(f"{self.folder / (name + '.npy')}: expected {np.dtype(dtype)} of shape {shape} as "
                                f"meta.json says, found {a.dtype} {a.shape}")

    def __len__(self) -> int:
        return self.meta["N"]

    def batch(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The targets of datastore rows (B, T) -> words (B·T, m) int64, probs (B·T, m), rest (B·T,) fp32."""
        flat = rows.reshape(-1).cpu().numpy()
        words, probs, rest = (torch.from_numpy(np.asarray(self.arrays[n][flat])) for n in ("words", "probs", "rest"))
        return words.long(), probs, rest


def check_targets_for(targets: Targets, vocab_hash: str, n_train: int) -> None:
    """Targets answer for this corpus's training positions only: the same vocabulary and number of tokens."""
    if targets.meta["vocab_hash"] != vocab_hash or len(targets) != n_train:
        raise UserError(f"{targets.folder}: targets of {len(targets)} training positions of another corpus or "
                        f"vocabulary; this run trains on {n_train} tokens (train.distil_targets)")


def kl_to_targets(log_q: torch.Tensor, words: torch.Tensor, probs: torch.Tensor, rest: torch.Tensor) -> torch.Tensor:
    """KL(p_kNN || q) per position over the partition {top words, the rest}: log_q (n, m) the model's log-probability
    of each of the row's top words (any value where the word is −1 padding), words (n, m), probs (n, m), rest (n,)
    -> (n,) fp32 (see the module docstring). q(rest) = 1 − Σ_top q, summed in float64 so that a nearly full top
    keeps its digits; clamped at 1e-12 (then the top holds all but a rounding error of the model's mass)."""
    valid = words >= 0
    log_q = log_q.float().masked_fill(~valid, 0.0)
    q_top = (log_q.double().exp() * valid).sum(1)  # (n,)
    log_q_rest = torch.log1p(-q_top).clamp_min(math.log(1e-12)).float()
    p, r = probs.float() * valid, rest.float()
    top_part = (torch.xlogy(p, p) - p * log_q).sum(1)
    rest_part = torch.xlogy(r, r) - torch.where(r > 0, r * log_q_rest, torch.zeros_like(r))
    return top_part + rest_part

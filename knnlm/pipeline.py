"""The whole pipeline on one run folder: train (or resume), build the datastore, evaluate; finished steps are skipped.

`knnlm run` and every run of a sweep call `run_pipeline`; it writes `RUN/results.json`.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from .artifacts import UserError, read_json, read_meta, write_json, writing_into
from .checkpoint import latest_checkpoint, model_checkpoint
from .config import Config, check_same_model
from .data import split_ids
from .datastore import build_datastore
from .models import corpus_for
from .evaluate import evaluate
from .train import train


def check_writable(out: Path) -> None:
    """Create the run folder and write a file into it, so that a read-only --out fails before any work."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-test-", dir=out)  # unique: several ranks may probe at once
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise UserError(f"--out {out}: folder cannot be written ({e.strerror})") from None


def check_writable_folders(run: Path, *subfolders: str) -> None:
    """The run folder, and those of `subfolders` that exist, can be written (else a one-line UserError now)."""
    check_writable(run)
    for sub in subfolders:
        if (run / sub).is_dir():
            check_writable(run / sub)


def check_k_max(cfg: Config) -> None:
    """The datastore will hold one key per training token: eval.k_max neighbours must fit in it."""
    n = len(split_ids(corpus_for(cfg), cfg, "train"))
    if cfg.eval.k_max > n:
        raise UserError(f"eval.k_max: {cfg.eval.k_max} is larger than the datastore will be ({n} keys, one per "
                        f"training token); expected at most {n}")


def run_pipeline(cfg: Config, out: Path, progress: bool = True) -> dict | None:
    """Train (or resume), build the datastore, evaluate valid (and test if asked); skip finished steps. The run
    folder is locked throughout (`knnlm run` and each run of a sweep)."""
    out = Path(out)
    with writing_into(out):
        check_writable(out)
        check_same_model(out, cfg)
        if (out / "train_summary.json").is_file():
            train_summary = read_json(out / "train_summary.json")
        else:
            check_k_max(cfg)  # now, not after training and building the datastore
            train_summary = train(cfg, out, resume=latest_checkpoint(out) is not None, progress=progress)

        ckpt = read_meta(model_checkpoint(out), "checkpoint")  # the best one where training kept it
        ds_meta = out / "datastore" / "meta.json"
        if not ds_meta.is_file() or read_json(ds_meta)["model_sha256"] != ckpt["model_sha256"]:
            build_datastore(out, cfg, progress=progress)

        splits = ["valid"] + [s for s in cfg.eval.splits if s != "valid"]
        results = {"train": train_summary}
        for split in splits:
            results[split] = evaluate(out, cfg, split, progress=progress)
        if results["valid"] is None:
            return None  # a rank other than 0 under torchrun: rank 0 writes and reports the results
        # wall time of each stage as recorded when it ran (a rerun skips finished stages but keeps their times)
        results["seconds"] = {"train": train_summary["train_seconds"],
                              "datastore": read_json(ds_meta).get("seconds")}  # None: not recorded (old datastore)
        for split in splits:
            results["seconds"][f"evaluate_{split}"] = sum(results[split]["seconds"].values())
        write_json(out / "results.json", results)
        return results

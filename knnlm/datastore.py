"""Build the kNN datastore: `knnlm datastore --out RUN` writes RUN/datastore/{keys,vals}.npy and meta.json.

The trained model reads the training split with sliding windows (each target scored once, with at least half a
window of context); row i pairs the key r at input position i with the token that follows it (values int32).
Keys stream into a memory-mapped float16 file, so memory does not grow with N; files are written under temporary
names and `meta.json` last, so an interrupted build never looks complete. Under `torchrun` each rank scores its own
contiguous share of the windows and writes it into the same files at offsets known in advance.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from .artifacts import UserError, atomic_dir, load_npy, read_meta, write_json
from .checkpoint import load_model
from .config import Config
from .data import corpus_for, sliding_windows, token_stream
from .distributed import barrier, setup_distributed
from .model import score_stream


def stride_of(cfg: Config) -> int:
    return cfg.datastore.stride or max(1, cfg.model.context // 2)


def build_datastore(run: str | Path, cfg_override: Config | None = None, progress: bool = True) -> Path:
    """Write the datastore of the run's latest checkpoint into RUN/datastore; return that folder."""
    run = Path(run)
    rank, world, device = setup_distributed()
    model, cfg, ckpt_meta = load_model(run, device)
    if cfg_override is not None:  # datastore/eval options may be changed after training; the model may not
        cfg.datastore, cfg.data = cfg_override.datastore, cfg_override.data
    corpus = corpus_for(cfg)
    if corpus.vocab_hash != ckpt_meta["vocab_hash"]:
        raise UserError(f"{ckpt_meta['path']}: checkpoint was trained with another vocabulary than {corpus.folder}")
    ids = corpus.splits["train"]
    if cfg.data.max_train_tokens:
        ids = ids[: cfg.data.max_train_tokens]
    s = token_stream(ids, corpus.eos_id)
    N, d = len(ids), model.key_dim
    assert N < 2**31, "int32 values and row ids assume fewer than 2^31 keys"

    folder = run / "datastore"
    stride = stride_of(cfg)
    windows = sliding_windows(N, cfg.model.context, stride)
    # sharding: each rank scores a contiguous run of windows; window (start, end, score_from) fills rows
    # [score_from, end), so every rank knows its offsets in the shared files in advance
    share = windows[rank * len(windows) // world : (rank + 1) * len(windows) // world]
    main = rank == 0
    with atomic_dir(folder) if main else contextlib.nullcontext(folder.parent / f".{folder.name}.tmp") as tmp:
        if main:
            np.lib.format.open_memmap(tmp / "keys.npy", mode="w+", dtype=np.float16, shape=(N, d)).flush()
            np.lib.format.open_memmap(tmp / "vals.npy", mode="w+", dtype=np.int32, shape=(N,)).flush()
        barrier()
        keys = np.load(tmp / "keys.npy", mmap_mode="r+")
        vals = np.load(tmp / "vals.npy", mmap_mode="r+")
        t0 = time.time()
        row = share[0][2] if share else N
        bar = tqdm(total=N, desc="datastore", unit="tok", unit_scale=True, disable=not (progress and main),
                   dynamic_ncols=True)
        for k, tgt, _ in score_stream(model, s, stride, cfg.datastore.batch_size, cfg.train.bf16, windows=share):
            n = len(tgt)
            keys[row : row + n] = k.numpy()
            vals[row : row + n] = tgt.numpy()
            row += n
            bar.update(n * world)
        bar.close()
        assert row == (share[-1][1] if share else N), f"rank {rank} wrote up to row {row}"
        keys.flush()
        vals.flush()
        del keys, vals
        barrier()
        if main:
            write_json(tmp / "meta.json", {
                "N": N, "d": d, "keys_dtype": "float16", "vals_dtype": "int32",
                "key_site": cfg.model.key_site, "key_layer": cfg.model.key_layer,
                "checkpoint": ckpt_meta["path"], "model_sha256": ckpt_meta["model_sha256"],
                "vocab_hash": corpus.vocab_hash, "corpus": str(corpus.folder), "stride": stride,
                "context": cfg.model.context, "ranks": world, "seconds": time.time() - t0,
            })
    barrier()
    return folder


class Datastore:
    """A complete datastore, checked against its meta: keys (N, d) float16 memory-mapped, vals (N,) int32."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.meta = read_meta(self.folder, "datastore")
        self.keys = load_npy(self.folder / "keys.npy", mmap=True)
        self.vals = load_npy(self.folder / "vals.npy", mmap=True)
        N, d = self.meta["N"], self.meta["d"]
        if self.keys.shape != (N, d) or self.keys.dtype != np.float16:
            raise UserError(f"{self.folder / 'keys.npy'}: expected float16 keys of shape ({N}, {d}) as meta.json says, "
                            f"found {self.keys.dtype} {self.keys.shape}")
        if self.vals.shape != (N,) or self.vals.dtype != np.int32:
            raise UserError(f"{self.folder / 'vals.npy'}: expected {N} int32 values, found {self.vals.dtype} {self.vals.shape}")

    def __len__(self) -> int:
        return self.meta["N"]

    def check_model(self, ckpt_meta: dict) -> None:
        """Refuse a datastore made by another model: its keys live in another space."""
        if self.meta["model_sha256"] != ckpt_meta["model_sha256"]:
            raise UserError(f"{self.folder}: datastore was built from another model ({self.meta['checkpoint']}), "
                            f"not {ckpt_meta['path']}; rebuild it with `knnlm datastore`")
        if self.meta["key_site"] != ckpt_meta["key_site"] or self.meta["key_layer"] != ckpt_meta["key_layer"]:
            raise UserError(f"{self.folder}: datastore keys are from site {self.meta['key_site']}, the model's are from {ckpt_meta['key_site']}")

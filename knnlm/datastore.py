"""Build the kNN datastore: `knnlm datastore --out RUN` writes RUN/datastore/{keys,vals}.npy and meta.json.

The trained model reads the training split with sliding windows (each target scored once, with at least half a
window of context); row i pairs the key r at input position i with the token that follows it (values int32).
Keys stream into a memory-mapped float16 file, so memory does not grow with N; files are written under temporary
names and `meta.json` last, so an interrupted build never looks complete. Under `torchrun` each rank scores its own
contiguous share of the windows and writes it into the same files at offsets known in advance.

Named datastores: `knnlm datastore --out RUN --name NAME data.path=DIR` writes the datastore of another text (a
domain) for the same trained model into RUN/datastores/NAME/datastore, in the same format; DIR's training split is
read with the run's own vocabulary (`models.corpus_for_run`: unseen words become `<unk>`, the OOV rate is recorded).
Its evaluations go to RUN/datastores/NAME/eval/<split>, beside it, so they never replace the run's own RUN/eval.
A run holds any number of them; `--datastore NAME` picks one at evaluation, scoring and generation.
"""

from __future__ import annotations

import contextlib
import hashlib
import re
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from .artifacts import UserError, atomic_dir, check_digest, file_sha256, kill_point, load_npy, read_meta, reserve, swapping, write_json
from .checkpoint import load_model
from .config import Config, from_dict
from .data import sliding_windows, token_stream, split_ids, tokenizer_settings
from .distributed import barrier, setup_distributed
from .models import corpus_for, corpus_for_run
from .scoring import score_stream


NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def check_name(name: str, option: str = "--name") -> str:
    """A datastore name is a plain folder name (letters, digits, `.`, `_`, `-`; at most 64): never a path."""
    if not NAME_PATTERN.fullmatch(name):
        raise UserError(f"{option}: {name!r} is not a datastore name; expected letters, digits, '.', '_' or '-' "
                        "(at most 64, starting with a letter or digit), not a path")
    return name


def datastore_names(run: str | Path) -> list[str]:
    """The named datastores of a run that are complete (their meta.json written)."""
    root = Path(run) / "datastores"
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if NAME_PATTERN.fullmatch(p.name) and not p.is_symlink()
                  and (p / "datastore" / "meta.json").is_file())


def datastore_home(run: str | Path, name: str | None = None, must_exist: bool = True) -> Path:
    """Where a datastore and its evaluations live: the run folder itself for the run's own datastore (None),
    RUN/datastores/NAME for a named one; `must_exist`: a name not built yet is a UserError naming those there are."""
    run = Path(run)
    if name is None:
        return run
    home = run / "datastores" / check_name(name, "--datastore" if must_exist else "--name")
    if must_exist and not (home / "datastore" / "meta.json").is_file():
        names = datastore_names(run)
        there = (f"available: {', '.join(names)}" if names else
                 f"none built; build one with `knnlm datastore --out {run} --name {name} data.path=DIR`")
        raise UserError(f"--datastore: {run} has no datastore named {name!r} ({there})")
    if home.parent.is_symlink() or home.is_symlink():  # a writer would replace the link's target
        raise UserError(f"{home if home.is_symlink() else home.parent}: is a symbolic link; expected the run's own folder")
    return home


def stride_of(cfg: Config) -> int:
    return cfg.datastore.stride or max(1, cfg.model.context // 2)


def build_datastore(run: str | Path, cfg_override: Config | None = None, progress: bool = True,
                    name: str | None = None) -> Path:
    """Write the datastore of the run's latest checkpoint into RUN/datastore, or of `cfg_override.data.path`'s
    training split into RUN/datastores/NAME/datastore (`name`); return that folder."""
    run = Path(run)
    home = datastore_home(run, name, must_exist=False)  # a bad name is refused before the model is read
    rank, world, device = setup_distributed()
    model, cfg, ckpt_meta = load_model(run, device)
    if cfg_override is not None:  # datastore/eval options may be changed after training; the model may not
        cfg.datastore, cfg.data = cfg_override.datastore, cfg_override.data
    if name is None:
        corpus = corpus_for(cfg)
        if corpus.vocab_hash != ckpt_meta["vocab_hash"]:
            raise UserError(f"{ckpt_meta['path']}: checkpoint was trained with another vocabulary than {corpus.folder}"
                            f"; a datastore of another text needs a name: `knnlm datastore --out {run} --name NAME "
                            f"data.path={cfg.data.path or 'DIR'}`")
    else:
        corpus = corpus_for_run(run, cfg, ckpt_meta)  # the run's vocabulary reads the new text
    ids = split_ids(corpus, cfg, "train")
    s = token_stream(ids, corpus.eos_id)
    N, d = len(ids), model.key_dim
    assert N < 2**31, "int32 values and row ids assume fewer than 2^31 keys"

    folder = home / "datastore"
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
            reserve(tmp / "vals.npy", "the datastore's values")
            reserve(tmp / "keys.npy", "the datastore's keys")  # a full disk fails here, not with a SIGBUS later
        barrier()
        keys = np.load(tmp / "keys.npy", mmap_mode="r+")
        vals = np.load(tmp / "vals.npy", mmap_mode="r+")
        t0 = time.time()
        row = share[0][2] if share else N
        # one process writing every row in order: keys.npy's digest is taken on the way (no second read of a file
        # that is 200 GB for WikiText-103); with several ranks it is read back afterwards
        keys_sha256 = None
        if world == 1 and row == 0:
            with open(tmp / "keys.npy", "rb") as f:
                keys_sha256 = hashlib.sha256(f.read(keys.offset))  # the .npy header
        bar = tqdm(total=N, desc="datastore", unit="tok", unit_scale=True, disable=not (progress and main),
                   dynamic_ncols=True)
        for batch, (k, tgt, _) in enumerate(score_stream(model, s, stride, cfg.datastore.batch_size, cfg.train.bf16,
                                                         windows=share), start=1):
            n = len(tgt)
            keys[row : row + n] = k.numpy()
            vals[row : row + n] = tgt.numpy()
            if keys_sha256 is not None:
                keys_sha256.update(keys[row : row + n])  # (n, d) float16, contiguous: the bytes as in the file
            row += n
            bar.update(n * world)
            kill_point("datastore", batch)
        bar.close()
        assert row == (share[-1][1] if share else N), f"rank {rank} wrote up to row {row}"
        keys.flush()
        vals.flush()
        del keys, vals
        barrier()
        if main:
            digests = {"keys.npy": keys_sha256.hexdigest() if keys_sha256 is not None and row == N
                       else file_sha256(tmp / "keys.npy"), "vals.npy": file_sha256(tmp / "vals.npy")}
            write_json(tmp / "meta.json", {
                "format": FORMAT, "N": N, "d": d, "keys_dtype": "float16", "vals_dtype": "int32",
                "key_site": cfg.model.key_site, "key_layer": cfg.model.key_layer,
                "checkpoint": ckpt_meta["path"], "model_sha256": ckpt_meta["model_sha256"],
                "vocab_hash": corpus.vocab_hash, "corpus": str(corpus.folder), "corpus_sha256": corpus.digest,
                # a named datastore: its text wherever the command is run from, and how the run's vocabulary read it
                **({"name": name, "corpus": str(corpus.folder.resolve()), "oov_rate": corpus.oov_rate("train", N),
                    "tokenizer": tokenizer_settings(from_dict(ckpt_meta["config"], ckpt_meta["path"]).data)}
                   if name is not None else {}),
                "stride": stride, "bf16": cfg.train.bf16,
                "context": cfg.model.context, "ranks": world, "seconds": time.time() - t0,
                "sha256": digests,  # vals checked on every load; keys by `knnlm verify`
            })
    barrier()
    return folder


FORMAT = 2  # datastores of this format record their arrays' digests; those without a "format" entry are older


def neighbour_values(vals: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """The values (next tokens, int32) of datastore rows `ids`, any shape; an id of -1 (a search's padding where it
    found fewer neighbours than asked) gives -1, which no target equals. `vals` may be a memory map.

    torch's `index_select` looks up a saved search's 50,000 × 4,096 neighbours 4.5× faster than numpy's fancy indexing
    on a 2-core Zen 3 (1.2 s against 5.2 s, best of 3; `benchmarks/tuning_step.py`), a step of every tuning."""
    ids = np.ascontiguousarray(ids)
    with warnings.catch_warnings():  # read-only memory maps: index_select only reads them
        warnings.simplefilter("ignore", UserWarning)
        flat, table = torch.from_numpy(ids.reshape(-1)), torch.from_numpy(np.asarray(vals))
    pad = flat < 0 if flat.numel() and int(flat.min()) < 0 else None
    out = torch.index_select(table, 0, flat.clamp(min=0) if pad is not None else flat)
    if pad is not None:
        out[pad] = -1
    return out.numpy().reshape(ids.shape)


class Datastore:
    """A complete datastore, checked against its meta: keys (N, d) float16 memory-mapped, vals (N,) int32, and
    vals against its digest (cheap: 4N bytes; the keys' digest is checked on demand by `knnlm verify`)."""

    FIELDS = {"N": int, "d": int, "model_sha256": str, "key_site": str, "key_layer": int, "checkpoint": str}

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        with swapping(self.folder, exclusive=False):  # a writer replacing the folder waits, and we never see half
            self._open()

    def _open(self) -> None:
        self.meta = read_meta(self.folder, "datastore", self.FIELDS)
        self.keys = load_npy(self.folder / "keys.npy", mmap=True)
        self.vals = load_npy(self.folder / "vals.npy", mmap=True)
        N, d = self.meta["N"], self.meta["d"]
        if self.keys.shape != (N, d) or self.keys.dtype != np.float16:
            raise UserError(f"{self.folder / 'keys.npy'}: expected float16 keys of shape ({N}, {d}) as meta.json says, "
                            f"found {self.keys.dtype} {self.keys.shape}")
        if self.vals.shape != (N,) or self.vals.dtype != np.int32:
            raise UserError(f"{self.folder / 'vals.npy'}: expected {N} int32 values, found {self.vals.dtype} {self.vals.shape}")
        path = self.folder / "meta.json"
        fmt = self.meta.get("format")  # none: written before digests were recorded, which it may then lack
        if fmt is not None and (fmt != FORMAT or isinstance(fmt, bool)):
            raise UserError(f"{path}: 'format' should be {FORMAT} (absent only in datastores written before "
                            f"formats were numbered), found {fmt!r}")
        digests = self.meta.get("sha256", {})
        if not isinstance(digests, dict) or not all(isinstance(digests.get(n, ""), str) for n in ("keys.npy", "vals.npy")):
            raise UserError(f"{path}: 'sha256' should map keys.npy and vals.npy to hex digests")
        if fmt is not None and not {"keys.npy", "vals.npy"} <= digests.keys():
            raise UserError(f"{path}: no sha256 digest of keys.npy and vals.npy, which a format-{FORMAT} datastore "
                            "records (the file was edited); rebuild it with `knnlm datastore`")
        if "vals.npy" in digests:
            check_digest(self.folder / "vals.npy", digests["vals.npy"])

    def __len__(self) -> int:
        return self.meta["N"]

    def check_vals(self, vocab_size: int) -> None:
        """Every value is a token id of a vocabulary of `vocab_size` (a digest only says the file is as written)."""
        if len(self.vals) and (int(self.vals.min()) < 0 or int(self.vals.max()) >= vocab_size):
            bad = int(self.vals.min()) if int(self.vals.min()) < 0 else int(self.vals.max())
            raise UserError(f"{self.folder / 'vals.npy'}: token id {bad} is outside the model's vocabulary "
                            f"[0, {vocab_size}) (the datastore is damaged or from another corpus)")

    def check_model(self, ckpt_meta: dict) -> None:
        """Refuse a datastore made by another model: its keys live in another space."""
        if self.meta["model_sha256"] != ckpt_meta["model_sha256"]:
            raise UserError(f"{self.folder}: datastore was built from another model ({self.meta['checkpoint']}), "
                            f"not {ckpt_meta['path']}; rebuild it with `knnlm datastore`")
        if self.meta["key_site"] != ckpt_meta["key_site"] or self.meta["key_layer"] != ckpt_meta["key_layer"]:
            raise UserError(f"{self.folder}: datastore keys are from site {self.meta['key_site']}, the model's are from {ckpt_meta['key_site']}")

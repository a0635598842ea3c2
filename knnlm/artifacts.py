"""Files that other steps read: atomic writes, self-describing `meta.json`, and the user-facing error type.

Every artifact (checkpoint, datastore, evaluation) is a folder whose `meta.json` is written last: a folder
without one is incomplete and is refused. Single files are written to a temporary name in the same folder
and renamed into place, so a killed job never leaves a half-written file where a good one was.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

import numpy as np


class UserError(Exception):
    """A problem with the user's input (file, option, value): printed as one line, exit status 2."""


_UMASK = os.umask(0)
os.umask(_UMASK)


@contextlib.contextmanager
def atomic_path(path: str | Path, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` only if the block finishes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix + ".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        if tmp.exists():  # mkstemp makes files private (0600); give the result the permissions open() would
            os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


@contextlib.contextmanager
def atomic_dir(final: str | Path) -> Iterator[Path]:
    """Yield an empty temporary folder beside `final`; when the block finishes it replaces `final`.

    If the block raises, the temporary folder is removed and `final` is left as it was. (A SIGKILL can leave the
    temporary folder behind; the next call clears it.) The old `final` is moved aside before the new one is
    renamed in, so at every moment either the old or the new artifact is complete on disk.
    """
    final = Path(final)
    tmp = final.parent / f".{final.name}.tmp"
    old = final.parent / f".{final.name}.old"
    for leftover in (tmp, old):
        if leftover.exists():
            shutil.rmtree(leftover)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def write_json(path: str | Path, obj: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")


def write_text(path: str | Path, text: str) -> None:
    """A text file (Markdown tables, notes), replaced atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def read_json(path: str | Path, what: str = "file") -> Any:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: {what} not found")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: expected a JSON {what} ({e})") from None


def save_npy(path: str | Path, array: np.ndarray) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:  # a file object: np.save would append ".npy" to a name
        np.save(f, array, allow_pickle=False)


def load_npy(path: str | Path, mmap: bool = False) -> np.ndarray:
    """Load an array without ever unpickling; `mmap` maps it read-only."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: array file not found")
    try:
        return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise UserError(f"{path}: not a readable .npy array ({e})") from None


def file_sha256(path: str | Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def read_meta(folder: str | Path, what: str) -> dict:
    """The `meta.json` of a complete artifact folder, or a UserError saying the artifact is missing/incomplete."""
    folder = Path(folder)
    if not (folder / "meta.json").is_file():
        raise UserError(f"{folder}: no complete {what} here (meta.json missing; was the step run to the end?)")
    return read_json(folder / "meta.json", f"{what} meta")

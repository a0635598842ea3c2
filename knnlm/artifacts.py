"""Files that other steps read: atomic writes, self-describing `meta.json`, and the user-facing error type.

Every artifact (checkpoint, datastore, evaluation) is a folder whose `meta.json` is written last: a folder
without one is incomplete and is refused. Single files are written to a temporary name in the same folder
and renamed into place, so a killed job never leaves a half-written file where a good one was. `meta.json`
records the sha256 digest of the arrays beside it (`verify_digests`), and a command that writes into a run folder
holds the folder's lock for its whole length (`writing_into`), so two writers never interleave.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import importlib
import json
import os
import platform
import shutil
import signal
import stat
import tempfile
from pathlib import Path
from typing import Any, Iterator

import numpy as np


class UserError(Exception):
    """A problem with the user's input (file, option, value): printed as one line, exit status 2."""


def optional_import(module: str, extra: str, purpose: str):
    """`import module` for a package knnlm installs only as an extra (FAISS, matplotlib, scikit-learn), imported
    where it is used; if it is missing, a one-line error naming the extra that installs it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise UserError(f"{purpose}: {module.split('.')[0]} is not installed (pip install 'knnlm[{extra}]')") from None


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
def atomic_dir(final: str | Path, readers: bool = True) -> Iterator[Path]:
    """Yield an empty temporary folder beside `final`; when the block finishes it replaces `final`.

    If the block raises, the temporary folder is removed and `final` is left as it was. (A SIGKILL can leave the
    temporary folder behind; the next call clears it.) The old `final` is moved aside before the new one is
    renamed in, so at every moment either the old or the new artifact is complete on disk, and a reader that opens
    it under `swapping` never sees the moment between the two renames.
    """
    final = Path(final)
    tmp = final.parent / f".{final.name}.tmp"
    old = final.parent / f".{final.name}.old"
    if final.is_symlink():  # replacing it would move the link aside and leave its target to whoever comes next
        raise UserError(f"{final}: is a symbolic link (to {os.readlink(final)}); expected a folder of its own")
    for leftover in (tmp, old):
        if leftover.is_symlink():  # never followed: only the link goes
            leftover.unlink()
        elif leftover.exists():
            shutil.rmtree(leftover)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    # readers (`swapping(..., False)`) never open it between the renames; `readers=False` (a folder outside a run,
    # e.g. a downloaded corpus): no lock file is left beside it
    with swapping(final, exclusive=True) if readers else contextlib.nullcontext():
        if final.exists():
            final.rename(old)
        tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def swapping(folder: str | Path, exclusive: bool) -> Iterator[None]:
    """A short `flock` on `.swap.lock` beside an artifact folder: exclusive while `atomic_dir` moves a new folder
    into place (two renames), shared while a reader opens one (its meta, then its arrays), so that a reader in another
    process never sees the moment between the renames, nor the old meta with the new arrays. Where no lock file can
    be opened (a read-only folder) nobody can swap anything, and none is needed."""
    lock = Path(folder).parent / ".swap.lock"
    fd = None
    for flags in (os.O_RDWR | os.O_CREAT, os.O_RDONLY):
        try:
            fd = os.open(lock, flags | os.O_NOFOLLOW, 0o666)
            break
        except OSError:
            continue
    if fd is None:
        yield
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        yield
    finally:
        os.close(fd)  # releases the lock


def reserve(path: str | Path, what: str) -> None:
    """Allocate the disk blocks of a file created sparse (a memory-mapped array), so that a full disk is a one-line
    error now rather than a SIGBUS when a page is first written."""
    path = Path(path)
    size = path.stat().st_size
    fd = os.open(path, os.O_RDWR)
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as e:
        free = shutil.disk_usage(path.parent).free
        raise UserError(f"{path.parent}: not enough disk space for {what} ({size:,} bytes needed, {free:,} free; "
                        f"{e.strerror})") from None
    finally:
        os.close(fd)


def nan_at(obj: Any, where: str = "") -> str | None:
    """Where the first NaN of a JSON-able object sits (e.g. `protocols.tuned.knnlm_ppl`), or None."""
    if isinstance(obj, float):
        return (where or "the top level") if obj != obj else None
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, (list, tuple)) else ()
    for key, value in items:
        here = f"{where}[{key}]" if isinstance(key, int) else f"{where}.{key}" if where else str(key)
        if found := nan_at(value, here):
            return found
    return None


def nan_to_null(obj: Any) -> Any:
    """A copy with every NaN replaced by None, for writers whose values may be undefined (written as null)."""
    if isinstance(obj, float) and obj != obj:
        return None
    if isinstance(obj, dict):
        return {k: nan_to_null(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [nan_to_null(v) for v in obj]
    return obj


def write_json(path: str | Path, obj: Any) -> None:
    """Write a JSON file atomically. NaN is refused: it is not JSON, and in this project it only ever means that a
    computation went wrong. (±inf is written as Python's json does: a tuning grid's λ = 1 rows are legitimately
    infinite where no neighbour carries the target.)"""
    if where := nan_at(obj):
        raise UserError(f"{path}: refusing to write NaN (at {where}); a value that was computed is not a number")
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")


def write_text(path: str | Path, text: str) -> None:
    """A text file (Markdown tables, notes), replaced atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def markdown_table(title: str, head: list[str], rows: list[list[str]], note: str = "") -> str:
    """The one Markdown table writer of the study and analysis outputs: a `###` title, the table, an optional note."""
    lines = [f"### {title}", "", "| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines) + "\n" + (f"\n{note}\n" if note else "")


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


_KINDS = {int: "an integer", float: "a number", str: "a string", dict: "a JSON object", list: "a list"}


def check_fields(record: Any, path: str | Path, fields: dict[str, type]) -> dict:
    """`record` (read from `path`) is a JSON object holding each of `fields` with its type; else a UserError."""
    if not isinstance(record, dict):
        raise UserError(f"{path}: expected a JSON object, found {type(record).__name__}")
    for key, typ in fields.items():
        if key not in record:
            raise UserError(f"{path}: no {key!r} entry (the file is damaged or was not written by knnlm)")
        value = record[key]
        ok = isinstance(value, (int, float) if typ is float else typ) and not isinstance(value, bool)
        if not ok:
            raise UserError(f"{path}: {key!r} should be {_KINDS[typ]}, found {value!r}")
    return record


def read_meta(folder: str | Path, what: str, fields: dict[str, type] | None = None) -> dict:
    """The `meta.json` of a complete artifact folder, or a UserError saying the artifact is missing/incomplete;
    `fields` are the entries (name: type) the reader relies on."""
    folder = Path(folder)
    if not (folder / "meta.json").is_file():
        raise UserError(f"{folder}: no complete {what} here (meta.json missing; was the step run to the end?)")
    return check_fields(read_json(folder / "meta.json", f"{what} meta"), folder / "meta.json", fields or {})


def check_digest(path: str | Path, expected: str) -> None:
    """The file's sha256 is the one its meta.json recorded, or a UserError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: file missing (meta.json records its digest)")
    if file_sha256(path) != expected:
        raise UserError(f"{path}: sha256 digest differs from the one meta.json recorded "
                        "(the file was changed or damaged after it was written)")


def verify_digests(folder: str | Path, meta: dict) -> list[str]:
    """Check every file digest a meta.json records under "sha256" ({file name: hex}); return the names checked."""
    digests = meta.get("sha256", {})
    if not isinstance(digests, dict) or not all(isinstance(v, str) for v in digests.values()):
        raise UserError(f"{Path(folder) / 'meta.json'}: 'sha256' should map file names to hex digests")
    for name, digest in digests.items():
        check_digest(Path(folder) / name, digest)
    return list(digests)


def _holder(fd: int) -> str:
    os.lseek(fd, 0, os.SEEK_SET)
    pid = os.read(fd, 32).decode(errors="replace").strip()
    return f"process {pid}" if pid.isdigit() else "another process"


# what a run folder holds: each must be the run's own file or folder, never a link to one elsewhere (a writer
# would replace or truncate the link's target)
RUN_ENTRIES = ("config.json", "vocab.json", "train_summary.json", "results.json", "metrics.jsonl", "checkpoints", "datastore",
               "datastores",
               ".datastore.tmp", ".datastore.old", "eval", "eval/valid", "eval/test", "eval/.valid.tmp",
               "eval/.test.tmp", "eval/.valid.old", "eval/.test.old")


def check_no_links(run: str | Path) -> None:
    """Refuse a run folder whose known entries (`RUN_ENTRIES`, each checkpoint) are symbolic links."""
    run = Path(run)
    entries = [run / e for e in RUN_ENTRIES]
    if (run / "checkpoints").is_dir() and not (run / "checkpoints").is_symlink():
        entries += sorted((run / "checkpoints").iterdir())
    for path in entries:
        if path.is_symlink():
            raise UserError(f"{path}: is a symbolic link (to {os.readlink(path)}); expected the run's own "
                            f"{'file' if path.suffix else 'folder'}: replace the link by a copy, or use another --out")


def _open_lock(lock: Path) -> tuple[int | None, bool]:
    """Open (creating it if need be) the lock file without following a link: (fd, writable). (None, False) when it
    does not exist and cannot be made (a folder this user cannot write)."""
    try:
        return os.open(lock, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o666), True
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise UserError(f"{lock}: is a symbolic link; expected the run's own lock file (remove the link)") from None
        if e.errno == errno.EISDIR:
            raise UserError(f"{lock}: is a folder; expected the run's own lock file (remove it)") from None
        if e.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
            raise
        if not os.path.lexists(lock):
            return None, False
        try:  # flock needs no write permission: another user's lock file still locks
            return os.open(lock, os.O_RDONLY | os.O_NOFOLLOW), False
        except OSError as e2:
            raise UserError(f"{lock}: the run's lock cannot be taken ({e2.strerror}); is another user writing "
                            f"into {lock.parent}? Remove the file if nobody is") from None


@contextlib.contextmanager
def writing_into(run: str | Path, create: bool = True, read_only: bool = False) -> Iterator[Path]:
    """Hold `RUN/.lock` while a command writes into the run folder: a second writer is refused at once.

    The lock is an advisory `flock`: the OS drops it when its holder dies, even by SIGKILL, so rerunning a killed
    command just works. The file holds the holder's pid while it is held and is empty otherwise. Under torchrun the
    ranks of one job share the folder, so only rank 0 takes it. A folder (and lock file) this call created is removed
    again if the block fails leaving it empty, so a refused command leaves nothing behind. `create=False`: a missing
    folder is not created (the command will refuse it itself). A lock that cannot be taken stops the command, and so
    does a folder that cannot be written, unless `read_only` (a command that writes nothing: it runs unlocked where
    nobody can write). The lock file is never followed through a link, and the run's known entries must not be
    links either (`check_no_links`).
    """
    run = Path(run)
    if os.environ.get("RANK", "0") != "0" or (not create and not run.is_dir()):
        yield run
        return
    new_dirs = [p for p in (run, *run.parents) if not p.exists()]  # removed again, deepest first, if left empty
    try:
        run.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"{run}: folder cannot be created ({e.strerror})") from None
    lock = run / ".lock"
    new_lock = not os.path.lexists(lock)
    fd, writable = _open_lock(lock)
    if fd is None:
        if not read_only:
            raise UserError(f"{run}: folder cannot be written (its lock file {lock.name} cannot be created)")
        check_no_links(run)
        yield run  # nobody can write here, so nobody needs to be kept out
        return
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode) or info.st_nlink != 1:
        os.close(fd)
        what = "a hard link to another file" if stat.S_ISREG(info.st_mode) else "not a regular file"
        raise UserError(f"{lock}: is {what}; expected the run's own lock file (remove it)")
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _holder(fd)
        os.close(fd)
        raise UserError(f"{run} is in use by {holder} (one command at a time writes into a run folder)") from None
    if writable:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    try:
        check_no_links(run)
        yield run
    except BaseException:
        if new_lock:
            lock.unlink(missing_ok=True)
        for folder in new_dirs:
            if folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()
        raise
    finally:
        if writable:
            os.ftruncate(fd, 0)
        os.close(fd)  # releases the lock


def cpuinfo_fields(cpuinfo: str | None = None) -> dict[str, str]:
    """The first processor's fields in /proc/cpuinfo (or the text given); empty where there is none (not Linux)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            cpuinfo = ""
    fields: dict[str, str] = {}
    for line in cpuinfo.splitlines():
        if not line.strip():
            break  # the first processor's block
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    return fields


def cpu_name(cpuinfo: str | None = None) -> str:
    """The CPU model as /proc/cpuinfo (or the text given) names it, with its family and model numbers: a virtual
    machine's name can be as bare as "AMD EPYC", which is Zen 4 at family 25 and Zen 5 at family 26 (records and
    benchmarks say which machine measured them)."""
    fields = cpuinfo_fields(cpuinfo)
    name = fields.get("model name") or platform.processor() or platform.machine()
    if "cpu family" in fields and "model" in fields:
        name += f" (family {fields['cpu family']}, model {fields['model']})"
    return name


def kill_point(stage: str, count: int) -> None:
    """A crash at a chosen point, for the tests: with `KNNLM_KILL_AT=<stage>:<count>` set, the process SIGKILLs
    itself when `stage` reaches `count`: "train" after optimizer step `count` (logged, its checkpoint not yet
    written), "datastore" after the `count`-th batch of windows is written, "evaluate" after the `count`-th batch
    of windows is scored, "sweep" after the `count`-th run of this invocation is recorded, "analyze" after the
    `count`-th record file is written. `<stage>:<count>:TERM` sends SIGTERM instead (a scheduler's stop, which is
    handled). Unset, it does nothing."""
    at = os.environ.get("KNNLM_KILL_AT", "")
    if at in (f"{stage}:{count}", f"{stage}:{count}:TERM"):
        os.kill(os.getpid(), signal.SIGTERM if at.endswith(":TERM") else signal.SIGKILL)

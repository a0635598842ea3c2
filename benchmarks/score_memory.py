"""Peak memory and time of `knnlm score` on long texts: does scoring stream?

    python benchmarks/score_memory.py --run runs/tiny [--mb 0.01 0.1 1] [--repeat 3] [--ways cli api] [--busy 0 1]
        [--compare OTHER_CHECKOUT]

Texts of each size are cut from WikiText-2 (valid, then test, then train lines, whole lines). Each size is scored by
`python -m knnlm.cli score TEXT --out RUN` and by `knnlm.load(RUN).score(text)`, each in a fresh process, whose peak
resident memory (VmHWM, the process alone) and wall time are recorded; with `--compare`, the same commands run again with another checkout's `knnlm` first on
PYTHONPATH (e.g. the commit before scoring streamed), side by side. Writes OUT/score_memory.{json,md} (default: this
machine's folder under results/benchmarks/).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import default_out, write_results
from knnlm.data import default_data_dir

REPO = Path(__file__).resolve().parent.parent
def text_of(mb: float) -> str:
    """Whole WikiText-2 lines, valid first, until the text holds `mb` megabytes."""
    folder, out, size = default_data_dir(), [], 0
    for split in ("valid", "test", "train"):
        for line in (folder / f"wiki.{split}.tokens").read_text().splitlines(keepends=True):
            out.append(line)
            size += len(line.encode())
            if size >= mb * 1e6:
                return "".join(out)
    return "".join(out)


def commit(checkout: Path) -> str:
    """The checkout's commit, as a label (a folder's path means nothing to a reader of the record); "-dirty" when
    its knnlm/ differs from that commit."""
    git = ["git", "-C", str(checkout)]
    done = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run([*git, "status", "--porcelain", "--", "knnlm"], capture_output=True, text=True).stdout.strip()
    return (done.stdout.strip() + ("-dirty" if dirty else "")) if done.returncode == 0 else str(checkout)


@contextlib.contextmanager
def busy(n: int):
    """n processes spinning on a core beside the measurement, as other jobs do on a shared machine: glibc's heaps
    grew most under such load (the scoring threads interleave differently)."""
    procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]
    try:
        yield
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()


API = "import sys, pathlib, knnlm; knnlm.load(sys.argv[1]).score(pathlib.Path(sys.argv[2]).read_text())"


def measure(text: Path, run: str, code: Path, way: str) -> dict:
    """Peak resident memory of the scoring process itself (Linux's VmHWM, read until it exits: no compiler or
    other child counted) and its wall time; `way` "cli" runs `knnlm score`, "api" `knnlm.load(run).score(text)`."""
    env = {**os.environ, "PYTHONPATH": str(code), "TQDM_DISABLE": "1"}
    command = ["-m", "knnlm.cli", "score", str(text), "--out", run] if way == "cli" else ["-c", API, run, str(text)]
    t = time.perf_counter()
    proc = subprocess.Popen([sys.executable, *command],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    peak_kib = 0
    while proc.poll() is None:
        try:
            status = Path(f"/proc/{proc.pid}/status").read_text()
            peak_kib = max(peak_kib, int(status.split("VmHWM:")[1].split()[0]))
        except (OSError, IndexError, ValueError):
            pass  # the process is exiting
        time.sleep(0.1)
    if proc.returncode != 0:
        raise SystemExit(f"knnlm score failed ({code}): {proc.stderr.read()[-2000:]}")
    return {"peak_rss_mb": peak_kib / 1024, "seconds": time.perf_counter() - t}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", required=True, help="a finished run folder")
    p.add_argument("--mb", type=float, nargs="+", default=[0.01, 0.1, 1.0])
    p.add_argument("--repeat", type=int, default=1, help="fresh processes per size and code (peaks vary run to run)")
    p.add_argument("--ways", nargs="+", choices=["cli", "api"], default=["cli", "api"],
                   help="`knnlm score TEXT --out RUN`, and/or `knnlm.load(RUN).score(text)` in Python")
    p.add_argument("--busy", type=int, nargs="+", default=[0, 1],
                   help="measure with this many busy processes beside (each number in turn): an idle, a shared machine")
    p.add_argument("--compare", help="another checkout whose knnlm to run side by side")
    p.add_argument("--out", default=default_out(), help="default: this machine's folder under results/benchmarks/")
    a = p.parse_args()
    codes = {f"commit {commit(REPO)} (this checkout)": REPO,
             **({f"commit {commit(Path(a.compare))}": Path(a.compare).resolve()} if a.compare else {})}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for mb in a.mb:
            path = Path(tmp) / f"text_{mb}.txt"
            path.write_text(text_of(mb))
            tokens = sum(len(line.split()) + 1 for line in path.read_text().splitlines())
            for n_busy in a.busy:
                with busy(n_busy):
                    for repeat in range(a.repeat):  # interleaved, so both codes see the same machine load
                        for way in a.ways:
                            for label, code in codes.items():
                                rows.append({"mb": path.stat().st_size / 1e6, "tokens": tokens, "busy": n_busy,
                                             "way": way, "code": label, "repeat": repeat,
                                             **measure(path, a.run, code, way)})
                                print(json.dumps(rows[-1]), flush=True)
    md = ["| text (MB) | tokens | busy processes beside | scored by | code | n "
          "| peak resident memory, min – max (MB) | time, min – max (s) |", "|---|---|---|---|---|---|---|---|"]
    for key in dict.fromkeys((r["mb"], r["tokens"], r["busy"], r["way"], r["code"]) for r in rows):
        mine = [r for r in rows if (r["mb"], r["tokens"], r["busy"], r["way"], r["code"]) == key]
        peak, secs = [r["peak_rss_mb"] for r in mine], [r["seconds"] for r in mine]
        mb, tokens, n_busy, way, label = key
        md.append(f"| {mb:.2f} | {tokens:,} | {n_busy} | {way} | {label} | {len(mine)} "
                  f"| {min(peak):.0f} – {max(peak):.0f} | {min(secs):.0f} – {max(secs):.0f} |")
    md += ["", f"cli: `knnlm score TEXT --out {a.run}`; api: `knnlm.load(\"{a.run}\").score(text)`; each in a fresh "
               "process (n per row); peak resident memory (VmHWM) of that process; the codes alternate, so both see "
               "the same machine load."]
    write_results(a.out, "score_memory", {"run": a.run, "rows": rows}, md)
    print("\n".join(md))


if __name__ == "__main__":
    main()

"""Peak memory and time of `knnlm score` on long texts: does scoring stream?

    python benchmarks/score_memory.py --run runs/tiny [--mb 0.01 0.1 1] [--compare OTHER_CHECKOUT]

Texts of each size are cut from WikiText-2 (valid, then test, then train lines, whole lines). Each size is scored by
`python -m knnlm.cli score TEXT --out RUN` in a fresh process, whose peak resident memory (VmHWM, the process alone)
and wall time are recorded; with `--compare`, the same commands run again with another checkout's `knnlm` first on
PYTHONPATH (e.g. the commit before scoring streamed), side by side. Writes OUT/score_memory.{json,md} (default: this
machine's folder under results/benchmarks/).
"""

from __future__ import annotations

import argparse
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
    """The checkout's commit, as a label (a folder's path means nothing to a reader of the record)."""
    done = subprocess.run(["git", "-C", str(checkout), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return done.stdout.strip() or str(checkout)


def measure(text: Path, run: str, code: Path) -> dict:
    """Peak resident memory of the `knnlm score` process itself (Linux's VmHWM, read until it exits: no compiler
    or other child counted) and its wall time."""
    env = {**os.environ, "PYTHONPATH": str(code), "TQDM_DISABLE": "1"}
    t = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "knnlm.cli", "score", str(text), "--out", run],
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
            for label, code in codes.items():
                rows.append({"mb": path.stat().st_size / 1e6, "tokens": tokens, "code": label, **measure(path, a.run, code)})
                print(json.dumps(rows[-1]), flush=True)
    md = ["| text (MB) | tokens | code | peak resident memory (MB) | time (s) |", "|---|---|---|---|---|"]
    md += [f"| {r['mb']:.2f} | {r['tokens']:,} | {r['code']} | {r['peak_rss_mb']:.0f} | {r['seconds']:.1f} |" for r in rows]
    md += ["", f"`knnlm score TEXT --out {a.run}`, each in a fresh process; peak resident memory of that process."]
    write_results(a.out, "score_memory", {"run": a.run, "rows": rows}, md)
    print("\n".join(md))


if __name__ == "__main__":
    main()

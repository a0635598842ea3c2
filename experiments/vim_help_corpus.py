"""A corpus of another domain for the domain-adaptation example: Vim's help files, in WikiText's folder format.

    python experiments/vim_help_corpus.py --out data/vim-help     # default sources: /usr/share/vim/vim90/doc/*.txt

Each help file's lines are split into words, numbers, clitics and single punctuation marks, WikiText-style
(`knnlm.data`'s `words` tokenizer), and written space-separated, one line per non-empty line, so that a
WikiText-2 model's whitespace reading sees the same kind of tokens it was trained on. Whole files go to one split,
chosen by the sha256 of the file's name (mod 20: 0 test, 1 valid, else train), so valid and test are help pages the
datastore never saw. Lines that are a rule of one repeated character (`=====`, `-----`) are left out. SOURCES.json beside the splits records every source file's sha256 and the split it went to.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from pathlib import Path

from knnlm.artifacts import UserError, write_json, write_text
from knnlm.data import TextTokenizer

DEFAULT_SOURCES = "/usr/share/vim/vim90/doc"


def split_of(name: str) -> str:
    bucket = int(hashlib.sha256(name.encode()).hexdigest(), 16) % 20
    return "test" if bucket == 0 else "valid" if bucket == 1 else "train"


def is_rule(tokens: list[str]) -> bool:
    """A line drawn with one punctuation character repeated (a section rule), not text."""
    return len(tokens) > 3 and len(set(tokens)) == 1 and not tokens[0].isalnum()


def build(sources: Path, out: Path) -> dict:
    files = sorted(sources.glob("*.txt"))
    if not files:
        raise UserError(f"{sources}: no *.txt help files")
    words = TextTokenizer("words")
    lines = {"train": [], "valid": [], "test": []}
    record = {"sources": str(sources), "tokenizer": "knnlm.data words (WikiText-style), then whitespace-joined",
              "split_rule": "sha256(file name) mod 20: 0 test, 1 valid, else train", "files": []}
    for f in files:
        raw = f.read_bytes()
        split = split_of(f.name)
        text = raw.decode("utf-8", errors="replace")
        kept = [" ".join(toks) for toks in map(words.split, text.splitlines()) if toks and not is_rule(toks)]
        lines[split] += kept
        record["files"].append({"name": f.name, "sha256": hashlib.sha256(raw).hexdigest(), "split": split,
                                "lines": len(kept)})
    out.mkdir(parents=True, exist_ok=True)
    for split, rows in lines.items():
        write_text(out / f"wiki.{split}.tokens", "\n".join(rows) + "\n")
    record["tokens"] = {s: sum(len(r.split()) + 1 for r in rows) for s, rows in lines.items()}  # + one <eos> a line
    write_json(out / "SOURCES.json", record)
    return record


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sources", default=DEFAULT_SOURCES, help="folder of Vim help files (*.txt)")
    p.add_argument("--out", required=True, help="corpus folder to write (wiki.{train,valid,test}.tokens)")
    args = p.parse_args()
    try:
        record = build(Path(args.sources), Path(args.out))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{args.out}: {len(record['files'])} files; tokens " + ", ".join(f"{s} {n:,}" for s, n in record["tokens"].items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())

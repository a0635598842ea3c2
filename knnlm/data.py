"""Corpora: read a WikiText-style folder, build the vocabulary, encode and cache token ids, cut batches.

A corpus folder holds `wiki.{train,valid,test}.tokens` (WikiText) or `{train,valid,test}.txt`. Each line is split
on whitespace and ends with one `<eos>`; the vocabulary is the training split's types sorted by frequency (the
order adaptive input/softmax needs), with `<unk>` for words unseen in training. Encoded ids (int32) are cached
under `$KNNLM_CACHE` (default `~/.cache/knnlm`), keyed by the files' content, so a second run does not re-tokenize.

Token streams: every split is read as one stream `s = [<eos>] + ids`; input position i predicts target s[i+1], so a
split of N tokens has exactly N targets (the leading `<eos>` is the context of the first word).
"""

from __future__ import annotations

import hashlib
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .artifacts import UserError, load_npy, read_json, save_npy, write_json

SPLITS = ("train", "valid", "test")
EOS, UNK = "<eos>", "<unk>"
FILE_PATTERNS = ("wiki.{}.tokens", "{}.txt")


def default_data_dir() -> Path:
    """`$KNNLM_DATA`, else the workspace's shared WikiText-2 copy beside the repository or the working folder."""
    if os.environ.get("KNNLM_DATA"):
        return Path(os.environ["KNNLM_DATA"])
    repo = Path(__file__).resolve().parent.parent
    for base in (Path.cwd(), repo):
        for up in (base, *base.parents):
            cand = up / "shared" / "data" / "wikitext-2"
            if cand.is_dir():
                return cand
    return repo.parent / "shared" / "data" / "wikitext-2"


def cache_root() -> Path:
    """`$KNNLM_CACHE`, default `~/.cache/knnlm`: what knnlm can rebuild (encoded corpora, the compiled search)."""
    return Path(os.environ.get("KNNLM_CACHE", Path.home() / ".cache" / "knnlm"))


def split_files(folder: Path) -> dict[str, Path]:
    """Map each split to its file, or say which files were expected."""
    if not folder.is_dir():
        raise UserError(f"{folder}: data folder not found (expected wiki.{{train,valid,test}}.tokens or "
                        "{train,valid,test}.txt); fetch WikiText-2 with `knnlm data wikitext-2`, "
                        "then set KNNLM_DATA=DIR or pass data.path=DIR")
    for pattern in FILE_PATTERNS:
        files = {s: folder / pattern.format(s) for s in SPLITS}
        present = [s for s, f in files.items() if f.is_file()]
        if len(present) == len(SPLITS):
            return files
        if present:
            missing = ", ".join(files[s].name for s in SPLITS if s not in present)
            raise UserError(f"{folder}: data folder has only some splits (missing {missing})")
    raise UserError(f"{folder}: no corpus files (expected wiki.{{train,valid,test}}.tokens or {{train,valid,test}}.txt)")


def iter_lines(path: Path):
    """Whitespace-split words of each line of a file, streamed (WikiText-103's train split is 540 MB)."""
    try:
        with open(path, encoding="utf-8", newline=None) as f:
            for line in f:
                yield line.split()
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text (byte {e.start} of a read block)") from None


def count_words(path: Path) -> Counter:
    counts: Counter = Counter()
    lines = 0
    for words in iter_lines(path):
        counts.update(words)
        lines += 1
    counts[EOS] += lines  # one <eos> per line
    return counts


def encode(path: Path, index: dict[str, int], unk: int, chunk: int = 1 << 20) -> np.ndarray:
    """int32 ids of a file, one <eos> after every line, built in chunks (memory ~ 4 bytes per token)."""
    eos = index[EOS]
    parts, buf = [], []
    for words in iter_lines(path):
        buf.extend(index.get(w, unk) for w in words)
        buf.append(eos)
        if len(buf) >= chunk:
            parts.append(np.array(buf, dtype=np.int32))
            buf = []
    parts.append(np.array(buf, dtype=np.int32))
    return np.concatenate(parts)


def build_vocab(counts: Counter) -> list[str]:
    """Types of the training split by descending count; ties keep first-occurrence order (Counter is stable)."""
    vocab = [w for w, _ in sorted(counts.items(), key=lambda kv: -kv[1])]
    if UNK not in counts:
        vocab.append(UNK)
    return vocab


def word_vocab_hash(vocab: list[str]) -> str:
    """Identity of a word-level vocabulary (its words in id order)."""
    return hashlib.sha256("\n".join(vocab).encode()).hexdigest()[:16]


@dataclass
class Corpus:
    """Encoded splits (int32 id arrays), the vocabulary and its identity hash.

    Word-level corpora have one id per word. Subword corpora (a Hugging Face tokenizer, `knnlm.hf`) also carry
    `word_counts`: per token, the number of words it completes, for per-word perplexity."""

    folder: Path
    vocab: list[str]
    splits: dict[str, np.ndarray]
    eos_id: int = -1
    word_counts: dict[str, np.ndarray] | None = None
    tokenizer_id: str = ""  # identity of a subword tokenizer; word-level corpora hash their vocabulary

    def __post_init__(self):
        if self.eos_id < 0:
            self.eos_id = self.vocab.index(EOS)

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    @property
    def vocab_hash(self) -> str:
        return self.tokenizer_id or word_vocab_hash(self.vocab)

    def words(self, split: str, n_tokens: int) -> int:
        """Words in the first n_tokens of a split (= tokens for a word-level corpus)."""
        if self.word_counts is None:
            return n_tokens
        return int(self.word_counts[split][:n_tokens].sum())

    def counts(self) -> np.ndarray:
        """Training-split frequency of every type, (V,)."""
        return np.bincount(self.splits["train"], minlength=self.vocab_size)


def corpus_files(folder: str | Path | None) -> tuple[Path, dict[str, Path]]:
    """The corpus folder (None: `default_data_dir()`) and its three non-empty split files."""
    folder = Path(folder) if folder else default_data_dir()
    files = split_files(folder)
    for s, f in files.items():
        if f.stat().st_size == 0:
            raise UserError(f"{f}: {s} split is empty")
    return folder, files


def cache_key(files: dict[str, Path]) -> str:
    """Identity of a corpus's content: its cache folder's name. Each split's name and byte length go in before its
    bytes, so corpora that differ only in where one split ends and the next begins never share a key."""
    h = hashlib.sha256(b"knnlm-corpus-v2")
    for s in SPLITS:
        with open(files[s], "rb") as f:
            size = os.fstat(f.fileno()).st_size
            h.update(f"\0{s}\0{size}\0".encode())
            read = 0
            while block := f.read(1 << 22):
                h.update(block)
                read += len(block)
        if read != size:
            raise UserError(f"{files[s]}: changed while it was read ({size} bytes, then {read})")
    return h.hexdigest()[:20]


def load_corpus(folder: str | Path | None = None) -> Corpus:
    """Read (or load from cache) the three splits of a corpus folder."""
    folder, files = corpus_files(folder)
    cache = cache_root() / f"corpus-{cache_key(files)}"
    if (cache / "meta.json").is_file():
        vocab = read_json(cache / "vocab.json", "vocabulary")
        return Corpus(folder, vocab, {s: load_npy(cache / f"{s}.npy") for s in SPLITS})

    counts = count_words(files["train"])
    if not any(w != EOS for w in counts):
        raise UserError(f"{files['train']}: train split has no words")
    vocab = build_vocab(counts)
    index = {w: i for i, w in enumerate(vocab)}
    # int32, not int16: WikiText-2 alone has 33,278 types.
    splits = {s: encode(files[s], index, index[UNK]) for s in SPLITS}
    try:
        for s in SPLITS:
            save_npy(cache / f"{s}.npy", splits[s])
        write_json(cache / "vocab.json", vocab)
        write_json(cache / "meta.json", {"folder": str(folder), "tokens": {s: len(a) for s, a in splits.items()},
                                         "vocab_size": len(vocab)})
    except OSError:
        pass  # an unwritable cache only costs time
    return Corpus(folder, vocab, splits)


def split_ids(corpus: Corpus, cfg, split: str) -> np.ndarray:
    """The ids of a split that a config reads: `data.max_train_tokens` of train, `data.max_eval_tokens` of valid
    and test (0: all)."""
    ids = corpus.splits[split]
    limit = cfg.data.max_train_tokens if split == "train" else cfg.data.max_eval_tokens
    return ids[:limit] if limit else ids


def token_stream(ids: np.ndarray, eos_id: int) -> torch.Tensor:
    """`[<eos>] + ids` as int64, (N+1,): input position i predicts target i+1, so N tokens give N targets."""
    return torch.from_numpy(np.concatenate([np.array([eos_id], dtype=np.int64), ids.astype(np.int64)]))


def num_train_blocks(n_tokens: int, context: int) -> int:
    return max(1, n_tokens // context)


def block_positions(block_ids: torch.Tensor, context: int, stream_len: int) -> torch.Tensor:
    """Input positions (B, T) of the given non-overlapping blocks of a stream of `stream_len` tokens: position i
    is also row i of the datastore (its key r_i, its next token s[i+1])."""
    idx = block_ids[:, None] * context + torch.arange(context)[None, :]  # (B, T)
    return idx.clamp(max=stream_len - 2)  # a short corpus (< one block) repeats its last token; never on real data


def train_batch(s: torch.Tensor, block_ids: torch.Tensor, context: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and targets (B, T) for the given non-overlapping blocks of the stream s."""
    idx = block_positions(block_ids, context, len(s))
    return s[idx], s[idx + 1]


def epoch_order(n_blocks: int, seed: int, epoch: int) -> torch.Tensor:
    """The shuffled block order of one epoch: a function of (seed, epoch) only, so resuming replays it exactly."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n_blocks, generator=g)


def sliding_windows(n: int, context: int, stride: int) -> list[tuple[int, int, int]]:
    """Windows (start, end, score_from) over input positions [0, n): every position is scored exactly once.

    A window feeds inputs [start, end) and scores positions [score_from, end); apart from the first window each
    scored position sees at least `context - stride` earlier tokens (kNN-LM: at least half a window).
    """
    assert 0 < stride <= context, "stride must be in (0, context]"
    windows, prev_end = [], 0
    end = min(context, n)
    while True:
        windows.append((max(0, end - context), end, prev_end))
        if end >= n:
            return windows
        prev_end, end = end, min(end + stride, n)

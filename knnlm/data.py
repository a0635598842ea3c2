"""Corpora: read a WikiText-style folder, build the vocabulary, encode and cache token ids, cut batches.

A corpus folder holds `wiki.{train,valid,test}.tokens` (WikiText) or `{train,valid,test}.txt`. Each line becomes
tokens and ends with one `<eos>`; the vocabulary is the training split's types sorted by frequency (the order
adaptive input/softmax needs), with `<unk>` for words unseen in training. How a line becomes tokens
(`data.tokenizer`, `TextTokenizer`):

    whitespace  split on whitespace (WikiText is already tokenized): the default
    words       raw text split into words, numbers, clitics ('s, n't) and single punctuation marks (WikiText-style)
    bpe         a byte-level BPE of `data.vocab_size` pieces learned from the training split (`tokenizers` library):
                no word is ever unknown

`data.lowercase` lower-cases the text first; `data.min_count` maps training words seen fewer times to `<unk>`, so
the LM learns what to predict for words it has not seen. The share of `<unk>` tokens of each split (the OOV rate) is
recorded; valid or test holding `<unk>` that training never had is warned about. Per-word perplexity counts the
whitespace words of the text plus one per line end, whatever the tokenizer (`Corpus.word_counts`).

Encoded ids (int32) are cached under `$KNNLM_CACHE` (default `~/.cache/knnlm`), keyed by the files' content and the
tokenizer settings, so a second run does not re-tokenize.

Token streams: every split is read as one stream `s = [<eos>] + ids`; input position i predicts target s[i+1], so a
split of N tokens has exactly N targets (the leading `<eos>` is the context of the first word).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .artifacts import UserError, load_npy, read_json, save_npy, write_json, write_text
from .config import TOKENIZERS, DataConfig

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


def read_lines(path: Path):
    """The lines of a UTF-8 file, streamed (WikiText-103's train split is 540 MB)."""
    try:
        with open(path, encoding="utf-8", newline=None) as f:
            yield from f
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text (byte {e.start} of a read block)") from None


def iter_lines(path: Path):
    """Whitespace-split words of each line of a file, streamed."""
    for line in read_lines(path):
        yield line.split()


# words: WikiText-style splitting of raw text; the alternatives are tried in order at each position
WORD_PATTERN = re.compile(r"""
      \w+(?=n't\b) | n't\b             # do n't, ca n't
    | '(?:s|re|ve|ll|d|m)\b            # clitics: game 's, they 're
    | \d+(?:[.,]\d+)+                  # numbers with a decimal point or thousands separators: 3.14, 1,000
    | \w+                               # words and numbers
    | [^\w\s]                           # every other character alone: punctuation, symbols
""", re.VERBOSE | re.IGNORECASE)


class TextTokenizer:
    """How the built-in model reads a line of text (`data.tokenizer`; see the module docstring)."""

    def __init__(self, kind: str = "whitespace", lowercase: bool = False, bpe=None):
        assert kind in TOKENIZERS and (bpe is not None) == (kind == "bpe"), "a bpe tokenizer needs its trained model"
        self.kind, self.lowercase, self.bpe = kind, lowercase, bpe

    def split(self, line: str) -> list[str]:
        """The tokens of one line (no end-of-line token)."""
        if self.lowercase:
            line = line.lower()
        if self.kind == "whitespace":
            return line.split()
        if self.kind == "words":
            return WORD_PATTERN.findall(line)
        words = line.split()
        return self.bpe.encode(" ".join(words)).tokens if words else []

    def join(self, tokens: list[str]) -> str:
        """Text of a line's tokens."""
        return self.bpe.decoder.decode(tokens) if self.kind == "bpe" else " ".join(tokens)

    def to_json(self) -> str:
        """The trained BPE model (bpe only), as `tokenizers` writes it."""
        return self.bpe.to_str()


def _require_tokenizers():
    try:
        import tokenizers
    except ImportError:
        raise UserError("data.tokenizer: bpe needs the `tokenizers` library: pip install 'knnlm[hf]'") from None
    return tokenizers


def train_bpe(path: Path, vocab_size: int, lowercase: bool) -> TextTokenizer:
    """A byte-level BPE of `vocab_size` pieces learned from a file's lines (whitespace-normalised, as read)."""
    tk = _require_tokenizers()
    bpe = tk.Tokenizer(tk.models.BPE())
    bpe.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = tk.decoders.ByteLevel()
    trainer = tk.trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS, UNK], show_progress=False,
                                     initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet())
    lines = (" ".join(words) for words in iter_lines(path))
    bpe.train_from_iterator((line.lower() for line in lines) if lowercase else lines, trainer)
    return TextTokenizer("bpe", lowercase, bpe)


def bpe_from_json(text: str, lowercase: bool) -> TextTokenizer:
    return TextTokenizer("bpe", lowercase, _require_tokenizers().Tokenizer.from_str(text))


def count_words(path: Path, tok: TextTokenizer | None = None) -> Counter:
    tok = tok or TextTokenizer()
    counts: Counter = Counter()
    lines = 0
    for line in read_lines(path):
        counts.update(tok.split(line))
        lines += 1
    counts[EOS] += lines  # one <eos> per line
    return counts


def encode(path: Path, index: dict[str, int], unk: int, chunk: int = 1 << 20, tok: TextTokenizer | None = None,
           with_words: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
    """int32 ids of a file, one <eos> after every line, built in chunks (memory ~ 4 bytes per token); and, if asked,
    per token the number of words it completes: the line's whitespace words + 1 for its end, put on its <eos>."""
    tok = tok or TextTokenizer()
    eos = index[EOS]
    parts, words, buf, wbuf = [], [], [], []
    for line in read_lines(path):
        ids = [index.get(w, unk) for w in tok.split(line)]
        buf.extend(ids)
        buf.append(eos)
        if with_words:
            wbuf.extend([0] * len(ids))
            wbuf.append(len(line.split()) + 1)
        if len(buf) >= chunk:
            parts.append(np.array(buf, dtype=np.int32))
            words.append(np.array(wbuf, dtype=np.int32))
            buf, wbuf = [], []
    parts.append(np.array(buf, dtype=np.int32))
    words.append(np.array(wbuf, dtype=np.int32))
    return np.concatenate(parts), np.concatenate(words) if with_words else None


def build_vocab(counts: Counter, min_count: int = 1) -> list[str]:
    """Types of the training split by descending count; ties keep first-occurrence order (Counter is stable).
    Types seen fewer than `min_count` times are left out: their occurrences count as <unk>'s."""
    if min_count > 1:
        rare = [w for w, c in counts.items() if c < min_count and w not in (EOS, UNK)]
        counts = Counter(counts)
        counts[UNK] += sum(counts.pop(w) for w in rare)
    vocab = [w for w, _ in sorted(counts.items(), key=lambda kv: -kv[1])]
    if UNK not in counts:
        vocab.append(UNK)
    return vocab


def word_vocab_hash(vocab: list[str]) -> str:
    """Identity of a word-level vocabulary (its words in id order)."""
    return hashlib.sha256("\n".join(vocab).encode()).hexdigest()[:16]


def tokenizer_settings(data: DataConfig | None) -> dict:
    """The `data` options that decide how text becomes ids (part of the cache key and of the vocabulary's identity)."""
    data = data or DataConfig()
    settings = {"tokenizer": data.tokenizer, "lowercase": data.lowercase, "min_count": data.min_count}
    if data.tokenizer == "bpe":
        settings["vocab_size"] = data.vocab_size
    return settings


DEFAULT_SETTINGS = tokenizer_settings(None)  # knnlm's original reading: whitespace words, as they are


def vocab_identity(vocab: list[str], settings: dict, bpe_json: str = "") -> str:
    """Identity of a built-in model's vocabulary: its words in id order (unchanged for the default reading, so
    existing runs keep their hash) and, for any other, the settings and the BPE model that make the ids."""
    if settings == DEFAULT_SETTINGS:
        return word_vocab_hash(vocab)
    h = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    h.update("\n".join(vocab).encode())
    h.update(bpe_json.encode())
    return h.hexdigest()[:16]


@dataclass
class Corpus:
    """Encoded splits (int32 id arrays), the vocabulary and its identity hash.

    Whitespace-read corpora have one id per word. Others (`words`, `bpe`, a Hugging Face tokenizer in `knnlm.hf`)
    also carry `word_counts`: per token, the number of words it completes, for per-word perplexity."""

    folder: Path
    vocab: list[str]
    splits: dict[str, np.ndarray]
    eos_id: int = -1
    word_counts: dict[str, np.ndarray] | None = None
    tokenizer_id: str = ""  # identity of the tokenizer and vocabulary; "" = the hash of the vocabulary alone
    tokenizer: TextTokenizer | None = None  # how the built-in model reads text (None: a Hugging Face tokenizer)
    digest: str = ""  # identity of the folder's content (`cache_key`): which text this is, wherever it lies

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

    def oov_rate(self, split: str, n_tokens: int | None = None) -> float:
        """Share of <unk> tokens among the first n_tokens of a split (0 for a tokenizer without <unk>)."""
        ids = self.splits[split][:n_tokens]
        if UNK not in self.vocab or len(ids) == 0 or self.tokenizer is None:
            return 0.0
        return float(np.count_nonzero(ids == self.vocab.index(UNK)) / len(ids))


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


def load_corpus(folder: str | Path | None = None, data: DataConfig | None = None) -> Corpus:
    """Read (or load from cache) the three splits of a corpus folder, tokenized as `data` says (default: whitespace).

    Prints the OOV rates when the corpus is first encoded, and warns (once per process) when valid or test hold
    <unk> tokens that training has none of, so that the LM never learned to predict them."""
    folder, files = corpus_files(folder)
    settings = tokenizer_settings(data)
    suffix = "" if settings == DEFAULT_SETTINGS else "-" + hashlib.sha256(
        json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]  # the default keeps its old cache folder
    key = cache_key(files)
    cache = cache_root() / f"corpus-{key}{suffix}"
    kind, lowercase = settings["tokenizer"], settings["lowercase"]
    per_word = kind != "whitespace"  # whitespace: one token per word
    if (cache / "meta.json").is_file():
        vocab = read_json(cache / "vocab.json", "vocabulary")
        tok = (bpe_from_json((cache / "tokenizer.json").read_text(encoding="utf-8"), lowercase) if kind == "bpe"
               else TextTokenizer(kind, lowercase))
        splits = {s: load_npy(cache / f"{s}.npy") for s in SPLITS}
        words = {s: load_npy(cache / f"{s}.words.npy") for s in SPLITS} if per_word else None
    else:
        tok = train_bpe(files["train"], settings["vocab_size"], lowercase) if kind == "bpe" else TextTokenizer(kind, lowercase)
        counts = count_words(files["train"], tok)
        if not any(w != EOS for w in counts):
            raise UserError(f"{files['train']}: train split has no words")
        vocab = build_vocab(counts, settings["min_count"])
        if kind == "bpe":  # pieces the training split never uses still read valid and test: no <unk>
            seen = set(vocab)
            vocab += [p for p, _ in sorted(tok.bpe.get_vocab().items(), key=lambda kv: kv[1]) if p not in seen]
        index = {w: i for i, w in enumerate(vocab)}
        # int32, not int16: WikiText-2 alone has 33,278 types.
        encoded = {s: encode(files[s], index, index[UNK], tok=tok, with_words=per_word) for s in SPLITS}
        splits = {s: ids for s, (ids, _) in encoded.items()}
        words = {s: w for s, (_, w) in encoded.items()} if per_word else None
        try:
            for s in SPLITS:
                save_npy(cache / f"{s}.npy", splits[s])
                if per_word:
                    save_npy(cache / f"{s}.words.npy", words[s])
            if kind == "bpe":
                write_text(cache / "tokenizer.json", tok.to_json())
            write_json(cache / "vocab.json", vocab)
        except OSError:
            pass  # an unwritable cache only costs time
    tid = "" if settings == DEFAULT_SETTINGS else vocab_identity(vocab, settings, tok.to_json() if kind == "bpe" else "")
    corpus = Corpus(folder, vocab, splits, word_counts=words, tokenizer_id=tid, tokenizer=tok, digest=key)
    oov = {s: corpus.oov_rate(s) for s in SPLITS}
    if not (cache / "meta.json").is_file():
        print(f"corpus {folder}: " + ", ".join(f"{s} {len(splits[s]):,} tokens ({100 * oov[s]:.2f}% <unk>)"
                                                for s in SPLITS) + f"; {len(vocab):,} types ({kind})", file=sys.stderr)
        try:
            write_json(cache / "meta.json", {"folder": str(folder), "tokens": {s: len(a) for s, a in splits.items()},
                                             "vocab_size": len(vocab), "tokenizer": settings, "oov_rate": oov})
        except OSError:
            pass
    _warn_unseen_unk(folder, cache.name, oov)
    return corpus


def load_corpus_with_vocab(folder: str | Path, vocab: list[str], tok: TextTokenizer, vocab_id: str) -> Corpus:
    """Another corpus read as a trained model reads text: every split encoded with that model's vocabulary and
    tokenizer (`vocab_id`: their identity, the checkpoint's `vocab_hash`), words it never saw becoming `<unk>`.

    This is how a run reads a domain's text (a named datastore, its valid and test): the ids mean what they meant
    in training, so the model's checks pass. The OOV rates are printed when the corpus is first encoded (cached
    under `$KNNLM_CACHE`, keyed by the content and the vocabulary)."""
    folder, files = corpus_files(folder)
    key = cache_key(files)
    cache = cache_root() / f"corpus-{key}-vocab-{vocab_id}"
    per_word = tok.kind != "whitespace"
    if (cache / "meta.json").is_file():
        splits = {s: load_npy(cache / f"{s}.npy") for s in SPLITS}
        words = {s: load_npy(cache / f"{s}.words.npy") for s in SPLITS} if per_word else None
    else:
        index = {w: i for i, w in enumerate(vocab)}
        unk = index.get(UNK)
        if unk is None and tok.kind != "bpe":
            raise UserError(f"{folder}: the run's vocabulary has no {UNK} for the words it never saw")
        encoded = {s: encode(files[s], index, -1 if unk is None else unk, tok=tok, with_words=per_word)
                   for s in SPLITS}
        splits = {s: ids for s, (ids, _) in encoded.items()}
        words = {s: w for s, (_, w) in encoded.items()} if per_word else None
        if any(int(a.min(initial=0)) < 0 for a in splits.values()):
            raise UserError(f"{folder}: a piece outside the run's vocabulary (its BPE model was changed?)")
    corpus = Corpus(folder, vocab, splits, word_counts=words, tokenizer_id=vocab_id, tokenizer=tok, digest=key)
    if not (cache / "meta.json").is_file():
        oov = {s: corpus.oov_rate(s) for s in SPLITS}
        print(f"corpus {folder}, read with the run's vocabulary: " + ", ".join(
            f"{s} {len(splits[s]):,} tokens ({100 * oov[s]:.2f}% <unk>)" for s in SPLITS), file=sys.stderr)
        try:
            for s in SPLITS:
                save_npy(cache / f"{s}.npy", splits[s])
                if per_word:
                    save_npy(cache / f"{s}.words.npy", words[s])
            write_json(cache / "meta.json", {"folder": str(folder), "vocab": vocab_id, "oov_rate": oov,
                                             "tokens": {s: len(a) for s, a in splits.items()}})
        except OSError:
            pass  # an unwritable cache only costs time
    return corpus


_WARNED: set[str] = set()


def _warn_unseen_unk(folder: Path, key: str, oov: dict[str, float]) -> None:
    """Warn once per corpus and process when valid/test hold <unk> but training has none: the LM never saw it."""
    held = [f"{s} {100 * oov[s]:.2f}%" for s in ("valid", "test") if oov[s] > 0]
    if oov["train"] > 0 or not held or key in _WARNED:
        return
    _WARNED.add(key)
    print(f"warning: {folder}: <unk> tokens in {' and '.join(held)} of the text, none in train, so the LM never "
          f"learned to predict <unk>; set data.min_count=2 (rare training words become <unk>) or "
          f"data.tokenizer=bpe (no unknown words)", file=sys.stderr)


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

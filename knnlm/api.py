"""Use a finished run from Python: score text, read next-token distributions, generate.

    import knnlm
    lm = knnlm.load("runs/wt2")                    # model, datastore, search and the run's tuned settings
    scored = lm.score("the cat sat on the mat")    # per token: LM, kNN and interpolated log-probabilities
    logp = lm.next_token_logprobs("the cat")       # (V,) interpolated log-probabilities over the vocabulary
    lm.generate("the cat", max_tokens=20, top_p=0.9, seed=0)  # or a list of prompts; KV-cached

Text is read as a corpus file is: each line's whitespace-separated words (or a Hugging Face tokenizer's pieces of
them) followed by one end-of-line token, after a leading one. `score` scores every token of the text, line ends
included, with the same sliding windows, precision and search as `knnlm evaluate`, so its log-probabilities agree
with an evaluation of the same text. `next_token_logprobs` and `generate` read the context as it stands (no
end-of-line after its last line).

The kNN distribution over the whole vocabulary spreads softmax(−d / knn_temperature) of the k nearest keys over their
next tokens: p_kNN(w) = Σ_{j ≤ k: v_j = w} softmax(−d/T)_j, and p = λ p_kNN + (1 − λ) p_LM. The settings (k,
knn_temperature, λ) are the run's choice on valid under a protocol (`tuned` or `paper`, see `knnlm.evaluate`), or
given explicitly.

A named datastore of the run (`knnlm.load(run, datastore="vim")`, built by `knnlm datastore --out RUN --name vim
data.path=DIR`, a domain's text for the same model) replaces the run's own: its search, and its settings as
`knnlm evaluate --out RUN --datastore vim` chose them on that text's valid split.

With a memory model (`knnlm.load(run, memory="runs/mem")`, trained on the run's `knnlm targets`, evaluated by
`knnlm evaluate --out RUN --memory MEM`), the LM part is the pair: p_LM = μ p_memory + (1 − μ) p_base, μ the
`memory_lambda` tuned on valid, and the kNN settings are those tuned on top of the pair; `lmbda=0` uses the pair
alone, with no retrieval.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .artifacts import UserError, read_json
from .checkpoint import load_model
from .config import read_run_config
from .data import (EOS, UNK, TextTokenizer, bpe_from_json, split_ids, token_stream, tokenizer_settings,
                   vocab_identity)
from .datastore import Datastore, datastore_home, neighbour_values
from .distributed import default_device
from .evaluate import PROTOCOLS, check_memory_summary, scoring_settings, searcher_for, valid_choices
from .hf import hf_eos_id, load_tokenizer
from .knn import interpolate, knn_logprob, knn_logprobs_full
from .lm import DecodeCache, autocast
from .models import corpus_for, corpus_for_run
from .scoring import score_stream


SEARCH_CHUNK = 8192  # queries `score` searches at once: (n, k) neighbours of this many tokens are in memory at a time


@dataclass
class Scored:
    """Per-token log-probabilities (natural log) of a scored text, in text order."""

    tokens: list[str]
    lm: np.ndarray  # log p_LM(token)
    knn: np.ndarray  # log p_kNN(token); −inf where no neighbour carries it
    logprobs: np.ndarray  # log(λ p_kNN + (1 − λ) p_LM)
    words: int = 0  # whitespace words of the text + one per line end (0: one per token)

    @property
    def ppl(self) -> float:
        return float(np.exp(-np.mean(self.logprobs)))

    @property
    def word_ppl(self) -> float:
        """Perplexity per word: the same total loss over the text's words, whatever the tokenizer."""
        return float(np.exp(-np.sum(self.logprobs) / (self.words or len(self.logprobs))))

    @property
    def lm_ppl(self) -> float:
        return float(np.exp(-np.mean(self.lm)))

    def rows(self) -> list[dict]:
        return [{"token": t, "lm": float(a), "knn": float(b), "knnlm": float(c)}
                for t, a, b, c in zip(self.tokens, self.lm, self.knn, self.logprobs)]


@dataclass
class Neighbours:
    """The k nearest stored keys of one query, nearest first: datastore rows (= positions of the training stream),
    squared L2 distances, the tokens that followed them, and the training text around each."""

    ids: np.ndarray  # (k,) datastore rows
    distances: np.ndarray  # (k,) squared L2 distances to the query key
    next_ids: np.ndarray  # (k,) the token that followed each stored key (its value)
    next_tokens: list[str]
    before: list[str]  # the training text that led up to each (up to `window` tokens)
    after: list[str]  # the training text after the next token

    def rows(self) -> list[dict]:
        return [{"id": int(i), "distance": float(d), "next": t, "before": b, "after": a}
                for i, d, t, b, a in zip(self.ids, self.distances, self.next_tokens, self.before, self.after)]


class KNNLM:
    """A trained run ready for inference: its model, vocabulary or tokenizer, datastore and search."""

    def __init__(self, run: str | Path, protocol: str = "tuned", k: int | None = None,
                 knn_temperature: float | None = None, lmbda: float | None = None, index: str | None = None,
                 memory: str | Path | None = None, memory_lambda: float | None = None,
                 temperature: float | None = None, datastore: str | None = None):
        if temperature is not None:  # the old name of the kNN temperature; generate's `temperature` samples
            warnings.warn("knnlm.load(temperature=...) is deprecated: the kNN temperature is knn_temperature",
                          DeprecationWarning, stacklevel=3)
            if knn_temperature is not None and knn_temperature != temperature:
                raise UserError(f"knn_temperature: {knn_temperature} and its deprecated alias temperature: "
                                f"{temperature} disagree; give knn_temperature alone")
            knn_temperature = temperature
        self.run = Path(run)
        self.home = datastore_home(self.run, datastore)  # the run folder, or RUN/datastores/NAME
        self.datastore_name = datastore
        if datastore is not None and memory is not None:
            raise UserError("memory: is evaluated with the run's own datastore; leave out datastore or memory")
        self.cfg = read_run_config(self.run)
        if index is not None:
            self.cfg.eval.index = index
        self.model, self.train_cfg, ckpt_meta = load_model(self.run, default_device())
        self.ckpt_meta = ckpt_meta
        self.memory, self.memory_model, self.memory_lambda = None, None, 0.0
        if memory is not None:
            self._memory(Path(memory), ckpt_meta, memory_lambda)
        self.datastore = Datastore(self.home / "datastore")
        self.datastore.check_model(ckpt_meta)
        self.stride, self.bf16 = scoring_settings(self.datastore, self.train_cfg)
        self.k, self.knn_temperature, self.lmbda = self._settings(protocol, k, knn_temperature, lmbda)
        if self.k > len(self.datastore):
            raise UserError(f"k: {self.k} is more than the datastore's {len(self.datastore)} keys")
        self.datastore.check_vals(ckpt_meta["vocab_size"])  # p_kNN is spread over the LM's vocabulary
        self.searcher = searcher_for(self.datastore, self.cfg, k=self.k)
        self._vocabulary(ckpt_meta)

    def _settings(self, protocol: str, k, temperature, lmbda) -> tuple[int, float, float]:
        """Explicit values, else the run's choice on valid under `protocol`."""
        chosen = {}
        if None in (k, temperature, lmbda):
            if protocol not in PROTOCOLS:
                raise UserError(f"protocol: expected one of {', '.join(PROTOCOLS)}, got {protocol!r}")
            summary = (self.memory / "memory_eval" if self.memory else self.home / "eval") / "valid" / "summary.json"
            if not summary.is_file():
                memory = (f" --memory {self.memory}" if self.memory else
                          f" --datastore {self.datastore_name}" if self.datastore_name else "")
                raise UserError(f"{summary}: not found; run `knnlm evaluate --out {self.run}{memory}` first, "
                                f"or give k, knn_temperature and lmbda")
            # checked like options: k an integer up to the datastore's size, temperature finite > 0, λ in [0, 1]
            chosen = valid_choices(summary, len(self.datastore), "the datastore's keys")[protocol]
        k = chosen["k"] if k is None else k
        temperature = float(chosen["temperature"] if temperature is None else temperature)
        lmbda = float(chosen["lambda"] if lmbda is None else lmbda)
        if isinstance(k, bool) or not isinstance(k, int) or k < 1 or not temperature > 0 \
                or not math.isfinite(temperature) or not 0 <= lmbda <= 1:
            raise UserError(f"expected k ≥ 1, a finite knn_temperature > 0 and λ in [0, 1], got {k}, {temperature}, {lmbda}")
        return k, temperature, lmbda

    def _memory(self, memory: Path, ckpt_meta: dict, memory_lambda: float | None) -> None:
        """Load a memory model beside the base LM, with its mixing weight μ (given, or tuned on valid)."""
        self.memory = memory
        self.memory_model, _, mem_meta = load_model(memory, default_device())
        if mem_meta["vocab_hash"] != ckpt_meta["vocab_hash"]:
            raise UserError(f"memory: {memory} was trained with another vocabulary than {self.run}")
        if memory_lambda is None:
            path = memory / "memory_eval" / "valid" / "summary.json"
            if not path.is_file():
                raise UserError(f"{path}: not found; run `knnlm evaluate --out {self.run} --memory {memory}` first, "
                                "or give memory_lambda")
            memory_lambda = check_memory_summary(read_json(path, "memory valid summary"), path)["memory_lambda"]
        if not 0 <= memory_lambda <= 1:
            raise UserError(f"memory_lambda: expected a value in [0, 1], got {memory_lambda}")
        self.memory_lambda = float(memory_lambda)

    def _vocabulary(self, ckpt_meta: dict) -> None:
        """The word list (word-level runs: RUN/vocab.json, or the corpus for older runs) or the tokenizer."""
        self.tokenizer, self.text_tokenizer = None, None
        if self.train_cfg.model.hf_path:
            self.tokenizer = load_tokenizer(self.train_cfg.model.hf_path)
            self.vocab = self.tokenizer.convert_ids_to_tokens(list(range(len(self.tokenizer))))
            self.eos_id = hf_eos_id(self.tokenizer)
            return
        saved, data = self.run / "vocab.json", self.train_cfg.data
        if saved.is_file():
            self.vocab = read_json(saved, "vocabulary")
            if data.tokenizer == "bpe":
                bpe = self.run / "tokenizer.json"
                if not bpe.is_file():
                    raise UserError(f"{bpe}: not found (the run's BPE tokenizer, written by `knnlm train`)")
                self.text_tokenizer = bpe_from_json(bpe.read_text(encoding="utf-8"), data.lowercase)
            else:
                self.text_tokenizer = TextTokenizer(data.tokenizer, data.lowercase)
        else:  # runs from before vocab.json was written
            corpus = corpus_for(self.train_cfg)
            self.vocab, self.text_tokenizer = corpus.vocab, corpus.tokenizer
        bpe = self.text_tokenizer.to_json() if self.text_tokenizer.kind == "bpe" else ""
        if vocab_identity(self.vocab, tokenizer_settings(data), bpe) != ckpt_meta["vocab_hash"]:
            raise UserError(f"{saved}: vocabulary differs from the one the checkpoint was trained with")
        self.index = {w: i for i, w in enumerate(self.vocab)}
        self.eos_id, self.unk_id = self.index[EOS], self.index.get(UNK, -1)

    # text <-> ids

    def encode(self, text: str, close_last_line: bool = True) -> np.ndarray:
        """Token ids of a text read as a corpus file: each line's tokens, then the end-of-line token (after the
        last line only if `close_last_line`)."""
        lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
        if lines and lines[-1] == "" and len(lines) > 1:
            lines.pop()  # a final newline ends the last line; it does not open another
            close_last_line = True
        ids: list[int] = []
        for n, line in enumerate(lines):
            if self.tokenizer is not None:
                words = line.split()
                ids.extend(self.tokenizer.encode(" ".join(words), add_special_tokens=False) if words else [])
            else:
                for w in self.text_tokenizer.split(line):
                    if w not in self.index and self.unk_id < 0:
                        raise UserError(f"{w!r}: not in the vocabulary, which has no {UNK}")
                    ids.append(self.index.get(w, self.unk_id))
            if n < len(lines) - 1 or close_last_line:
                ids.append(self.eos_id)
        return np.asarray(ids, dtype=np.int32)

    def decode(self, ids) -> str:
        """Text of token ids; the end-of-line token becomes a newline."""
        lines, line = [], []
        for i in map(int, ids):
            if i == self.eos_id:
                lines.append(line)
                line = []
            else:
                line.append(i)
        lines.append(line)
        if self.tokenizer is not None:
            return "\n".join(self.tokenizer.decode(li) for li in lines)
        return "\n".join(self.text_tokenizer.join([self.vocab[i] for i in li]) for li in lines)

    # probabilities

    def _knn_search(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Distances (n, k) and next tokens (n, k) of the k nearest stored keys of each query key."""
        D, I = self.searcher.search(np.asarray(keys, dtype=np.float32), self.k)
        return D, neighbour_values(self.datastore.vals, I)

    def score(self, text: str) -> Scored:
        """LM, kNN and interpolated log-probabilities of every token of `text` (line ends included)."""
        if not text:  # it would be scored as one end-of-line token
            raise UserError("score: the text is empty")
        ids = self.encode(text)
        if len(ids) == 0:
            raise UserError("score: the text has no tokens")
        s = token_stream(ids, self.eos_id)
        batch = self.cfg.datastore.batch_size
        memory = None if self.memory_model is None else \
            score_stream(self.memory_model, s, self.stride, batch, self.bf16, want_keys=False)  # the same windows
        targets, lm, knn, pending = [], [], [], []

        def search_pending() -> None:  # the keys gathered so far: searched, their p_kNN kept, then dropped
            keys, t = np.concatenate([k for k, _ in pending]), np.concatenate([t for _, t in pending])
            D, vals = self._knn_search(keys)
            knn.append(knn_logprob(D, vals, t, self.k, self.knn_temperature))
            pending.clear()

        # keys are searched SEARCH_CHUNK queries at a time and dropped with their (n, k) neighbours, so memory holds
        # per-token numbers and one chunk, whatever the text's length (a 1 MB text: benchmarks/score_memory.py)
        for keys, t, lp in score_stream(self.model, s, self.stride, batch, self.bf16):
            t, lp = t.numpy(), lp.numpy().astype(np.float64)
            if memory is not None:  # the pair: μ p_memory + (1 − μ) p_base
                lp = interpolate(lp, next(memory)[2].numpy().astype(np.float64), self.memory_lambda)
            targets.append(t), lm.append(lp), pending.append((keys.numpy(), t))
            if sum(len(x) for x, _ in pending) >= SEARCH_CHUNK:
                search_pending()
        if pending:
            search_pending()
        targets, lm, knn = np.concatenate(targets), np.concatenate(lm), np.concatenate(knn)
        lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
        words = len(text.split()) + len(lines) - (len(lines) > 1 and lines[-1] == "")  # each line's end is one
        return Scored([self.vocab[i] for i in targets], lm, knn, interpolate(lm, knn, self.lmbda), words)

    @property
    def temperature(self) -> float:
        """Deprecated name of `knn_temperature` (generate's `temperature` is the sampling temperature)."""
        warnings.warn("KNNLM.temperature is deprecated: use knn_temperature", DeprecationWarning, stacklevel=2)
        return self.knn_temperature

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def next_token_logprobs(self, context: str | np.ndarray) -> torch.Tensor:
        """log p(w | context) for every w of the vocabulary, (V,) float64: the LM's full softmax mixed with the kNN
        distribution of the last position's k nearest keys."""
        ids = self.encode(context, close_last_line=False) if isinstance(context, str) else np.asarray(context)
        return self._next_logprobs(token_stream(ids, self.eos_id)[None], None)[0]

    def _run(self, model, streams: torch.Tensor, cache: DecodeCache | None):
        """The model's output at the last position of each stream (B, n), (B, d) hidden and key. With a cache, only
        the tokens it has not seen are run; once the streams outgrow the context, the last window is recomputed
        (the window slides, and cached keys and values would sit at other positions)."""
        T = model.cfg.context
        if cache is None or streams.shape[1] > T or cache.length >= streams.shape[1]:
            out = model(streams[:, -T:].to(self.device))
        else:
            out = model(streams[:, cache.length :].to(self.device), cache)
        return out.hidden[:, -1], out.key[:, -1]

    @torch.no_grad()
    def _next_logprobs(self, streams: torch.Tensor, caches: list[DecodeCache] | None) -> torch.Tensor:
        """(B, V) float64 log-probabilities of the next token after each row of `streams` (B, n), the <eos>-led
        token streams; `caches`: one per model (the LM, then the memory model), or None to recompute."""
        with autocast(self.device, self.bf16):
            hidden, key = self._run(self.model, streams, caches[0] if caches else None)
            lm = self.model.full_logprobs(hidden).float().double().cpu()  # (B, V)
            if self.memory_model is not None:  # the pair: μ p_memory + (1 − μ) p_base
                mem_hidden, _ = self._run(self.memory_model, streams, caches[1] if caches else None)
                mem = self.memory_model.full_logprobs(mem_hidden).float().double().cpu()
                lm = torch.from_numpy(interpolate(lm.numpy(), mem.numpy(), self.memory_lambda))
        return self.mix_knn(lm, key)

    def mix_knn(self, lm: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
        """log(λ p_kNN + (1 − λ) p_LM), (B, V) float64, from the LM's log-probabilities (B, V) and the query keys
        (B, d): p_kNN spreads softmax(−d / knn_temperature) of each key's k nearest stored keys over their tokens."""
        q = key.to(torch.float16).cpu().numpy()  # stored keys are float16: search the same rounding
        D, vals = self._knn_search(q)  # (B, k) each
        log_p_knn = knn_logprobs_full(D, vals, lm.shape[1], self.knn_temperature)  # (B, V)
        lm = lm.double()
        if self.lmbda in (0, 1):
            return lm if self.lmbda == 0 else log_p_knn
        return torch.logaddexp(math.log(self.lmbda) + log_p_knn, math.log1p(-self.lmbda) + lm)

    @torch.no_grad()
    def neighbours(self, context: str | np.ndarray, k: int | None = None, window: int = 12) -> Neighbours:
        """The k (default: the run's k) stored keys nearest to the key that predicts the token after `context`
        (the query `next_token_logprobs` searches), with the training text around each: `window` tokens before the
        token that followed it, and `window` after (fewer than k where an approximate index finds fewer)."""
        k = self.k if k is None else k
        if not 1 <= k <= len(self.datastore):
            raise UserError(f"k: expected 1 … {len(self.datastore)} (the datastore's keys), got {k}")
        ids = self.encode(context, close_last_line=False) if isinstance(context, str) else np.asarray(context)
        with autocast(self.device, self.bf16):
            _, key = self._run(self.model, token_stream(ids, self.eos_id)[None], None)
        D, I = self.searcher.search(key.to(torch.float16).float().cpu().numpy(), k)
        found = I[0] >= 0  # an approximate index may find fewer than k: its padded answers (id −1) are left out
        rows, dists = I[0][found].astype(np.int64), D[0][found]
        s = self._train_stream()  # row i is input position i of the training stream; it predicts s[i + 1]
        assert np.array_equal(s[rows + 1], self.datastore.vals[rows]), "datastore rows are training positions"
        text = lambda a, b: self.decode(s[max(a, 0) : b])  # noqa: E731
        return Neighbours(rows, dists, s[rows + 1], [self.vocab[i] for i in s[rows + 1]],
                          [text(i + 1 - window, i + 1) for i in rows], [text(i + 2, i + 2 + window) for i in rows])

    def _train_stream(self) -> np.ndarray:
        """The training split's token stream the datastore was written from (`[<eos>] + ids`), read once."""
        if getattr(self, "_train", None) is None:
            if self.datastore_name is None:
                corpus = corpus_for(self.cfg)  # as `knnlm datastore` read it: the run's config
            else:  # a named datastore's own text, read with the run's vocabulary as when it was built
                data = dataclasses.replace(self.cfg.data, path=self.datastore.meta.get("corpus", ""))
                corpus = corpus_for_run(self.run, dataclasses.replace(self.cfg, data=data), self.ckpt_meta)
            self._train = token_stream(split_ids(corpus, self.cfg, "train"), corpus.eos_id).numpy()
            if len(self._train) - 1 != len(self.datastore):
                raise UserError(f"{self.datastore.folder}: {len(self.datastore)} keys, but the training split "
                                f"reads {len(self._train) - 1} tokens now (has the corpus changed?)")
        return self._train

    def generate(self, prompt: str | list[str], max_tokens: int = 50, greedy: bool = False,
                 temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, seed: int | None = None,
                 stop_at_eos: bool = False, cache: bool = True) -> str | list[str]:
        """Continue `prompt` (or each of a list of prompts) by `max_tokens` tokens of the kNN-LM: greedy, or sampled
        from its distribution sharpened by `temperature` (the sampling temperature; the kNN's is `knn_temperature`)
        and cut to the `top_k` most likely tokens and the smallest set holding `top_p` of the mass.

        Prompts of the same length in tokens are decoded together, one batch (one forward pass and one search per
        step for all of them); `cache` keeps each block's keys and values between steps (KV caching) instead of
        running the whole window again, until the text outgrows the context window. A list of prompts gives a list
        of continuations; a seed reproduces the draws of the same call."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        ids = [list(self.encode(p, close_last_line=False)) for p in prompts]
        new = self.generate_ids(ids, max_tokens, greedy, temperature, top_k, top_p, seed, stop_at_eos, cache)
        texts = [self.decode(n) for n in new]
        return texts[0] if isinstance(prompt, str) else texts

    @torch.no_grad()
    def generate_ids(self, prompts: list[list[int]], max_tokens: int = 50, greedy: bool = False,
                     temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, seed: int | None = None,
                     stop_at_eos: bool = False, cache: bool = True) -> list[list[int]]:
        """`generate` on token ids (the prompt without the leading end-of-line token): the new ids of each prompt."""
        if max_tokens < 0 or not 0 < temperature < math.inf or top_k < 0 or not 0 < top_p <= 1:
            raise UserError(f"generate: expected max_tokens ≥ 0, a finite sampling temperature > 0, top_k ≥ 0 and "
                            f"0 < top_p ≤ 1, got {max_tokens}, {temperature}, {top_k}, {top_p}")
        if seed is not None and not 0 <= seed < 2**64:  # what torch.Generator.manual_seed takes
            raise UserError(f"generate: expected a seed in [0, 2^64), got {seed}")
        g = torch.Generator().manual_seed(seed) if seed is not None else None
        new: list[list[int]] = [[] for _ in prompts]
        batches: dict[int, list[int]] = {}
        for i, p in enumerate(prompts):  # prompts of one length share a batch: no padding, the same positions
            batches.setdefault(len(p), []).append(i)
        for rows in batches.values():
            streams = torch.stack([token_stream(np.asarray(prompts[i], dtype=np.int32), self.eos_id) for i in rows])
            caches = [DecodeCache() for _ in range(1 + (self.memory_model is not None))] if cache else None
            done = [False] * len(rows)
            for _ in range(max_tokens):
                logp = self._next_logprobs(streams, caches)  # (B, V)
                nxt = [int(lp.argmax()) if greedy else int(sample(lp, temperature, top_k, top_p, g)) for lp in logp]
                for r, (i, t) in enumerate(zip(rows, nxt)):
                    if not done[r]:
                        new[i].append(t)
                        done[r] = stop_at_eos and t == self.eos_id
                if all(done):
                    break
                streams = torch.cat([streams, torch.tensor(nxt, dtype=streams.dtype)[:, None]], 1)
        return new


def sample(logp: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
           generator: torch.Generator | None = None) -> int:
    """One id drawn from softmax(logp / temperature), restricted to the top_k most likely ids (0: all) and to the
    smallest set of most likely ids whose probability reaches top_p."""
    logp = logp.double()
    # shifted so that the most likely id is at 0: a tiny temperature sends the others to −inf, never all of them
    # (−inf / T is −inf, a finite T keeps NaN out)
    logits = (logp - logp.max()) / temperature
    order = torch.argsort(logits, descending=True)
    keep = len(order) if top_k <= 0 else min(top_k, len(order))
    probs = torch.softmax(logits[order[:keep]], 0)
    if top_p < 1:
        cum = torch.cumsum(probs, 0)
        keep = int(torch.searchsorted(cum, torch.tensor([top_p], dtype=cum.dtype)).item()) + 1
        probs = probs[: min(keep, len(probs))]
    choice = torch.multinomial(probs / probs.sum(), 1, generator=generator)
    return int(order[choice])


def load(run: str | Path, protocol: str = "tuned", **settings) -> KNNLM:
    """A finished run ready for inference: its model, vocabulary or tokenizer, datastore and exact search.

    Args:
        run: a run folder that `knnlm run` (or `knnlm train`, `knnlm datastore` and `knnlm evaluate`) has finished:
            RUN/checkpoints, RUN/datastore and, unless k, temperature and lmbda are all given, RUN/eval/valid.
        protocol: whose choice of k, kNN temperature and λ on valid to use: "tuned" (all three tuned) or "paper"
            (temperature 1, k = 1024 or eval.k_max, λ tuned; Khandelwal et al. 2020).
        **settings: any of `k` (neighbours), `knn_temperature` (T of p_kNN ∝ exp(−d/T); `temperature` is its
            deprecated alias, since generate's `temperature` is the sampling one), `lmbda` (weight
            of p_kNN in λ p_kNN + (1 − λ) p_LM), each replacing the run's choice; `index` (a search backend or
            FAISS factory string instead of the run's eval.index); `memory` (a memory model's run folder) and
            `memory_lambda` (its mixing weight μ, else the one tuned by `knnlm evaluate --memory`); `datastore`
            (the name of a datastore `knnlm datastore --name` built for the run, e.g. a domain's, instead of the run's
            own: its settings are those `knnlm evaluate --datastore NAME` chose on that text's valid split).

    Returns:
        A `KNNLM`: `.score(text)` gives per-token LM, kNN and kNN-LM log-probabilities (a `Scored`, with `.ppl`);
        `.next_token_logprobs(context)` the (V,) log-distribution of the next token; `.generate(prompt, ...)` a
        continuation (KV-cached; a list of prompts, batched); `.k`, `.knn_temperature`, `.lmbda` the settings.

    Raises:
        knnlm.UserError: the folder lacks a finished step, or a setting is out of range.

    Example:
        >>> import knnlm
        >>> lm = knnlm.load("runs/tiny")                        # doctest: +SKIP
        >>> lm.score("the game was released in 2010 .").ppl     # doctest: +SKIP
        >>> lm.generate("the game was", max_tokens=10, greedy=True)  # doctest: +SKIP
    """
    return KNNLM(run, protocol, **settings)

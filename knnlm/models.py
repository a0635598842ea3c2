"""The two kinds of language model a config can name, and what each reads.

`model.hf_path` empty: the built-in Transformer (`knnlm.model`) on a word-level corpus (`knnlm.data`); set: a local
Hugging Face causal LM on the corpus tokenized by its own tokenizer (`knnlm.hf`). Both are `knnlm.lm.LanguageModel`s,
so training, the datastore writer and evaluation call `corpus_for` and `build_model` and never ask which one it is.
"""

from __future__ import annotations

from pathlib import Path

from .artifacts import UserError, read_json
from .config import Config, ModelConfig, from_dict
from .data import (Corpus, TextTokenizer, bpe_from_json, load_corpus, load_corpus_with_vocab, tokenizer_settings,
                   vocab_identity)
from .hf import HFCausalLM, load_hf_corpus
from .lm import LanguageModel
from .model import TransformerLM


def corpus_for(cfg: Config) -> Corpus:
    """The corpus a config reads: word-level, or tokenized by the Hugging Face model it names."""
    if cfg.model.hf_path:
        return load_hf_corpus(cfg.data.path or None, cfg.model.hf_path)
    return load_corpus(cfg.data.path or None, cfg.data)


def run_vocabulary(run: str | Path, ckpt_meta: dict) -> tuple[list[str], TextTokenizer]:
    """A word-level run's vocabulary (id order) and how it splits text: RUN/vocab.json (and RUN/tokenizer.json for
    BPE) as `knnlm train` wrote them, checked against the checkpoint's vocabulary hash; runs from before vocab.json
    was written re-read their training corpus."""
    run = Path(run)
    train_cfg = from_dict(ckpt_meta["config"], ckpt_meta["path"])
    data, saved = train_cfg.data, run / "vocab.json"
    if not saved.is_file():
        corpus = corpus_for(train_cfg)
        return corpus.vocab, corpus.tokenizer
    vocab = read_json(saved, "vocabulary")
    if data.tokenizer == "bpe":
        bpe = run / "tokenizer.json"
        if not bpe.is_file():
            raise UserError(f"{bpe}: not found (the run's BPE tokenizer, written by `knnlm train`)")
        tok = bpe_from_json(bpe.read_text(encoding="utf-8"), data.lowercase)
    else:
        tok = TextTokenizer(data.tokenizer, data.lowercase)
    if vocab_identity(vocab, tokenizer_settings(data), tok.to_json() if tok.kind == "bpe" else "") != ckpt_meta["vocab_hash"]:
        raise UserError(f"{saved}: vocabulary differs from the one the checkpoint was trained with")
    return vocab, tok


def corpus_for_run(run: str | Path, cfg: Config, ckpt_meta: dict) -> Corpus:
    """The corpus `cfg.data.path` names, read as the run's model reads text.

    The run's own corpus (the `data.path` it was trained with) is read as in training and must give the
    checkpoint's vocabulary. Any other folder is a new text for the trained model (a domain): a Hugging Face model
    reads it with its own tokenizer, the built-in model with the run's vocabulary, unseen words becoming `<unk>`."""
    train_cfg = from_dict(ckpt_meta["config"], ckpt_meta["path"])
    if cfg.model.hf_path or cfg.data.path == train_cfg.data.path:
        corpus = corpus_for(cfg)
        if corpus.vocab_hash != ckpt_meta["vocab_hash"]:
            raise UserError(f"{ckpt_meta['path']}: checkpoint was trained with another vocabulary than {corpus.folder}")
        return corpus
    vocab, tok = run_vocabulary(run, ckpt_meta)
    return load_corpus_with_vocab(cfg.data.path, vocab, tok, ckpt_meta["vocab_hash"])


def build_model(cfg: ModelConfig, vocab_size: int) -> LanguageModel:
    """The model a config names, before a checkpoint is loaded into it: the built-in Transformer freshly
    initialised, or the Hugging Face causal LM at `cfg.hf_path` with its own weights."""
    if cfg.hf_path:
        return HFCausalLM(cfg)
    return TransformerLM(cfg, vocab_size)

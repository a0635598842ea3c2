"""The two kinds of language model a config can name, and what each reads.

`model.hf_path` empty: the built-in Transformer (`knnlm.model`) on a word-level corpus (`knnlm.data`); set: a local
Hugging Face causal LM on the corpus tokenized by its own tokenizer (`knnlm.hf`). Both are `knnlm.lm.LanguageModel`s,
so training, the datastore writer and evaluation call `corpus_for` and `build_model` and never ask which one it is.
"""

from __future__ import annotations

from .config import Config, ModelConfig
from .data import Corpus, load_corpus
from .hf import HFCausalLM, load_hf_corpus
from .lm import LanguageModel
from .model import TransformerLM


def corpus_for(cfg: Config) -> Corpus:
    """The corpus a config reads: word-level, or tokenized by the Hugging Face model it names."""
    if cfg.model.hf_path:
        return load_hf_corpus(cfg.data.path or None, cfg.model.hf_path)
    return load_corpus(cfg.data.path or None, cfg.data)


def build_model(cfg: ModelConfig, vocab_size: int) -> LanguageModel:
    """The model a config names, before a checkpoint is loaded into it: the built-in Transformer freshly
    initialised, or the Hugging Face causal LM at `cfg.hf_path` with its own weights."""
    if cfg.hf_path:
        return HFCausalLM(cfg)
    return TransformerLM(cfg, vocab_size)

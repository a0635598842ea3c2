"""Bring your own model: a local Hugging Face causal LM behind the language-model interface of `knnlm.lm`.

    pip install 'knnlm[hf]'
    knnlm run --config configs/hf-example.toml --out runs/gpt2 model.hf_path=/models/my-gpt2

The model and its tokenizer are read from a folder (`local_files_only`: never the network). The retrieval key is
the input (or output) of one module, named by its path; the defaults are the input of the last block's MLP, as in
the kNN-LM literature. The corpus is tokenized with the model's tokenizer, one end-of-sequence token per line, so
`train`, `datastore` and `evaluate` run unchanged; perplexity is reported per token and per word (whitespace words
plus one per line, the unit of word-level WikiText numbers). `knnlm.models` chooses this model or the built-in
one by `model.hf_path`; `transformers` is imported on first use, so knnlm works without the optional extra.
"""

from __future__ import annotations

import hashlib
import inspect
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .artifacts import UserError, load_npy, save_npy, write_json
from .config import ModelConfig
from .data import SPLITS, Corpus, cache_key, cache_root, corpus_files, iter_lines
from .lm import DecodeCache, Output

# module whose input is the kNN-LM key, by `config.model_type` ({last} = index of the last block)
DEFAULT_KEY_MODULES = {
    "gpt2": "transformer.h.{last}.mlp",
    "gpt_neox": "gpt_neox.layers.{last}.mlp",
    "llama": "model.layers.{last}.mlp",
    "mistral": "model.layers.{last}.mlp",
    "qwen2": "model.layers.{last}.mlp",
}


def _require_transformers():
    try:
        import transformers  # noqa: F401
    except ImportError:
        raise UserError("model.hf_path: Hugging Face models need the optional extra: pip install 'knnlm[hf]'") from None


def load_tokenizer(path: str):
    _require_transformers()
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: no Hugging Face tokenizer here ({str(e).splitlines()[0]})") from None


class HFCausalLM(nn.Module):
    """A Hugging Face causal LM as a `knnlm.lm.LanguageModel`; the key is captured by a hook on the named module."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        _require_transformers()
        from transformers import AutoModelForCausalLM

        try:  # safetensors only unless allowed: a pickled checkpoint runs code when loaded
            self.hf = AutoModelForCausalLM.from_pretrained(cfg.hf_path, local_files_only=True, dtype=torch.float32,
                                                           use_safetensors=None if cfg.hf_allow_pickle else True)
        except (OSError, ValueError) as e:
            hint = "" if cfg.hf_allow_pickle else "; weights are read from *.safetensors only (model.hf_allow_pickle=true also reads pickles)"
            raise UserError(f"{cfg.hf_path}: no Hugging Face causal LM here ({str(e).splitlines()[0]}){hint}") from None
        self.cfg = cfg
        model_type = self.hf.config.model_type
        max_pos = getattr(self.hf.config, "max_position_embeddings", None) or getattr(self.hf.config, "n_positions", None)
        if max_pos and cfg.context > max_pos:
            raise UserError(f"model.context: {cfg.context} is longer than this model's {max_pos} positions")
        if not cfg.key_module and model_type not in DEFAULT_KEY_MODULES:
            raise UserError(f"model.key_module: no default key site for model type {model_type!r}; "
                            f"name a module (e.g. model.layers.{{last}}.mlp)")
        layers = self.hf.config.num_hidden_layers
        self.key_path = (cfg.key_module or DEFAULT_KEY_MODULES[model_type]).format(last=layers - 1)
        try:
            module = self.hf.get_submodule(self.key_path)
        except AttributeError:
            raise UserError(f"model.key_module: {self.key_path!r} is not a module of this {model_type} model") from None
        if cfg.key_io == "input":
            module.register_forward_pre_hook(self._capture_input)
        elif cfg.key_io == "output":
            module.register_forward_hook(self._capture_output)
        else:
            raise UserError(f"model.key_io: expected input or output, got {cfg.key_io!r}")
        self._key: torch.Tensor | None = None
        self.vocab_size = self.hf.get_output_embeddings().weight.shape[0]
        self.key_dim = self.hf.config.hidden_size

    # bound methods (not closures), so a deepcopy (the MOCO momentum encoder) captures into its own copy
    def _capture_input(self, module, args):
        self._key = args[0]

    def _capture_output(self, module, args, output):
        self._key = output[0] if isinstance(output, tuple) else output

    def forward(self, ids: torch.Tensor, cache: DecodeCache | None = None) -> Output:  # (B, T) -> Output
        """With a cache, the T tokens follow those of its `past_key_values` (the model places them after)."""
        if cache is None:
            hidden = self.hf.base_model(input_ids=ids).last_hidden_state  # (B, T, d), after the final norm
        else:  # transformers ≥ 5.25 names it `cache`, earlier ones `past_key_values`
            name = "cache" if "cache" in inspect.signature(self.hf.base_model.forward).parameters else "past_key_values"
            out = self.hf.base_model(input_ids=ids, use_cache=True, **{name: cache.state})
            hidden, cache.state, cache.length = out.last_hidden_state, out[name], cache.length + ids.shape[1]
        key, self._key = self._key, None
        return Output(hidden=hidden, key=key)

    def target_logprob(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits = self.hf.get_output_embeddings()(hidden)  # (B, T, V)
        return F.log_softmax(logits.float(), dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)

    def full_logprobs(self, hidden: torch.Tensor) -> torch.Tensor:  # (N, d) -> (N, V) fp32
        return F.log_softmax(self.hf.get_output_embeddings()(hidden).float(), dim=-1)

    def word_logprobs(self, hidden: torch.Tensor, words: torch.Tensor) -> torch.Tensor:  # (N, d), (N, m) -> (N, m)
        return self.full_logprobs(hidden).gather(1, words)  # a full softmax: its normalizer needs every logit anyway

    def key_module(self):
        return None  # the key is not a plain LayerNorm output we can inspect generically

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def flops_per_token(self) -> float:
        return 6.0 * self.num_params()

    def save_pretrained(self, folder: Path) -> None:
        """The fine-tuned model in Hugging Face format (safetensors), with its tokenizer."""
        self.hf.save_pretrained(folder, safe_serialization=True)
        load_tokenizer(self.cfg.hf_path).save_pretrained(folder)


def tokenizer_hash(tokenizer) -> str:
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    return hashlib.sha256("\n".join(f"{w}\t{i}" for w, i in vocab).encode()).hexdigest()[:16]


def encode_split(path: Path, tokenizer, eos_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Subword ids of a file, an end-of-sequence token after every line, and per token the number of words it
    completes (the line's whitespace words + 1 for the line end, put on the line's last token), so that the words
    of any stretch of tokens can be counted for per-word perplexity."""
    ids, words = [], []
    for line_words in iter_lines(path):
        toks = tokenizer.encode(" ".join(line_words), add_special_tokens=False) if line_words else []
        ids.extend(toks)
        ids.append(eos_id)
        words.extend([0] * len(toks))
        words.append(len(line_words) + 1)
    return np.asarray(ids, dtype=np.int32), np.asarray(words, dtype=np.int32)


def hf_eos_id(tokenizer) -> int:
    eos = tokenizer.eos_token_id
    if eos is None:
        raise UserError("model.hf_path: the tokenizer has no end-of-sequence token (needed as the line separator)")
    return int(eos)


def load_hf_corpus(folder: str | Path | None, hf_path: str) -> Corpus:
    """The splits of a corpus folder tokenized by a local Hugging Face tokenizer (cached like `data.load_corpus`)."""
    folder, files = corpus_files(folder)
    tok = load_tokenizer(hf_path)
    tid, eos = tokenizer_hash(tok), hf_eos_id(tok)
    vocab = tok.convert_ids_to_tokens(list(range(len(tok))))
    key = cache_key(files)
    cache = cache_root() / f"corpus-{key}-hf-{tid}"
    if (cache / "meta.json").is_file():
        splits = {s: load_npy(cache / f"{s}.npy") for s in SPLITS}
        words = {s: load_npy(cache / f"{s}.words.npy") for s in SPLITS}
    else:
        encoded = {s: encode_split(files[s], tok, eos) for s in SPLITS}
        splits = {s: ids for s, (ids, _) in encoded.items()}
        words = {s: w for s, (_, w) in encoded.items()}
        try:
            for s in SPLITS:
                save_npy(cache / f"{s}.npy", splits[s])
                save_npy(cache / f"{s}.words.npy", words[s])
            write_json(cache / "meta.json", {"folder": str(folder), "tokenizer": hf_path, "tokenizer_id": tid})
        except OSError:
            pass  # an unwritable cache only costs time
    return Corpus(folder, vocab, splits, eos_id=eos, word_counts=words, tokenizer_id=tid, digest=key)


class KNNLogitsProcessor:
    """A Hugging Face `LogitsProcessor` that turns a causal LM's next-token scores into kNN-LM log-probabilities,
    so that `model.generate(...)` of a Hugging Face run mixes in its datastore:

        lm = knnlm.load("runs/my-gpt2")
        out = lm.model.hf.generate(input_ids, logits_processor=[KNNLogitsProcessor(lm)], do_sample=False)

    `lm` is a `knnlm.load`ed Hugging Face run; `model` (default `lm.model.hf`, the model `knnlm.load` read, already
    hooked) is the model that generates: the processor reads the key of its last position from a hook on the run's
    key module and returns log(λ p_kNN + (1 − λ) softmax(scores)). Other processors (temperature, top-k/p) and
    sampling then act on those log-probabilities, as they would on logits. Greedy decoding equals
    `lm.generate(..., greedy=True)` while the text fits the context window."""

    def __init__(self, lm, model=None):
        if not isinstance(lm.model, HFCausalLM):
            raise UserError("KNNLogitsProcessor: the run's model is knnlm's own; use knnlm.load(run).generate(...)")
        self.lm, self._key = lm, None
        self.hf = model if model is not None else lm.model.hf
        module = self.hf.get_submodule(lm.model.key_path)
        if lm.model.cfg.key_io == "input":
            self._hook = module.register_forward_pre_hook(lambda m, args: self._keep(args[0]))
        else:
            self._hook = module.register_forward_hook(lambda m, args, out: self._keep(out[0] if isinstance(out, tuple) else out))

    def _keep(self, key: torch.Tensor) -> None:
        self._key = key[:, -1]  # (B, d): each row's last position, the query of the next token

    @torch.no_grad()
    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        assert self._key is not None and self._key.shape[0] == scores.shape[0], "no key captured for these scores"
        lm = F.log_softmax(scores.double(), dim=-1).cpu()  # (B, V)
        mixed = self.lm.mix_knn(lm, self._key)
        return mixed.to(scores.device, scores.dtype)

    def remove(self) -> None:
        """Take the hook off the model."""
        self._hook.remove()

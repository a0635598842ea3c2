"""Typed configuration: nested dataclasses, loaded from TOML, overridden by `section.key=value` on the command line.

Paper symbols (Khandelwal et al. 2020; Ton et al. 2022):
    omega        weight of the key regularizer in `loss = lm_loss + omega * reg_loss`
    lmbda        kNN-LM interpolation weight, p = lmbda * p_kNN + (1 - lmbda) * p_LM
    k            number of nearest neighbours used for p_kNN
    temperature  p_kNN(w) ∝ Σ_{neighbours with token w} exp(-d / temperature), d the squared L2 distance
    queue_len    L, keys kept per target word by the MOCO-style regularizer
    momentum     EMA coefficient of the momentum (key) encoder: θ_k ← m θ_k + (1 - m) θ_q
    knn_memory   keys of earlier training steps the `knn-memory` loss adds to the batch's memories
    beta         weight of the distillation term KL(p_kNN || p_LM) toward a datastore's training-set targets
                 (`knnlm.distill`): loss = ce_weight * CE + beta * KL + omega * reg
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .artifacts import UserError, read_json, write_json
from .search.names import NAMED_INDEXES  # else a FAISS index_factory string (knnlm.search.registry)

# the names options may take; the code they name (model.py's key sites, regularizers.py's losses) imports this file
KEY_SITES = {
    "ffn_input": "input to the block's feed-forward network, after its layer norm (kNN-LM)",
    "ffn_input_prenorm": "the residual stream entering that layer norm",
    "block_output": "the residual stream after the block",
    "final": "the final layer norm's output, the input of the softmax",
}
TOKENIZERS = {
    "whitespace": "split on whitespace (WikiText is already tokenized)",
    "words": "raw text split into words, numbers, clitics and single punctuation marks (WikiText-style)",
    "bpe": "a byte-level BPE of data.vocab_size pieces learned from the training split (no unknown words)",
}
MODEL_KINDS = ("", "builtin", "hf")
# options that only a Hugging Face model reads (knnlm.hf), with their defaults
HF_ONLY_OPTIONS = {"key_module": "", "key_io": "input", "hf_allow_pickle": False}
REGULARIZERS = ("l2", "moco", "zero-queue", "knn", "pull-ratio", "knn-memory")


@dataclass
class DataConfig:
    path: str = ""  # corpus folder; "" = $KNNLM_DATA or the shared WikiText-2 copy
    max_train_tokens: int = 0  # 0 = whole split; >0 keeps the first tokens (tiny configs)
    max_eval_tokens: int = 0
    # how the built-in model reads text (knnlm.data; a Hugging Face model brings its own tokenizer): one of TOKENIZERS
    tokenizer: str = "whitespace"
    lowercase: bool = False  # lower-case the text before it is split
    vocab_size: int = 8000  # bpe: pieces learned from the training split
    min_count: int = 1  # training words seen fewer times become <unk> (1: keep every word); whitespace and words


@dataclass
class ModelConfig:
    d_model: int = 256
    n_layers: int = 4
    n_heads: int = 4
    d_ff: int = 1024
    context: int = 256  # T, tokens per training block and per evaluation window
    dropout: float = 0.1  # on embeddings and residual branches
    attn_dropout: float = 0.0  # on attention weights; > 0 makes CPU attention several times slower
    cutoffs: list[int] = field(default_factory=lambda: [2000, 10000])  # adaptive input/softmax bands
    div_factor: float = 4.0  # band i has embedding size d_model / div_factor**i
    key_site: str = "ffn_input"  # one of KEY_SITES
    key_layer: int = -1  # which block the key is read from
    # a local Hugging Face causal LM instead of the built-in Transformer (knnlm.hf); the fields above then do not apply
    # except `context`. kind: "builtin", "hf" (then hf_path is required), or "" = "hf" exactly when hf_path is set
    kind: str = ""
    hf_path: str = ""
    key_module: str = ""  # module path of the key, "{last}" = last block; "" = the family's default (input of its MLP)
    key_io: str = "input"  # the module's input or output
    hf_allow_pickle: bool = False  # also load pytorch_model.bin (a pickle: can run code); default: *.safetensors only


@dataclass
class TrainConfig:
    seed: int = 0
    epochs: float = 1.0
    batch_size: int = 16  # blocks of `context` tokens per step
    lr: float = 1e-3
    min_lr_ratio: float = 0.1  # cosine decay to lr * min_lr_ratio
    warmup_steps: int = 200
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    omega: float = 0.0
    regularizer: str = "l2"  # l2 | moco | zero-queue | knn | pull-ratio | knn-memory (knnlm.regularizers)
    queue_len: int = 8  # L (moco)
    momentum: float = 0.99  # (moco)
    knn_memory: int = 12288  # keys of earlier steps kept as memories (knn-memory)
    knn_stride: int = 4  # the loss at every stride-th position of a batch (knn-memory)
    bf16: bool = True  # bf16 autocast of matrix products where the device has bf16 hardware (knnlm.lm.native_bf16)
    eval_tokens: int = 0  # valid tokens for the per-epoch perplexity (0 = whole split)
    checkpoint_every: int = 500  # steps
    log_every: int = 50  # optimizer steps between lines of metrics.jsonl
    threads: int = 0  # torch threads (0 = torch default)
    # distillation (knnlm.distill): the kNN targets of a run's training positions, `knnlm targets --out RUN`
    distil_targets: str = ""  # a targets folder (RUN/targets); "" = no distillation
    beta: float = 0.0  # weight of KL(p_kNN || p_LM) at each position (needs distil_targets)
    ce_weight: float = 1.0  # weight of the LM's cross-entropy (1: the usual LM loss; a memory model may use less)
    init_from: str = ""  # a run folder whose last checkpoint's weights start training (a fine-tune); "" = random
    keep_best: bool = False  # keep the checkpoint of the best valid perplexity (each epoch): datastore, eval, API use it
    patience: int = 0  # with keep_best: stop after this many epochs without a better valid perplexity (0: never)
    curves: bool = False  # each epoch also records the train split's perplexity beside valid's (learning curves)


@dataclass
class DatastoreConfig:
    stride: int = 0  # window stride (0 = context // 2)
    batch_size: int = 16  # windows per forward pass


@dataclass
class EvalConfig:
    index: str = "auto"  # one of NAMED_INDEXES (auto: the fastest exact search the machine has) or a FAISS index_factory string
    k_max: int = 1024  # neighbours searched and stored per token (Khandelwal et al. use 1024)
    # neighbours stored per token, 0 = all k_max; fewer: log p_kNN(target) at every (k, temperature) of the tuning grid
    # is kept instead (from all k_max), so a whole split at a large k_max fits in memory and on disk
    k_store: int = 0
    k: list[int] = field(default_factory=lambda: [8, 16, 32, 64, 128, 256, 512, 1024])  # grid tuned on valid
    # 0.1 … 100 in steps of 10^(1/6) ≈ 1.47: kNN-LM perplexity moves by several points between steps of 3×
    temperature: list[float] = field(default_factory=lambda: [float(f"{10 ** (i / 6):.3g}") for i in range(-6, 13)])
    lmbda: list[float] = field(default_factory=lambda: [round(0.05 * i, 2) for i in range(21)])
    nprobe: int = 32
    rerank: bool = True  # approximate indexes: re-rank candidates with exact distances from keys.npy
    rerank_factor: int = 2  # candidates fetched per neighbour kept when re-ranking
    splits: list[str] = field(default_factory=lambda: ["valid"])


@dataclass
class DistillConfig:
    """`knnlm targets`: each training position's p_kNN from the datastore, its own entry left out."""

    k: int = 1024  # neighbours kept per position (Memory Decoder and Khandelwal et al.: 1024)
    temperature: float = 0.0  # p_kNN ∝ exp(-d / temperature); 0 = the run's tuned choice on valid at this k
    top: int = 32  # words kept per position, with their probabilities, plus the remaining mass
    exclude: str = "self"  # self: the position's own entry; window: every entry within model.context positions
    batch_size: int = 4096  # queries searched at once (and rows written between two progress records)


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    datastore: DatastoreConfig = field(default_factory=DatastoreConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _coerce(value: Any, typ: Any, where: str) -> Any:
    """Check/convert one value against a dataclass field type, or raise a UserError naming the option."""
    origin = typing.get_origin(typ)
    if origin is list:
        (inner,) = typing.get_args(typ)
        if isinstance(value, str):
            value = [v for v in value.split(",") if v]
        if not isinstance(value, list):
            raise UserError(f"{where}: expected a list, got {value!r}")
        return [_coerce(v, inner, where) for v in value]
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0"):
            return value.lower() in ("true", "1")
        raise UserError(f"{where}: expected true or false, got {value!r}")
    if typ is int:
        if isinstance(value, bool):
            raise UserError(f"{where}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise UserError(f"{where}: expected an integer, got {value!r}")
    if typ is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            try:
                return float(value)
            except OverflowError:  # an integer beyond any float
                raise UserError(f"{where}: expected a finite number, got {value!r}") from None
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise UserError(f"{where}: expected a number, got {value!r}")
    if typ is str:
        if isinstance(value, str):
            return value
        raise UserError(f"{where}: expected a string, got {value!r}")
    raise AssertionError(f"unsupported config type {typ}")


def _apply(obj: Any, values: dict, where: str) -> None:
    hints = typing.get_type_hints(type(obj))
    names = {f.name for f in dataclasses.fields(obj)}
    for key, value in values.items():
        if key not in names:
            raise UserError(f"{where}: unknown config key {key!r} (expected one of {', '.join(sorted(names))})")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise UserError(f"{where}.{key}: expected a table of options, got {value!r}")
            _apply(current, value, f"{where}.{key}")
        else:
            setattr(obj, key, _coerce(value, hints[key], f"{where}.{key}"))


def from_dict(values: dict, where: str = "config") -> Config:
    cfg = Config()
    _apply(cfg, values, where)
    validate(cfg)
    return cfg


def load_config(path: str | Path | None, overrides: list[str] = ()) -> Config:
    """A config from a TOML file (or defaults), then `section.key=value` overrides; validated."""
    values: dict = {}
    if path:
        path = Path(path)
        if not path.is_file():
            raise UserError(f"{path}: config file not found")
        try:
            values = tomllib.loads(path.read_text())
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise UserError(f"{path}: not a valid TOML config ({e})") from None
    cfg = Config()
    _apply(cfg, values, str(path) if path else "config")
    apply_overrides(cfg, overrides)
    validate(cfg)
    return cfg


def apply_overrides(cfg: Config, overrides: list[str] = ()) -> Config:
    """Apply `section.key=value` items in place (type-checked; `validate` is the caller's next step)."""
    for item in overrides:
        if "=" not in item or "." not in item.split("=", 1)[0]:
            raise UserError(f"override {item!r}: expected section.key=value, e.g. train.omega=0.1")
        dotted, value = item.split("=", 1)
        *parents, key = dotted.split(".")
        tree: dict = {key: value}
        for p in reversed(parents):
            tree = {p: tree}
        _apply(cfg, tree, "override")
    return cfg


_FACTORY = re.compile(r"[A-Za-z][A-Za-z0-9_,.()+=-]*")  # what an index_factory string is made of, e.g. IVF4096,PQ32
_INT64 = 2**63


def _expect(ok: bool, where: str, value: Any, expected: str) -> None:
    if not ok:
        raise UserError(f"{where}: expected {expected}, got {value!r}")


def _finite_numbers(obj: Any, where: str) -> None:
    """Every float of the config is finite and every integer fits int64 (torch, numpy and JSON need both)."""
    for f in dataclasses.fields(obj):
        value, name = getattr(obj, f.name), f"{where}.{f.name}" if where else f.name
        if dataclasses.is_dataclass(value):
            _finite_numbers(value, name)
            continue
        many = isinstance(value, list)
        for v in value if many else [value]:
            if isinstance(v, float):
                _expect(math.isfinite(v), name, value, "finite numbers" if many else "a finite number")
            elif isinstance(v, int) and not isinstance(v, bool):
                _expect(-_INT64 < v < _INT64, name, value, "integers of at most 19 digits" if many else
                        "an integer of at most 19 digits")


def validate(cfg: Config) -> None:
    """Every range a type check cannot see, in one place, before any file is written; errors name `section.key`."""
    _finite_numbers(cfg, "")
    d, m, t, s, e = cfg.data, cfg.model, cfg.train, cfg.datastore, cfg.eval
    _expect(d.max_train_tokens >= 0, "data.max_train_tokens", d.max_train_tokens, "a count >= 0 (0 = whole split)")
    _expect(d.max_eval_tokens >= 0, "data.max_eval_tokens", d.max_eval_tokens, "a count >= 0 (0 = whole split)")
    _expect(d.tokenizer in TOKENIZERS, "data.tokenizer", d.tokenizer, f"one of {', '.join(TOKENIZERS)}")
    _expect(d.min_count >= 1, "data.min_count", d.min_count, "a count >= 1 (1 keeps every training word)")
    _expect(d.tokenizer != "bpe" or d.min_count == 1, "data.min_count", d.min_count,
            "1 with data.tokenizer=bpe (a byte-level BPE has no unknown words)")
    _expect(d.tokenizer != "bpe" or 300 <= d.vocab_size <= 2**31 - 1, "data.vocab_size", d.vocab_size,
            "at least 300 pieces (256 bytes, the specials and some merges)")
    if m.hf_path or m.kind == "hf":  # the model's own tokenizer reads the text
        for key, default in (("tokenizer", "whitespace"), ("lowercase", False), ("min_count", 1)):
            _expect(getattr(d, key) == default, f"data.{key}", getattr(d, key),
                    f"{default!r} (a Hugging Face model reads text with its own tokenizer)")

    for key in ("d_model", "n_layers", "n_heads", "d_ff"):
        _expect(getattr(m, key) >= 1, f"model.{key}", getattr(m, key), "an integer >= 1")
    _expect(m.context >= 2, "model.context", m.context, "at least 2 tokens")
    for key in ("dropout", "attn_dropout"):
        _expect(0 <= getattr(m, key) < 1, f"model.{key}", getattr(m, key), "a probability in [0, 1)")
    _expect(all(c > 0 for c in m.cutoffs) and all(a < b for a, b in zip(m.cutoffs, m.cutoffs[1:])), "model.cutoffs",
            m.cutoffs, "strictly increasing positive integers")
    _expect(m.div_factor > 0, "model.div_factor", m.div_factor, "a number > 0")
    _expect(m.key_io in ("input", "output"), "model.key_io", m.key_io, "input or output")
    _expect(m.kind in MODEL_KINDS, "model.kind", m.kind, f"one of {', '.join(k for k in MODEL_KINDS if k)} (or empty)")
    # a config written for a Hugging Face model must not quietly train the built-in one when hf_path is missing
    if not m.hf_path:
        hf_options = [f"model.{key}" for key, default in HF_ONLY_OPTIONS.items() if getattr(m, key) != default]
        needed_by = "model.kind = \"hf\"" if m.kind == "hf" else ", ".join(hf_options)
        _expect(not needed_by, "model.hf_path", m.hf_path,
                f"a local Hugging Face model (a folder or a cached hub id, e.g. model.hf_path=/models/my-lm), "
                f"since {needed_by} is set")
    _expect(not (m.kind == "builtin" and m.hf_path), "model.kind", m.kind,
            "hf (or empty) when model.hf_path names a Hugging Face model")

    if not m.hf_path:  # the built-in Transformer's own options (a Hugging Face model brings its own)
        _expect(m.key_site in KEY_SITES, "model.key_site", m.key_site, f"one of {', '.join(KEY_SITES)}")
        _expect(-m.n_layers <= m.key_layer < m.n_layers, "model.key_layer", m.key_layer,
                f"a block in [-{m.n_layers}, {m.n_layers}) (model.n_layers={m.n_layers})")
        _expect(m.d_model % m.n_heads == 0, "model.n_heads", m.n_heads, f"a divisor of model.d_model={m.d_model}")

    _expect(0 <= t.seed < 2**32, "train.seed", t.seed, "an integer in [0, 2^32)")
    _expect(t.epochs >= 0, "train.epochs", t.epochs, "a finite number >= 0 (0 keeps the initial weights)")
    _expect(t.batch_size >= 1, "train.batch_size", t.batch_size, "an integer >= 1")
    _expect(t.lr > 0, "train.lr", t.lr, "a learning rate > 0")
    _expect(0 <= t.min_lr_ratio <= 1, "train.min_lr_ratio", t.min_lr_ratio, "a ratio in [0, 1]")
    _expect(t.warmup_steps >= 0, "train.warmup_steps", t.warmup_steps, "a count >= 0")
    _expect(t.weight_decay >= 0, "train.weight_decay", t.weight_decay, "a number >= 0")
    _expect(t.grad_clip > 0, "train.grad_clip", t.grad_clip, "a gradient norm > 0")
    _expect(t.omega >= 0, "train.omega", t.omega, "a finite omega >= 0")
    _expect(t.regularizer in REGULARIZERS, "train.regularizer", t.regularizer, f"one of {', '.join(REGULARIZERS)}")
    _expect(t.queue_len >= 1, "train.queue_len", t.queue_len, "an integer >= 1")
    _expect(0 <= t.momentum < 1, "train.momentum", t.momentum, "a value in [0, 1)")
    _expect(t.knn_memory >= 1, "train.knn_memory", t.knn_memory, "a number of keys >= 1")
    _expect(t.knn_stride >= 1, "train.knn_stride", t.knn_stride, "an integer >= 1")
    _expect(t.eval_tokens >= 0, "train.eval_tokens", t.eval_tokens, "a count >= 0 (0 = whole split)")
    _expect(t.checkpoint_every >= 1, "train.checkpoint_every", t.checkpoint_every, "a step count >= 1")
    _expect(t.log_every >= 1, "train.log_every", t.log_every, "a step count >= 1")
    _expect(0 <= t.threads <= 4096, "train.threads", t.threads, "a thread count in [0, 4096] (0 = torch default)")
    _expect(t.beta >= 0, "train.beta", t.beta, "a weight >= 0")
    _expect(t.ce_weight >= 0, "train.ce_weight", t.ce_weight, "a weight >= 0")
    _expect(t.beta == 0 or bool(t.distil_targets), "train.beta", t.beta,
            "0 unless train.distil_targets names a targets folder (made by `knnlm targets`)")
    _expect(t.ce_weight > 0 or t.beta > 0, "train.ce_weight", t.ce_weight, "> 0 unless train.beta > 0 (no loss)")
    _expect(t.patience >= 0, "train.patience", t.patience, "a number of epochs >= 0 (0: never stop early)")
    _expect(t.patience == 0 or t.keep_best, "train.patience", t.patience, "0 unless train.keep_best = true")

    _expect(0 <= s.stride <= m.context, "datastore.stride", s.stride,
            f"a stride in [0, model.context={m.context}] (0 = context // 2)")
    _expect(s.batch_size >= 1, "datastore.batch_size", s.batch_size, "an integer >= 1")

    _expect(e.index.strip() in NAMED_INDEXES or bool(_FACTORY.fullmatch(e.index.strip())), "eval.index", e.index,
            f"{', '.join(NAMED_INDEXES)} or a FAISS index_factory string such as IVF4096,PQ32")
    _expect(e.k_max >= 1, "eval.k_max", e.k_max, "an integer >= 1")
    _expect(0 <= e.k_store <= e.k_max, "eval.k_store", e.k_store, f"an integer in [0, eval.k_max={e.k_max}] (0 = all)")
    _expect(bool(e.k) and all(1 <= k <= e.k_max for k in e.k), "eval.k", e.k,
            f"a non-empty list of integers in [1, eval.k_max={e.k_max}]")
    _expect(bool(e.temperature) and all(tau > 0 for tau in e.temperature), "eval.temperature", e.temperature,
            "a non-empty list of finite values > 0")
    _expect(bool(e.lmbda) and all(0 <= lm <= 1 for lm in e.lmbda), "eval.lmbda", e.lmbda,
            "a non-empty list of values in [0, 1]")
    _expect(e.nprobe >= 1, "eval.nprobe", e.nprobe, "an integer >= 1")
    _expect(e.rerank_factor >= 1, "eval.rerank_factor", e.rerank_factor, "an integer >= 1")
    _expect(bool(e.splits) and all(sp in ("valid", "test") for sp in e.splits), "eval.splits", e.splits,
            "a non-empty list of valid and/or test")

    x = cfg.distill
    _expect(x.k >= 1, "distill.k", x.k, "an integer >= 1")
    _expect(x.temperature >= 0, "distill.temperature", x.temperature, "a temperature > 0, or 0 for the valid choice")
    _expect(1 <= x.top <= x.k, "distill.top", x.top, f"an integer in [1, distill.k={x.k}]")
    _expect(x.exclude in ("self", "window"), "distill.exclude", x.exclude, "self or window")
    _expect(x.batch_size >= 1, "distill.batch_size", x.batch_size, "an integer >= 1")


def save_config(cfg: Config, path: str | Path) -> None:
    write_json(path, cfg.to_dict())


def read_run_config(out: str | Path) -> Config:
    """The resolved config a run folder was trained with."""
    return from_dict(read_json(Path(out) / "config.json", "run config"), str(Path(out) / "config.json"))




def changed_settings(recorded: dict, current: dict, prefix: str = "") -> list[str]:
    """The `section.key` settings whose values differ; settings a record lacks (added to knnlm since) count as
    unchanged."""
    changed = []
    for key, value in current.items():
        if key not in recorded:
            continue
        if isinstance(value, dict) and isinstance(recorded[key], dict):
            changed += changed_settings(recorded[key], value, f"{prefix}{key}.")
        elif recorded[key] != value:
            changed.append(f"{prefix}{key}")
    return changed


# settings that do not change the trained model: a run may be continued or re-evaluated with other values
NOT_THE_MODEL = {"train.threads", "train.eval_tokens", "train.checkpoint_every", "train.log_every", "data.max_eval_tokens"}


def check_same_model(out: str | Path, cfg: Config) -> None:
    """Refuse to continue (or reuse) the model in `out` under training settings other than its own: a finished run
    asked to run with another config must not print its old results as if they were new."""
    path = Path(out) / "config.json"
    if not path.is_file():  # deleted: the latest checkpoint records the config it was trained with
        # the complete checkpoints, as checkpoint.checkpoint_dirs lists them (that module imports this one)
        metas = sorted((Path(out) / "checkpoints").glob("step_*/meta.json"))
        if not metas:
            return
        path = metas[-1]
        recorded = read_json(path, "checkpoint meta")
        if not isinstance(recorded, dict) or not isinstance(recorded.get("config"), dict):
            raise UserError(f"{path}: no 'config' entry, and {Path(out) / 'config.json'} is missing: the settings "
                            f"the model was trained with are unknown; choose another --out")
        recorded = recorded["config"]
    else:
        recorded = read_json(path, "run config")
    if not isinstance(recorded, dict):
        raise UserError(f"{path}: expected a JSON object of settings, found {type(recorded).__name__}")
    current = json.loads(json.dumps(cfg.to_dict()))
    model_sections = {s: current[s] for s in ("data", "model", "train") if s in current}
    changed = [c for c in changed_settings(recorded, model_sections) if c not in NOT_THE_MODEL]
    if changed:
        shown = ", ".join(f"{c}: {_lookup(recorded, c)!r} → {_lookup(current, c)!r}" for c in changed[:4])
        more = f" and {len(changed) - 4} more" if len(changed) > 4 else ""
        raise UserError(f"{out}: holds a model trained with other settings ({shown}{more}, as {path.name} records); "
                        f"choose another --out, or delete the folder to start over")


def _lookup(d: dict, dotted: str):
    for part in dotted.split("."):
        d = d[part]
    return d

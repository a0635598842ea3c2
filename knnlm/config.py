"""Typed configuration: nested dataclasses, loaded from TOML, overridden by `section.key=value` on the command line.

Paper symbols (Khandelwal et al. 2020; Ton et al. 2022):
    omega        weight of the key regularizer in `loss = lm_loss + omega * reg_loss`
    lmbda        kNN-LM interpolation weight, p = lmbda * p_kNN + (1 - lmbda) * p_LM
    k            number of nearest neighbours used for p_kNN
    temperature  p_kNN(w) ∝ Σ_{neighbours with token w} exp(-d / temperature), d the squared L2 distance
    queue_len    L, keys kept per target word by the MOCO-style regularizer
    momentum     EMA coefficient of the momentum (key) encoder: θ_k ← m θ_k + (1 - m) θ_q
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .artifacts import UserError


@dataclass
class DataConfig:
    path: str = ""  # corpus folder; "" = $KNNLM_DATA or the shared WikiText-2 copy
    max_train_tokens: int = 0  # 0 = whole split; >0 keeps the first tokens (tiny configs)
    max_eval_tokens: int = 0


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
    key_site: str = "ffn_input"  # ffn_input | ffn_input_prenorm | block_output | final (see model.KEY_SITES)
    key_layer: int = -1  # which block the key is read from
    # a local Hugging Face causal LM instead of the built-in Transformer (knnlm.hf); the fields above then do not apply
    # except `context`
    hf_path: str = ""
    key_module: str = ""  # module path of the key, "{last}" = last block; "" = the family's default (input of its MLP)
    key_io: str = "input"  # the module's input or output


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
    regularizer: str = "l2"  # l2 | moco | zero-queue | knn | pull-ratio (knnlm.regularizers)
    queue_len: int = 8  # L (moco)
    momentum: float = 0.99  # (moco)
    bf16: bool = True  # bf16 autocast on CPU/GPU matrix products
    eval_tokens: int = 0  # valid tokens for the per-epoch perplexity (0 = whole split)
    checkpoint_every: int = 500  # steps
    threads: int = 0  # torch threads (0 = torch default)


@dataclass
class DatastoreConfig:
    stride: int = 0  # window stride (0 = context // 2)
    batch_size: int = 16  # windows per forward pass


@dataclass
class EvalConfig:
    index: str = "auto"  # "auto" (exact: amx-exact on AMX CPUs, bf16-exact on GPUs, else FAISS Flat), "Flat", "amx-exact", "bf16-exact" or a FAISS index_factory string
    k_max: int = 1024  # neighbours searched and stored per token (Khandelwal et al. use 1024)
    k: list[int] = field(default_factory=lambda: [8, 16, 32, 64, 128, 256, 512, 1024])  # grid tuned on valid
    # 0.1 … 100 in steps of 10^(1/6) ≈ 1.47: kNN-LM perplexity moves by several points between steps of 3×
    temperature: list[float] = field(default_factory=lambda: [float(f"{10 ** (i / 6):.3g}") for i in range(-6, 13)])
    lmbda: list[float] = field(default_factory=lambda: [round(0.05 * i, 2) for i in range(21)])
    nprobe: int = 32
    rerank: bool = True  # approximate indexes: re-rank candidates with exact distances from keys.npy
    rerank_factor: int = 2  # candidates fetched per neighbour kept when re-ranking
    splits: list[str] = field(default_factory=lambda: ["valid"])


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    datastore: DatastoreConfig = field(default_factory=DatastoreConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

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
            return float(value)
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
            raise UserError(f"{where}: unknown config key '{key}' (expected one of {', '.join(sorted(names))})")
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
            raise UserError(f"override '{item}': expected section.key=value, e.g. train.omega=0.1")
        dotted, value = item.split("=", 1)
        *parents, key = dotted.split(".")
        tree: dict = {key: value}
        for p in reversed(parents):
            tree = {p: tree}
        _apply(cfg, tree, "override")
    return cfg


def validate(cfg: Config) -> None:
    """Range checks that a type check cannot do; each names the option."""
    m, t, e = cfg.model, cfg.train, cfg.eval
    if m.d_model % m.n_heads and not m.hf_path:
        raise UserError(f"model.n_heads: {m.n_heads} does not divide model.d_model={m.d_model}")
    if sorted(m.cutoffs) != m.cutoffs or len(set(m.cutoffs)) != len(m.cutoffs) or any(c <= 0 for c in m.cutoffs):
        raise UserError(f"model.cutoffs: expected strictly increasing positive integers, got {m.cutoffs}")
    if m.context < 2:
        raise UserError(f"model.context: expected at least 2, got {m.context}")
    if not (t.omega >= 0 and math.isfinite(t.omega)):
        raise UserError(f"train.omega: expected a finite omega >= 0, got {t.omega}")
    if t.regularizer not in ("l2", "moco", "zero-queue", "knn", "pull-ratio"):
        raise UserError(f"train.regularizer: expected l2, moco, zero-queue, knn or pull-ratio, got {t.regularizer!r}")
    if not 0 <= t.momentum < 1:
        raise UserError(f"train.momentum: expected a value in [0, 1), got {t.momentum}")
    if t.queue_len < 1:
        raise UserError(f"train.queue_len: expected at least 1, got {t.queue_len}")
    if t.epochs < 0 or t.batch_size < 1 or t.lr <= 0:
        raise UserError("train: epochs must be >= 0 (0 keeps the initial weights), batch_size and lr positive")
    if any(not 0 <= lm <= 1 for lm in e.lmbda):
        raise UserError(f"eval.lmbda: expected values in [0, 1], got {e.lmbda}")
    if any(k <= 0 for k in e.k) or e.k_max <= 0:
        raise UserError(f"eval.k: expected k > 0, got {e.k} (k_max={e.k_max})")
    if any(k > e.k_max for k in e.k):
        raise UserError(f"eval.k: {max(e.k)} is larger than eval.k_max={e.k_max}")
    if not e.temperature or any(not (tau > 0 and math.isfinite(tau)) for tau in e.temperature):
        raise UserError(f"eval.temperature: expected a non-empty list of finite values > 0, got {e.temperature}")
    for s in e.splits:
        if s not in ("valid", "test"):
            raise UserError(f"eval.splits: expected valid and/or test, got {s!r}")


def save_config(cfg: Config, path: str | Path) -> None:
    from .artifacts import write_json

    write_json(path, cfg.to_dict())


def read_run_config(out: str | Path) -> Config:
    """The resolved config a run folder was trained with."""
    from .artifacts import read_json

    return from_dict(read_json(Path(out) / "config.json", "run config"), str(Path(out) / "config.json"))



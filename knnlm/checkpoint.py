"""Checkpoints: `RUN/checkpoints/step_XXXXXXXX/` folders, written completely before their `meta.json`.

A checkpoint holds model weights (`model.safetensors`), optimizer moments (`optimizer.safetensors`), the
regularizer's state (MOCO queue and momentum encoder, `regularizer.safetensors`), and `state.json` (step, data
position, optimizer hyper-parameters). Nothing is pickled, so loading a checkpoint never runs code from it.
The newest folder with a `meta.json` is the run's current checkpoint; older ones are pruned once a newer is complete.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import safetensors
import safetensors.torch
import torch
import torch.nn as nn

from .artifacts import UserError, atomic_dir, check_fields, file_sha256, read_json, read_meta, write_json
from .config import Config, from_dict
from .lm import LanguageModel
from .models import build_model

KEEP = 2  # complete checkpoints kept per run
FIELDS = {"step": int, "model_sha256": str, "vocab_hash": str, "vocab_size": int, "key_site": str, "key_layer": int,
          "config": dict}  # what readers of a checkpoint's meta.json rely on


def checkpoint_dirs(run: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = Path(run) / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("step_*") if (p / "meta.json").is_file())


def latest_checkpoint(run: str | Path) -> Path | None:
    dirs = checkpoint_dirs(Path(run))
    return dirs[-1] if dirs else None


def _optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    sd = opt.state_dict()
    tensors = {f"{idx}.{name}": v.detach().contiguous().cpu() for idx, st in sd["state"].items() for name, v in st.items()}
    return tensors, {"param_groups": sd["param_groups"]}


def save_weights(module: nn.Module, path: Path) -> None:
    """A module's weights as safetensors, each tied tensor once, the file a function of the weights alone.

    `safetensors.torch.save_model` records each dropped tied name as its own entry of the header's metadata, a map
    whose order the writer does not keep (it came out differently in every process, whatever PYTHONHASHSEED): one
    model gave one digest per process, and the digest is what identifies the model to its datastore. Here the names
    tied to one tensor are grouped, the first in sorted order kept (as save_model does), and the dropped ones are
    recorded as a single metadata entry, `tied`, a sorted JSON object {dropped: kept}. Loading needs none of it
    (`safetensors.torch.load_model` finds the ties in the model)."""
    groups: dict[tuple, list[str]] = {}
    state = module.state_dict()
    for name, t in state.items():  # tied: the very same view of the same storage
        key = (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)
        groups.setdefault(key, []).append(name)
    tensors, tied = {}, {}
    for names in groups.values():
        kept, *dropped = sorted(names)
        tensors[kept] = state[kept].detach().contiguous().cpu()
        tied.update({name: kept for name in dropped})
    metadata = {"tied": json.dumps(tied, sort_keys=True)} if tied else None  # one entry: no order to lose
    safetensors.torch.save_file(tensors, str(path), metadata=metadata)


def save_checkpoint(run: Path, step: int, model: nn.Module, opt: torch.optim.Optimizer, regularizer: nn.Module,
                    state: dict, cfg: Config, vocab_hash: str) -> Path:
    """Write checkpoint `step` into a temporary folder, rename it into place, then prune older ones."""
    root = Path(run) / "checkpoints"
    final = root / f"step_{step:08d}"
    with atomic_dir(final) as tmp:
        save_weights(model, tmp / "model.safetensors")  # handles the tied weights
        opt_tensors, opt_json = _optimizer_tensors(opt)
        safetensors.torch.save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
        if len(regularizer.state_dict()):
            save_weights(regularizer, tmp / "regularizer.safetensors")
        write_json(tmp / "state.json", {**state, "step": step, "optimizer": opt_json})
        write_json(tmp / "meta.json", {
            "step": step,
            "model_sha256": file_sha256(tmp / "model.safetensors"),
            "vocab_hash": vocab_hash,
            "vocab_size": model.vocab_size,
            "key_site": cfg.model.key_site,
            "key_layer": cfg.model.key_layer,
            "config": cfg.to_dict(),
        })
    for old in checkpoint_dirs(Path(run))[:-KEEP]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _load_safetensors_into(module: nn.Module, path: Path) -> None:
    if not path.is_file():
        raise UserError(f"{path}: weights file missing")
    try:
        with open(path, "rb") as f:
            head = f.read(8)
        if len(head) < 8:
            raise ValueError("file too short")
        missing, unexpected = safetensors.torch.load_model(module, str(path), strict=False)
    except (safetensors.SafetensorError, ValueError, RuntimeError, OSError) as e:
        raise UserError(f"{path}: not a safetensors weights file for this model ({str(e).splitlines()[0]})") from None
    if missing or unexpected:
        raise UserError(f"{path}: weights do not match the model (missing {list(missing)[:3]}, unexpected {list(unexpected)[:3]})")


def load_training_state(ckpt: Path, model: nn.Module, opt: torch.optim.Optimizer, regularizer: nn.Module) -> dict:
    """Restore model, optimizer and regularizer in place; return `state.json`."""
    _load_safetensors_into(model, ckpt / "model.safetensors")
    state = check_fields(read_json(ckpt / "state.json", "training state"), ckpt / "state.json",
                         {"step": int, "optimizer": dict})
    try:
        tensors = safetensors.torch.load_file(str(ckpt / "optimizer.safetensors"))  # never unpickles
    except (safetensors.SafetensorError, ValueError, RuntimeError, OSError) as e:
        raise UserError(f"{ckpt / 'optimizer.safetensors'}: not a safetensors file of optimizer moments "
                        f"({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    per_param: dict[int, dict] = {}
    for name, t in tensors.items():
        idx, key = name.split(".", 1)
        per_param.setdefault(int(idx), {})[key] = t
    opt.load_state_dict({"state": per_param, "param_groups": state["optimizer"]["param_groups"]})
    if len(regularizer.state_dict()):
        _load_safetensors_into(regularizer, ckpt / "regularizer.safetensors")
    return state


BEST = "best"  # checkpoints/best: a copy of the step with the best valid perplexity (train.keep_best)


def model_checkpoint(run: str | Path) -> Path | None:
    """The checkpoint whose weights the run's datastore, evaluation and API use: `checkpoints/best` where training
    kept one (`train.keep_best`, early stopping), else the latest. Resuming training always reads the latest."""
    best = Path(run) / "checkpoints" / BEST
    return best if (best / "meta.json").is_file() else latest_checkpoint(run)


def load_weights(module: nn.Module, ckpt: Path) -> None:
    """A checkpoint folder's model weights into `module` (its architecture must match)."""
    _load_safetensors_into(module, Path(ckpt) / "model.safetensors")


def keep_as_best(run: str | Path, step_dir: Path) -> Path:
    """Copy a complete step checkpoint to `checkpoints/best`, replacing the previous best atomically."""
    with atomic_dir(Path(run) / "checkpoints" / BEST) as tmp:
        for f in sorted(Path(step_dir).iterdir()):
            shutil.copy2(f, tmp / f.name)
    return Path(run) / "checkpoints" / BEST


def latest_meta(run: str | Path) -> dict:
    """The meta.json of the run's model checkpoint (`model_checkpoint`: the best one where training kept it, else
    the latest complete one), with its folder as "path" (the weights unread)."""
    ckpt = model_checkpoint(run)
    if ckpt is None:
        raise UserError(f"{run}: no complete checkpoint (run `knnlm train` into this folder first)")
    return {**read_meta(ckpt, "checkpoint", FIELDS), "path": str(ckpt)}


def load_model(run: str | Path, device: torch.device | str = "cpu",
               vocab_size: int | None = None) -> tuple[LanguageModel, Config, dict]:
    """The run's latest model for inference (eval mode, on `device`), its config and checkpoint meta."""
    meta = latest_meta(run)
    ckpt = Path(meta["path"])
    cfg = from_dict(meta["config"], str(ckpt / "meta.json"))
    if vocab_size is not None and meta["vocab_size"] != vocab_size:
        raise UserError(f"{ckpt}: checkpoint is for a vocabulary of {meta['vocab_size']} types, the corpus has {vocab_size}")
    model = build_model(cfg.model, meta["vocab_size"])
    _load_safetensors_into(model, ckpt / "model.safetensors")
    model.to(device).eval()
    return model, cfg, meta


def init_weights_from(run: str | Path, model: nn.Module, vocab_hash: str) -> str:
    """Start a model from another run's latest weights (`train.init_from`: a fine-tune); return that checkpoint."""
    meta = latest_meta(run)
    if meta["vocab_hash"] != vocab_hash:
        raise UserError(f"train.init_from: {run} was trained with another vocabulary than this run's corpus")
    _load_safetensors_into(model, Path(meta["path"]) / "model.safetensors")
    return meta["path"]

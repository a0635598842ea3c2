"""The language-model interface: what training, the datastore writer, evaluation and the API call on a model.

Two models implement it: the built-in Transformer (`knnlm.model.TransformerLM`) and a local Hugging Face causal LM
(`knnlm.hf.HFCausalLM`); `knnlm.models.build_model` picks one from the config. Both import this file and not
each other. The retrieval key is a named output, `Output.key`: the regularizer, the datastore writer and the
evaluation queries all read that same tensor.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
import torch.nn as nn

from .config import ModelConfig


@dataclass
class Output:
    hidden: torch.Tensor  # (B, T, d) final layer-norm output, the softmax input
    key: torch.Tensor  # (B, T, d) the retrieval key r at the configured site


@runtime_checkable
class LanguageModel(Protocol):
    """An `nn.Module` (so also `parameters()`, `to()`, `eval()`, `state_dict()`; called as `model(ids)`) with:"""

    cfg: ModelConfig
    vocab_size: int  # V
    key_dim: int  # d of `Output.key`

    def forward(self, ids: torch.Tensor) -> Output:  # (B, T) -> Output
        ...

    def target_logprob(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """log p(target | hidden): (B, T, d), (B, T) -> (B, T) fp32; only what the targets need is computed."""
        ...

    def full_logprobs(self, hidden: torch.Tensor) -> torch.Tensor:  # (N, d) -> (N, V) fp32
        ...

    def key_module(self) -> nn.LayerNorm | None:
        """The layer norm whose output is the key (what an L2 penalty can shrink), or None if there is none."""
        ...

    def num_params(self) -> int:
        ...

    def flops_per_token(self) -> float:
        """Forward+backward FLOPs per token, for throughput reports."""
        ...


def autocast(device: torch.device | str, bf16: bool):
    """bf16 autocast for matrix products (AMX on CPU, tensor cores on GPU); log-softmax stays fp32."""
    return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16, enabled=bf16)

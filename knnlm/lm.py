"""The language-model interface: what training, the datastore writer, evaluation and the API call on a model.

Two models implement it: the built-in Transformer (`knnlm.model.TransformerLM`) and a local Hugging Face causal LM
(`knnlm.hf.HFCausalLM`); `knnlm.models.build_model` picks one from the config. Both import this file and not
each other. The retrieval key is a named output, `Output.key`: the regularizer, the datastore writer and the
evaluation queries all read that same tensor.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
import torch.nn as nn

from .artifacts import cpuinfo_fields
from .config import ModelConfig


@dataclass
class Output:
    hidden: torch.Tensor  # (B, T, d) final layer-norm output, the softmax input
    key: torch.Tensor  # (B, T, d) the retrieval key r at the configured site


class DecodeCache:
    """What a model keeps between the steps of incremental decoding, so that `model(new_ids, cache)` runs only the
    tokens it has not seen: the built-in model's per-block attention keys and values, or a Hugging Face model's
    `past_key_values`. `length` counts the tokens seen, the position of the next one."""

    def __init__(self):
        self.length = 0
        self.state = None  # the model's own: a list of (k, v) per block, or past_key_values


@runtime_checkable
class LanguageModel(Protocol):
    """An `nn.Module` (so also `parameters()`, `to()`, `eval()`, `state_dict()`; called as `model(ids)`) with:"""

    cfg: ModelConfig
    vocab_size: int  # V
    key_dim: int  # d of `Output.key`

    def forward(self, ids: torch.Tensor, cache: DecodeCache | None = None) -> Output:
        """(B, T) -> Output for these T tokens; with a cache, they follow the cache.length tokens it has seen (their
        positions start there) and the cache is extended by them."""
        ...

    def target_logprob(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """log p(target | hidden): (B, T, d), (B, T) -> (B, T) fp32; only what the targets need is computed."""
        ...

    def full_logprobs(self, hidden: torch.Tensor) -> torch.Tensor:  # (N, d) -> (N, V) fp32
        ...

    def word_logprobs(self, hidden: torch.Tensor, words: torch.Tensor) -> torch.Tensor:
        """log p(w | hidden) of m given words per row: (N, d), (N, m) ids in [0, V) -> (N, m) fp32."""
        ...

    def key_module(self) -> nn.LayerNorm | None:
        """The layer norm whose output is the key (what an L2 penalty can shrink), or None if there is none."""
        ...

    def num_params(self) -> int:
        ...

    def flops_per_token(self) -> float:
        """Forward+backward FLOPs per token, for throughput reports."""
        ...


@functools.cache
def native_bf16(device_type: str) -> bool:
    """Whether `train.bf16` autocast runs on this device: always on a GPU; on a CPU only where it multiplies bf16 in
    hardware (AVX-512 BF16: AMD Zen 4 and later, Intel Cooper Lake; AMX: Intel Sapphire Rapids and later).

    Elsewhere (e.g. AMD Zen 3, AVX2 only) oneDNN emulates bf16 products, and a bf16-autocast run is many times
    slower than fp32 (measured on a 2-core AMD EPYC Zen 3: the tiny config trains in 346 s with autocast, 20 s
    without; a WikiText-2 step 49 s against 3.4 s), so such CPUs compute in fp32. `KNNLM_BF16=force` turns
    autocast on anyway (to reproduce a bf16 machine's numbers), `KNNLM_BF16=off` off everywhere.
    """
    forced = os.environ.get("KNNLM_BF16", "")
    if forced in ("force", "off"):
        return forced == "force"
    if device_type != "cpu":
        return True
    return bool({"avx512_bf16", "amx_bf16"} & set(cpuinfo_fields().get("flags", "").split()))


def autocast(device: torch.device | str, bf16: bool):
    """bf16 autocast for matrix products (AMX or AVX-512 BF16 on CPU, tensor cores on GPU) where the device has
    them (`native_bf16`); log-softmax stays fp32."""
    device_type = torch.device(device).type
    return torch.autocast(device_type=device_type, dtype=torch.bfloat16, enabled=bf16 and native_bf16(device_type))

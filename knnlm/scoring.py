"""One pass of a language model over a token stream: keys, targets and LM log-probabilities of every position.

The datastore writer (keys of the training split), evaluation (query keys and LM log-probabilities of valid/test),
training's perplexity checks and the API all score a stream with `score_stream`, so a query key is computed by the
same windows and arithmetic as the stored keys.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

import torch

from .data import sliding_windows
from .lm import LanguageModel, autocast


@torch.no_grad()
def score_stream(model: LanguageModel, s: torch.Tensor, stride: int, batch_size: int, bf16: bool = True,
                 want_keys: bool = True, windows: list[tuple[int, int, int]] | None = None):
    """Run the model over a token stream (N+1,) with sliding windows; yield, for each batch of windows, the
    scored positions' keys (n, d) float16, targets (n,) and LM log-probabilities (n,) fp32, in stream order.

    Input position i predicts s[i+1]; every one of the N positions is scored exactly once (data.sliding_windows).
    `windows` restricts the pass to a contiguous run of those windows (one rank's share of a sharded pass).

    No per-batch host synchronisation on a GPU: a batch's results are copied into pinned host memory
    asynchronously and handed out one batch later, once its copy has finished, while the next batch computes.
    """
    return_large_frees_to_os()
    model.eval()
    device = next(model.parameters()).device
    T = model.cfg.context
    n = len(s) - 1
    if windows is None:
        windows = sliding_windows(n, T, stride)
    pending = None  # the previous batch: host tensors and the event that marks their copies done
    for b in range(0, len(windows), batch_size):
        group = windows[b : b + batch_size]
        length = max(e - a for a, e, _ in group)  # all equal to T unless the stream is shorter than T
        idx = torch.stack([torch.arange(a, a + length).clamp(max=n - 1) for a, _, _ in group])  # (B, T)
        inputs, targets = s[idx].to(device), s[idx + 1].to(device)  # (B, T) each
        with autocast(device, bf16):
            out = model(inputs)  # hidden and key (B, T, d)
            logp = model.target_logprob(out.hidden, targets)  # (B, T)
        # scored slice of each window, concatenated in stream order
        sel = [(j, f - a, e - a) for j, (a, e, f) in enumerate(group)]
        # keys (n, d) float16, targets (n,), LM log-probabilities (n,) fp32: n scored positions of the B windows
        results = (torch.cat([out.key[j, lo:hi] for j, lo, hi in sel]).to(torch.float16) if want_keys else None,
                   torch.cat([targets[j, lo:hi] for j, lo, hi in sel]),
                   torch.cat([logp[j, lo:hi] for j, lo, hi in sel]).float())
        host = tuple(None if x is None else to_host(x) for x in results)
        event = torch.cuda.Event() if device.type == "cuda" else None
        if event is not None:
            event.record()
        if pending is not None:
            yield finished(*pending)
        pending = host, event
    if pending is not None:
        yield finished(*pending)


@functools.cache
def return_large_frees_to_os() -> bool:
    """Have glibc give every freed block of 1 MB or more back to the OS at once, for the rest of the process
    (`mallopt(M_MMAP_THRESHOLD, 1 MB)`); True if set, False off glibc.

    By default glibc raises that threshold after each large free, up to 32 MB, so the arrays that a scoring pass
    frees and allocates again (activations, per-thread search buffers) can stay in its heaps and pile up, depending
    on how the threads interleave (tests/test_api.py plants the case; benchmarks/score_memory.py measures `score`).
    """
    name = ctypes.util.find_library("c")
    try:
        mallopt = ctypes.CDLL(name).mallopt if name else None
    except (OSError, AttributeError):  # not glibc (musl, macOS)
        return False
    M_MMAP_THRESHOLD = -3
    return mallopt is not None and mallopt(M_MMAP_THRESHOLD, 1 << 20) == 1


def to_host(x: torch.Tensor) -> torch.Tensor:
    """A CPU copy of x: started asynchronously into pinned memory from a GPU (wait for it with an event)."""
    if x.device.type != "cuda":
        return x
    buffer = torch.empty(x.shape, dtype=x.dtype, pin_memory=True)
    buffer.copy_(x, non_blocking=True)
    return buffer


def finished(host: tuple, event) -> tuple:
    """The host tensors of a batch once their asynchronous copies are done."""
    if event is not None:
        event.synchronize()
    return host

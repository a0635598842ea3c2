"""One pass of a language model over a token stream: keys, targets and LM log-probabilities of every position.

The datastore writer (keys of the training split), evaluation (query keys and LM log-probabilities of valid/test),
training's perplexity checks and the API all score a stream with `score_stream`, so a query key is computed by the
same windows and arithmetic as the stored keys.
"""

from __future__ import annotations

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
    """
    model.eval()
    device = next(model.parameters()).device
    T = model.cfg.context
    n = len(s) - 1
    if windows is None:
        windows = sliding_windows(n, T, stride)
    for b in range(0, len(windows), batch_size):
        group = windows[b : b + batch_size]
        length = max(e - a for a, e, _ in group)  # all equal to T unless the stream is shorter than T
        idx = torch.stack([torch.arange(a, a + length).clamp(max=n - 1) for a, _, _ in group])  # (B, T)
        inputs, targets = s[idx].to(device), s[idx + 1].to(device)
        with autocast(device, bf16):
            out = model(inputs)
            logp = model.target_logprob(out.hidden, targets)  # (B, T)
        # scored slice of each window, concatenated in stream order
        sel = [(j, f - a, e - a) for j, (a, e, f) in enumerate(group)]
        yield (
            torch.cat([out.key[j, lo:hi] for j, lo, hi in sel]).to(torch.float16).cpu() if want_keys else None,
            torch.cat([targets[j, lo:hi] for j, lo, hi in sel]).cpu(),
            torch.cat([logp[j, lo:hi] for j, lo, hi in sel]).float().cpu(),
        )

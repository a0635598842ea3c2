"""Does bf16 autocast keep results right? LM perplexity and key agreement of a trained run, fp32 against bf16.

    python benchmarks/bf16_accuracy.py --run runs/wt2 [--tokens 30000]

Writes results/benchmarks/<machine>/bf16_accuracy.{json,md}: valid perplexity with and without autocast, its relative
difference, the keys' relative error and the neighbour overlap they would give, and the time of each pass.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch

from common import default_out
from knnlm.artifacts import write_json
from knnlm.checkpoint import load_model
from knnlm.data import token_stream
from knnlm.models import corpus_for
from knnlm.scoring import score_stream


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run", default="runs/wt2")
    p.add_argument("--tokens", type=int, default=30000)
    p.add_argument("--out", default=default_out(), help="default: this machine's folder under results/benchmarks/")
    args = p.parse_args()

    model, cfg, _ = load_model(args.run)
    corpus = corpus_for(cfg)
    s = token_stream(corpus.splits["valid"][: args.tokens], corpus.eos_id)
    res = {}
    for bf16 in (False, True):
        t0 = time.time()
        keys, lps = [], []
        for k, _, lp in score_stream(model, s, cfg.model.context // 2, 16, bf16=bf16):
            keys.append(k.float())
            lps.append(lp.double())
        lp = torch.cat(lps)
        res["bf16" if bf16 else "fp32"] = {"ppl": math.exp(-lp.mean().item()), "seconds": time.time() - t0,
                                           "keys": torch.cat(keys), "lp": lp}
    a, b = res["fp32"], res["bf16"]
    key_rel_err = ((a["keys"] - b["keys"]).norm(dim=1) / a["keys"].norm(dim=1)).mean().item()
    # neighbour agreement among the valid keys themselves (a proxy for the datastore search)
    sample = a["keys"][:2000]
    nn_a = torch.cdist(sample, a["keys"]).topk(65, largest=False).indices[:, 1:]
    nn_b = torch.cdist(b["keys"][:2000], b["keys"]).topk(65, largest=False).indices[:, 1:]
    overlap = np.mean([len(set(x.tolist()) & set(y.tolist())) / 64 for x, y in zip(nn_a, nn_b)])
    out = {
        "run": args.run, "tokens": args.tokens,
        "ppl_fp32": a["ppl"], "ppl_bf16": b["ppl"], "ppl_rel_diff": b["ppl"] / a["ppl"] - 1,
        "max_abs_logprob_diff": (a["lp"] - b["lp"]).abs().max().item(),
        "key_rel_error_mean": key_rel_err, "neighbour_overlap_at_64": float(overlap),
        "seconds_fp32": a["seconds"], "seconds_bf16": b["seconds"], "speedup": a["seconds"] / b["seconds"],
    }
    Path(args.out).mkdir(parents=True, exist_ok=True)
    write_json(Path(args.out) / "bf16_accuracy.json", out)
    md = ["| quantity | fp32 | bf16 autocast |", "|---|---|---|",
          f"| valid LM ppl ({args.tokens} tokens) | {a['ppl']:.3f} | {b['ppl']:.3f} ({out['ppl_rel_diff']:+.3%}) |",
          f"| scoring time (s) | {a['seconds']:.1f} | {b['seconds']:.1f} ({out['speedup']:.2f}× faster) |",
          f"| key relative error (mean) | – | {key_rel_err:.2e} |",
          f"| 64-NN overlap among valid keys | – | {overlap:.3f} |"]
    (Path(args.out) / "bf16_accuracy.md").write_text("\n".join(md) + "\n")
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()

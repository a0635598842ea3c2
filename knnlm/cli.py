"""The `knnlm` command: train, datastore, evaluate, run (all three), sweep, analyze.

    knnlm run --config configs/wikitext-2.toml --out runs/wt2          # the whole pipeline
    knnlm train --config configs/tiny.toml --out runs/tiny train.omega=0.01
    knnlm evaluate --out runs/tiny --split test

Options after the flags are `section.key=value` overrides of the config. Errors in the user's input print one
line and exit with status 2 (`--debug` shows the traceback).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

from .artifacts import UserError, read_json, write_json
from .config import Config, apply_overrides, load_config, read_run_config, validate


def _config_for_run(args) -> Config:
    """Config for steps after training: --config if given, else the run's own config.json; then overrides."""
    if args.config:
        return load_config(args.config, args.overrides)
    cfg = apply_overrides(read_run_config(args.out), args.overrides)
    validate(cfg)
    return cfg


def _writable(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-test-", dir=out)  # unique: several ranks may probe at once
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise UserError(f"--out {out}: folder cannot be written ({e.strerror})") from None


def _training_overrides(args) -> list[str]:
    """--omega / --regularizer are shorthands for train.omega= / train.regularizer= overrides."""
    extra = []
    if getattr(args, "omega", None) is not None:
        extra.append(f"train.omega={args.omega}")
    if getattr(args, "regularizer", None) is not None:
        extra.append(f"train.regularizer={args.regularizer}")
    return [*args.overrides, *extra]


def cmd_train(args) -> None:
    from .train import train

    cfg = load_config(args.config, _training_overrides(args))
    out = Path(args.out)
    _writable(out)
    print(json.dumps(train(cfg, out, resume=args.resume), indent=2))


def cmd_datastore(args) -> None:
    from .datastore import build_datastore

    cfg = _config_for_run(args)
    print(build_datastore(args.out, cfg))


def cmd_evaluate(args) -> None:
    from .evaluate import check_lambda, evaluate

    cfg = _config_for_run(args)
    if args.lmbda is not None:
        cfg.eval.lmbda = [check_lambda(args.lmbda)]
    if args.k is not None:
        if args.k <= 0:
            raise UserError(f"--k: expected k > 0, got {args.k}")
        cfg.eval.k, cfg.eval.k_max = [args.k], max(cfg.eval.k_max, args.k)
    what_if = args.k is not None or args.lmbda is not None  # never overwrites the run's tuned choice
    print(json.dumps(evaluate(args.out, cfg, args.split, save=not what_if), indent=2))


def run_pipeline(cfg: Config, out: Path, progress: bool = True) -> dict:
    """Train (or resume), build the datastore, evaluate valid (and test if asked); skip finished steps."""
    from .artifacts import read_meta
    from .checkpoint import latest_checkpoint
    from .datastore import build_datastore
    from .evaluate import evaluate
    from .train import train

    _writable(out)
    if (out / "train_summary.json").is_file():
        train_summary = read_json(out / "train_summary.json")
    else:
        train_summary = train(cfg, out, resume=latest_checkpoint(out) is not None, progress=progress)

    ckpt = read_meta(latest_checkpoint(out), "checkpoint")
    ds_meta = out / "datastore" / "meta.json"
    if not ds_meta.is_file() or read_json(ds_meta)["model_sha256"] != ckpt["model_sha256"]:
        build_datastore(out, cfg, progress=progress)

    results = {"train": train_summary}
    for split in ["valid"] + [s for s in cfg.eval.splits if s != "valid"]:
        results[split] = evaluate(out, cfg, split, progress=progress)
    # wall time of each stage as recorded when it ran (a rerun skips finished stages but keeps their times)
    results["seconds"] = {"train": train_summary["train_seconds"],
                          "datastore": read_json(ds_meta).get("seconds", float("nan"))}
    for split in ["valid"] + [s for s in cfg.eval.splits if s != "valid"]:
        results["seconds"][f"evaluate_{split}"] = sum(results[split]["seconds"].values())
    write_json(out / "results.json", results)
    return results


def format_table(results: dict) -> str:
    tr, va = results["train"], results["valid"]
    paper = va["protocols"]["paper"]
    rows = [("train LM ppl", f"{tr['train_ppl']:.2f}"), ("valid LM ppl", f"{va['lm_ppl']:.2f}"),
            ("valid kNN-LM ppl, tuned", f"{va['knnlm_ppl']:.2f}"),
            (f"valid kNN-LM ppl, paper protocol (T = 1, k = {paper['k']}, λ = {paper['lambda']})", f"{paper['knnlm_ppl']:.2f}")]
    if "test" in results:
        rows += [("test LM ppl", f"{results['test']['lm_ppl']:.2f}"), ("test kNN-LM ppl", f"{results['test']['knnlm_ppl']:.2f}")]
    rows.append(("chosen λ, k, temperature", f"{va['lambda']}, {va['k']}, {va['temperature']}"))
    rows += [(f"time {name} (s)", f"{sec:.0f}") for name, sec in results["seconds"].items()]
    w = max(len(r[0]) for r in rows)
    return "\n".join([f"| {'':{w}} | value |", f"|{'-' * (w + 2)}|-------|"] + [f"| {a:{w}} | {b} |" for a, b in rows])


def cmd_run(args) -> None:
    cfg = load_config(args.config, _training_overrides(args))
    results = run_pipeline(cfg, Path(args.out))
    print(format_table(results))


def cmd_sweep(args) -> None:
    from .sweep import run_sweep

    if args.jobs < 1:
        raise UserError(f"--jobs: expected at least 1, got {args.jobs}")
    if not args.stop_after >= 0:
        raise UserError(f"--stop-after: expected seconds >= 0, got {args.stop_after}")
    if args.threads < 0:
        raise UserError(f"--threads: expected a count >= 0, got {args.threads}")
    run_sweep(args.study, Path(args.out), args.overrides, jobs=args.jobs, stop_after=args.stop_after,
              threads=args.threads, prune=args.prune, results=args.results)


def cmd_analyze(args) -> None:
    from .analysis import analyze

    if args.gmm_repeats < 1:
        raise UserError(f"--gmm-repeats: expected at least 1, got {args.gmm_repeats}")
    analyze(Path(args.out), [Path(r) for r in args.runs], args.labels, gmm_repeats=args.gmm_repeats)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="knnlm", description=__doc__.split("\n")[0])
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = p.add_subparsers(dest="command", required=True)

    def add(name, fn, help_, config_required=False):
        sp = sub.add_parser(name, help=help_)
        sp.add_argument("--config", required=config_required, help="TOML config file")
        sp.add_argument("--out", required=True, help="run folder")
        sp.add_argument("overrides", nargs="*", help="section.key=value")
        sp.set_defaults(fn=fn)
        return sp

    tr = add("train", cmd_train, "train a language model")
    tr.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    add("datastore", cmd_datastore, "write the (key, next token) datastore of a trained run")
    ev = add("evaluate", cmd_evaluate, "LM and kNN-LM perplexity (tunes λ, k, temperature on valid)")
    ev.add_argument("--split", default="valid", choices=["valid", "test"])
    ev.add_argument("--lmbda", type=float, help="fix λ instead of tuning it")
    ev.add_argument("--k", type=int, help="fix k instead of tuning it")
    rn = add("run", cmd_run, "train, datastore and evaluate in one go")
    for sp in (tr, rn):
        sp.add_argument("--omega", type=float, help="weight ω of the key regularizer (train.omega)")
        sp.add_argument("--regularizer", choices=["l2", "moco", "zero-queue", "knn", "pull-ratio"], help="train.regularizer")
    sw = sub.add_parser("sweep", help="the ω study: one model per (regularizer, ω, seed)")
    sw.add_argument("study", help="study config (TOML) under experiments/")
    sw.add_argument("--out", required=True)
    sw.add_argument("--jobs", type=int, default=1,
                    help="models trained and evaluated at once, each in its own process (e.g. several on one GPU)")
    sw.add_argument("--stop-after", type=float, default=0.0,
                    help="start no new run after this many seconds (0: no limit); a rerun continues")
    sw.add_argument("--results", help="where the records, tables and figures go (default: the study's `results` "
                                      "or results/<study name>)")
    sw.add_argument("--threads", type=int, default=0, help="torch threads per job with --jobs > 1 (0: cores / jobs)")
    sw.add_argument("--prune", action="store_true",
                    help="delete the saved valid neighbours of ω > 0 runs once recorded (1.6 GB each at k_max 4096); "
                         "ω = 0 runs keep theirs for the rescaling control")
    sw.add_argument("overrides", nargs="*")
    sw.set_defaults(fn=cmd_sweep)
    an = sub.add_parser("analyze", help="frequency/loss and clustering analyses of evaluated runs")
    an.add_argument("runs", nargs="+", help="run folders (evaluated)")
    an.add_argument("--labels", nargs="*", help="one label per run")
    an.add_argument("--out", required=True)
    an.add_argument("--gmm-repeats", type=int, default=3, help="GMM fits per run, each its own sample and seed")
    an.set_defaults(fn=cmd_analyze)

    # overrides may also follow an option (`knnlm sweep STUDY --out DIR eval.k=64`), where argparse has already
    # filled the positionals
    args, extra = p.parse_known_args(argv)
    if extra and (not hasattr(args, "overrides") or any(x.startswith("-") or "=" not in x for x in extra)):
        p.error(f"unrecognized arguments: {' '.join(extra)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    if getattr(args, "debug", False) or "--debug" in (argv or sys.argv):
        args.fn(args)
        return 0
    try:
        args.fn(args)
    except UserError as e:
        print(f"knnlm: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("knnlm: interrupted; rerun the same command to continue", file=sys.stderr)
        return 130
    except OSError as e:
        where = f"{e.filename}: " if getattr(e, "filename", None) else ""
        print(f"knnlm: error: {where}{e.strerror or e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The `knnlm` command: train, datastore, evaluate, run (all three), targets, sweep, score, generate and more.

    knnlm run --config configs/wikitext-2.toml --out runs/wt2          # the whole pipeline
    knnlm train --config configs/tiny.toml --out runs/tiny train.omega=0.01
    knnlm evaluate --out runs/tiny --split test
    knnlm datastore --out runs/tiny --name vim data.path=data/vim-help   # a second, named datastore (a domain)
    knnlm evaluate --out runs/tiny --datastore vim                       # its valid split, with that datastore

Options after the flags are `section.key=value` overrides of the config. Errors in the user's input print one
line and exit with status 2 (`--debug` shows the traceback).

Each subcommand imports the modules it runs (torch, FAISS) inside its `cmd_*` function, so that `knnlm --help` and
config errors answer in a quarter of a second instead of two.
"""

from __future__ import annotations

import argparse
import json
import math
import signal
import sys
from pathlib import Path

from . import __version__
from .artifacts import UserError, check_digest, read_meta, verify_digests, writing_into
from .config import REGULARIZERS, Config, apply_overrides, load_config, read_run_config, validate
from .report import evaluation_table, memory_table, table, train_table, wrote


def _config_for_run(args, overrides: list[str]) -> Config:
    """--config if given, else the run's own config.json; then overrides."""
    if args.config:
        return load_config(args.config, overrides)
    cfg = apply_overrides(read_run_config(args.out), overrides)
    validate(cfg)
    return cfg


def _training_config(args) -> Config:
    """`knnlm train` / `knnlm run`: a new run needs --config (the built-in defaults are a full-size model);
    continuing a run may reuse its config.json."""
    if not args.config and not (Path(args.out) / "config.json").is_file():
        raise UserError(f"--config: required to start a run (no {Path(args.out) / 'config.json'} to continue); "
                        "e.g. configs/tiny.toml (a minute on a laptop) or configs/wikitext-2.toml")
    return _config_for_run(args, _training_overrides(args))


def _training_overrides(args) -> list[str]:
    """--omega / --regularizer are shorthands for train.omega= / train.regularizer= overrides."""
    extra = []
    if getattr(args, "omega", None) is not None:
        extra.append(f"train.omega={args.omega}")
    if getattr(args, "regularizer", None) is not None:
        extra.append(f"train.regularizer={args.regularizer}")
    return [*args.overrides, *extra]


def cmd_train(args) -> None:
    from .pipeline import check_writable
    from .train import train

    cfg = _training_config(args)  # validated before any file or folder is made
    out = Path(args.out)
    with writing_into(out):
        check_writable(out)
        summary = train(cfg, out, resume=args.resume)
    if summary:  # {}: a rank other than 0 under torchrun
        _report(args, summary, lambda: [train_table(summary), wrote("checkpoints", out / "checkpoints")])


def cmd_datastore(args) -> None:
    from .datastore import build_datastore, check_name
    from .pipeline import check_writable_folders

    if args.name is not None:
        check_name(args.name)  # a path is refused before the config or the run is read
    cfg = _config_for_run(args, args.overrides)
    with writing_into(args.out, create=False):
        if Path(args.out).is_dir():
            check_writable_folders(Path(args.out), *(["datastores"] if args.name else []))
        folder = build_datastore(args.out, cfg, name=args.name)
    record = {"datastore": str(folder)}
    if args.name is not None:
        from .artifacts import read_json

        meta = read_json(folder / "meta.json", "datastore meta")
        record.update({"name": args.name, "corpus": meta["corpus"], "keys": meta["N"], "oov_rate": meta["oov_rate"]})
    _report(args, record, lambda: [*([f"{record['keys']:,} keys from {record['corpus']} ({100 * record['oov_rate']:.2f}% "
                                       "<unk>: words the run's vocabulary lacks)"] if args.name else []),
                                   wrote("datastore", folder)])


def cmd_evaluate(args) -> None:
    from .datastore import check_name
    from .evaluate import check_lambda, evaluate
    from .pipeline import check_writable_folders

    if args.datastore is not None:
        check_name(args.datastore, "--datastore")  # a path is refused before the run is read
    cfg = _config_for_run(args, args.overrides)
    if args.lmbda is not None:
        cfg.eval.lmbda = [check_lambda(args.lmbda)]
    if args.k is not None:
        if args.k <= 0:
            raise UserError(f"--k: expected k > 0, got {args.k}")
        cfg.eval.k, cfg.eval.k_max = [args.k], max(cfg.eval.k_max, args.k)
    if args.temperature is not None:
        if not (args.temperature > 0 and math.isfinite(args.temperature)):
            raise UserError(f"--temperature: expected a finite value > 0, got {args.temperature}")
        cfg.eval.temperature = [args.temperature]
    fixed = {key: v for key, v in (("k", args.k), ("lambda", args.lmbda), ("temperature", args.temperature))
             if v is not None}  # a what-if: never overwrites the run's tuned choice or its summaries
    if args.memory:
        from .evaluate import evaluate_memory

        if args.datastore:
            raise UserError("--memory: is evaluated with the run's own datastore; leave out --datastore")
        if fixed:
            raise UserError("--memory: tunes its own λ, k and temperature on valid; drop --k/--lmbda/--temperature")
        with writing_into(args.out, create=False), writing_into(args.memory, create=False):
            summary = evaluate_memory(args.out, args.memory, cfg, args.split)
        where = Path(args.memory) / "memory_eval" / args.split / "summary.json"
        _report(args, summary, lambda: [memory_table(summary), wrote("summary", where)])
        return
    # a what-if evaluation reads the saved search and writes nothing, so it also runs where nobody can write
    with writing_into(args.out, create=False, read_only=bool(fixed)):
        place = None
        if Path(args.out).is_dir():
            from .evaluate import place_for

            place = place_for(args.out, cfg, args.datastore)  # a missing datastore is named now
            if not fixed:
                check_writable_folders(Path(args.out), "eval", str(place.root.relative_to(Path(args.out))))
        summary = evaluate(args.out, cfg, args.split, save=not fixed, fixed=fixed, datastore=args.datastore)
    if summary is not None:  # None: a rank other than 0 under torchrun
        where = place.folder(args.split)
        closing = (wrote("what-if only, nothing saved; the run's summary stays", where / "summary.json") if fixed
                   else wrote("summary and per-token arrays", where))
        _report(args, summary, lambda: [evaluation_table(summary), closing])


def _report(args, record: dict, human) -> None:
    """A command's record as JSON (--json), else the lines `human()` returns (tables, where results went)."""
    print(json.dumps(record, indent=2) if getattr(args, "json", False) else "\n".join(human()))


def format_table(results: dict) -> str:
    tr, va = results["train"], results["valid"]
    paper = va["protocols"]["paper"]
    rows = [("train LM ppl", f"{tr['train_ppl']:.2f}"), ("valid LM ppl", f"{va['lm_ppl']:.2f}"),
            ("valid kNN-LM ppl, tuned", f"{va['knnlm_ppl']:.2f}"),
            (f"valid kNN-LM ppl, paper protocol (T = 1, k = {paper['k']}, λ = {paper['lambda']})", f"{paper['knnlm_ppl']:.2f}")]
    if va.get("words", va["tokens"]) != va["tokens"]:  # another tokenizer than whitespace words: per word too
        rows.append(("valid LM / kNN-LM ppl per word", f"{va['lm_word_ppl']:.2f} / {va['knnlm_word_ppl']:.2f}"))
    if va.get("oov_rate"):
        rows.append(("valid OOV rate (<unk> tokens)", f"{100 * va['oov_rate']:.2f}%"))
    if "test" in results:
        rows += [("test LM ppl", f"{results['test']['lm_ppl']:.2f}"), ("test kNN-LM ppl", f"{results['test']['knnlm_ppl']:.2f}")]
    rows.append(("chosen λ, k, temperature", f"{va['lambda']}, {va['k']}, {va['temperature']}"))
    rows += [(f"time {name} (s)", "?" if sec is None else f"{sec:.0f}") for name, sec in results["seconds"].items()]
    return table(rows)


def cmd_run(args) -> None:
    from .pipeline import run_pipeline

    cfg = _training_config(args)
    results = run_pipeline(cfg, Path(args.out))
    if results is not None:  # None: a rank other than 0 under torchrun
        _report(args, results, lambda: [format_table(results), wrote("results", Path(args.out) / "results.json")])


def cmd_targets(args) -> None:
    from .targets import build_targets

    cfg = _config_for_run(args, args.overrides)
    with writing_into(args.out, create=False):
        folder = build_targets(args.out, cfg)
    _report(args, {"targets": str(folder)}, lambda: [wrote("targets", folder)])


def cmd_sweep(args) -> None:
    from .studies.engine import run_sweep

    if args.jobs < 1:
        raise UserError(f"--jobs: expected at least 1, got {args.jobs}")
    if not args.stop_after >= 0:
        raise UserError(f"--stop-after: expected seconds >= 0, got {args.stop_after}")
    if args.threads < 0:
        raise UserError(f"--threads: expected a count >= 0, got {args.threads}")
    run_sweep(args.study, Path(args.out), args.overrides, jobs=args.jobs, stop_after=args.stop_after,
              threads=args.threads, prune=args.prune, results=args.results, tables_only=args.tables_only,
              early=args.early)


def cmd_twins(args) -> None:
    from .artifacts import write_json, write_text
    from .studies.twins import device_twins, twins_markdown

    twins = device_twins([Path(f) for f in args.first], [Path(f) for f in args.second])
    if not twins["runs"]:
        raise UserError("--first/--second: no run is recorded in both with the same training settings on two devices")
    text = twins_markdown(twins)
    print(text)
    if args.out:
        write_text(Path(args.out).with_suffix(".md"), text)
        write_json(Path(args.out).with_suffix(".json"), twins)


def cmd_analyze(args) -> None:
    from .studies.analysis import analyze

    if args.gmm_repeats < 1:
        raise UserError(f"--gmm-repeats: expected at least 1, got {args.gmm_repeats}")
    analyze(Path(args.out), [Path(r) for r in args.runs], args.labels, gmm_repeats=args.gmm_repeats)


def cmd_data(args) -> None:
    from .download import fetch

    print(fetch(args.name, args.dest or Path("data") / args.name, url=args.url))


def _load_run(args):
    from .api import load

    settings = {name: getattr(args, arg) for name, arg in (("k", "k"), ("knn_temperature", "temperature"), ("lmbda", "lmbda"))
                if getattr(args, arg) is not None}
    return load(args.out, args.protocol, memory=args.memory, datastore=args.datastore, **settings)


def cmd_score(args) -> None:
    path = Path(args.file)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UserError(f"{path}: not UTF-8 text") from None
    except OSError as e:
        raise UserError(f"{path}: cannot read the text file to score ({e.strerror})") from None
    if not text:
        raise UserError(f"{path}: the file is empty; expected UTF-8 text to score")
    lm = _load_run(args)
    scored = lm.score(text)
    if args.tokens:
        print("token\tlm\tknn\tknnlm")
        for r in scored.rows():
            print(f"{r['token']}\t{r['lm']:.6f}\t{r['knn']:.6f}\t{r['knnlm']:.6f}")
    record = {"file": str(path), "tokens": len(scored.tokens), "words": scored.words, "lm_ppl": scored.lm_ppl,
              "knnlm_ppl": scored.ppl, "knnlm_word_ppl": scored.word_ppl}
    if args.explain is not None:
        record["explain"] = _explain(lm, text, scored, args.explain)
    _report(args, record, lambda: [*_explain_lines(record.get("explain")),
                                   f"{path}: {len(scored.tokens)} tokens, LM ppl {scored.lm_ppl:.2f}, kNN-LM ppl "
                                   f"{scored.ppl:.2f} (nothing written; --tokens lists every token)"])


def _explain(lm, text: str, scored, n: int) -> dict:
    """Token n of the scored text, its probabilities and the neighbours of the key that predicts it."""
    if not 0 <= n < len(scored.tokens):
        raise UserError(f"--explain: expected a token index in [0, {len(scored.tokens)}), got {n}")
    near = lm.neighbours(lm.encode(text)[:n])
    return {"token": n, "text": scored.tokens[n], "lm": float(scored.lm[n]), "knn": float(scored.knn[n]),
            "knnlm": float(scored.logprobs[n]), "neighbours": near.rows()}


def _explain_lines(explained: dict | None) -> list[str]:
    if explained is None:
        return []
    e = explained
    lines = [f"token {e['token']} {e['text']!r}: log p LM {e['lm']:.3f}, kNN {e['knn']:.3f}, kNN-LM {e['knnlm']:.3f}; "
             f"its {len(e['neighbours'])} nearest training contexts:"]
    for r in e["neighbours"]:
        lines.append(f"  #{r['id']:<9} d={r['distance']:<10.3f} … {r['before']} [{r['next']}] {r['after']} …"
                     .replace("\n", " / "))
    return lines


def cmd_generate(args) -> None:
    lm = _load_run(args)
    text = lm.generate(args.prompt, args.max_tokens, greedy=args.greedy, temperature=args.sample_temperature,
                       top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    word_level = lm.tokenizer is None and args.prompt and text and not text.startswith("\n")
    print(args.prompt + (" " if word_level else "") + text)


def cmd_verify(args) -> None:
    """Check every digest the run's meta.json files record: each checkpoint's weights, the datastore's keys and
    values, each evaluation's arrays. Reads every file in full (keys.npy: minutes for WikiText-103)."""
    from .checkpoint import checkpoint_dirs
    from .datastore import Datastore, datastore_names
    from .evaluate import load_search

    out = Path(args.out)
    if not out.is_dir():
        raise UserError(f"--out {out}: run folder not found")
    checked, unrecorded = 0, []
    for ckpt in checkpoint_dirs(out):
        check_digest(ckpt / "model.safetensors", read_meta(ckpt, "checkpoint", {"model_sha256": str})["model_sha256"])
        checked += 1
    # the run's own datastore and each named one (RUN/datastores/NAME), each with its evaluations: eval/<split> and
    # eval-<text>/<split> (another text than the datastore's own)
    homes = [out, *(out / "datastores" / name for name in datastore_names(out))]
    datastores = [home / "datastore" for home in homes]
    evaluations = sorted(split for home in homes for root in [home / "eval", *sorted(home.glob("eval-*"))]
                         if root.is_dir() and not root.is_symlink() for split in root.glob("*"))
    for folder in [*datastores, *evaluations]:
        if (folder / "meta.json").is_file():  # incomplete or pruned folders are no artifact (readers refuse them)
            # the arrays' shapes against meta.json first, as their readers check them (N, tokens, k_max)
            Datastore(folder) if folder in datastores else load_search(folder)
            names = verify_digests(folder, read_meta(folder, folder.name))
            checked += len(names)
            if not names:
                unrecorded.append(str(folder.relative_to(out)))
    if not checked and not unrecorded:
        raise UserError(f"{out}: no complete checkpoint, datastore or evaluation to verify")
    old = f"; {', '.join(unrecorded)}: no digests recorded (written by an older knnlm)" if unrecorded else ""
    print(f"OK: {out}: {checked} files match the digests their meta.json recorded{old}")


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Help that shows each option's default, where it has one (not for flags, nor options that default to nothing)."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False or action.default == "":
            return action.help
        return super()._get_help_string(action)


class Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler's or `kill`'s stop), handled as Ctrl-C is: the temporary files and folders of the step
    under way are removed on the way out."""


def _terminate(signum, frame):
    raise Terminated()


def _interrupted(args, e: KeyboardInterrupt) -> int:
    again = ("rerun it with --resume to continue" if args.command == "train" and not args.resume
             else "rerun the same command to continue")
    print(f"knnlm: {'terminated' if isinstance(e, Terminated) else 'interrupted'}; {again}", file=sys.stderr)
    return 143 if isinstance(e, Terminated) else 130


def main(argv: list[str] | None = None) -> int:
    try:  # only the main thread may set a handler (a caller running main in another thread keeps its own)
        previous = signal.signal(signal.SIGTERM, _terminate)
    except ValueError:
        previous = None
    try:
        return _main(argv)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="knnlm", description=__doc__.split("\n")[0], formatter_class=_HelpFormatter)
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = p.add_subparsers(dest="command", required=True)

    def add(name, fn, help_):
        sp = sub.add_parser(name, help=help_)
        sp.add_argument("--config", help="TOML config file (default: the run's config.json, written when it started)")
        sp.add_argument("--out", required=True, help="run folder")
        sp.add_argument("overrides", nargs="*", help="section.key=value")
        sp.add_argument("--json", action="store_true", help="print the command's record as JSON, not a table")
        sp.set_defaults(fn=fn)
        return sp

    tr = add("train", cmd_train, "train a language model")
    tr.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    ds = add("datastore", cmd_datastore, "write the (key, next token) datastore of a trained run")
    ds.add_argument("--name", help="a second datastore of the run, of another text (data.path=DIR, read with the "
                                   "run's vocabulary): written to RUN/datastores/NAME, the run's own left as it is")
    ev = add("evaluate", cmd_evaluate, "LM and kNN-LM perplexity (tunes λ, k, temperature on valid)")
    ev.add_argument("--split", default="valid", choices=["valid", "test"],
                    help="test reuses valid's choice of λ, k, temperature")
    ev.add_argument("--lmbda", type=float, help="fix λ instead of tuning it")
    ev.add_argument("--k", type=int, help="fix k instead of tuning it")
    ev.add_argument("--temperature", type=float, help="fix the kNN temperature instead of tuning it")
    ev.add_argument("--memory", help="a memory model's run folder (trained on this run's `knnlm targets`): "
                                     "evaluate the LM with it beside, without and with the kNN on top")
    ev.add_argument("--datastore", metavar="NAME", help="search the run's datastore of this name (`knnlm datastore "
                    "--name`) and read its text's split; results in RUN/datastores/NAME/eval")
    rn = add("run", cmd_run, "train, datastore and evaluate in one go")
    for sp in (tr, rn):
        sp.add_argument("--omega", type=float, help="weight ω of the key regularizer (train.omega)")
        sp.add_argument("--regularizer", choices=REGULARIZERS, help="train.regularizer")
    add("targets", cmd_targets, "p_kNN of every training position, its own entry left out (for distillation)")
    sw = sub.add_parser("sweep", help="a study: one model per (ω, seed) and per run its stages ask for")
    sw.add_argument("study", help="study config (TOML) under experiments/")
    sw.add_argument("--out", required=True)
    sw.add_argument("--jobs", type=int, default=1,
                    help="models trained and evaluated at once, each in its own process (e.g. several on one GPU)")
    sw.add_argument("--stop-after", type=float, default=0.0,
                    help="start no new run after this many seconds (0: no limit); a rerun continues")
    sw.add_argument("--results", help="where the records, tables and figures go (default: the study's `results` "
                                      "or results/<study name>)")
    sw.add_argument("--tables-only", action="store_true",
                    help="rewrite the study's tables and figures from its recorded runs; train nothing")
    sw.add_argument("--threads", type=int, default=0, help="torch threads per job with --jobs > 1 (0: cores / jobs)")
    sw.add_argument("--prune", action="store_true",
                    help="delete the saved test neighbours, and the valid ones of ω > 0 runs, once recorded (1.6 GB "
                         "each at k_max 4096); ω = 0 runs keep their valid ones for the rescaling control")
    sw.add_argument("--early", action="store_true",
                    help="start the stages' runs beside the grid where the records so far choose them (e.g. the "
                         "compare stage's at the best ω > 0 so far): room for more models at once, e.g. on a GPU")
    sw.add_argument("overrides", nargs="*")
    sw.set_defaults(fn=cmd_sweep)
    tw = sub.add_parser("twins", help="runs recorded on two devices: first − second, and mean ± std (a device's effect)")
    tw.add_argument("--first", nargs="+", required=True, help="folders of study records (an earlier folder wins)")
    tw.add_argument("--second", nargs="+", required=True, help="folders of study records (an earlier folder wins)")
    tw.add_argument("--out", help="also write OUT.md and OUT.json")
    tw.set_defaults(fn=cmd_twins)
    an = sub.add_parser("analyze", help="frequency/loss and clustering analyses of evaluated runs")
    an.add_argument("runs", nargs="+", help="run folders (evaluated)")
    an.add_argument("--labels", nargs="*", help="one label per run")
    an.add_argument("--out", required=True)
    an.add_argument("--gmm-repeats", type=int, default=3, help="GMM fits per run, each its own sample and seed")
    an.set_defaults(fn=cmd_analyze)
    for name, fn, help_ in (("score", cmd_score, "per-token LM and kNN-LM log-probabilities of a text file"),
                            ("generate", cmd_generate, "continue a prompt with the kNN-LM")):
        sp = sub.add_parser(name, help=help_)
        sp.add_argument("--out", required=True, help="a finished run folder (trained, datastore, valid evaluated)")
        sp.add_argument("--protocol", default="tuned", choices=["tuned", "paper"],
                        help="use the run's valid choice of k, temperature and λ under this protocol")
        sp.add_argument("--k", type=int, help="number of neighbours (instead of the run's choice)")
        sp.add_argument("--temperature", type=float, help="kNN temperature (instead of the run's choice)")
        sp.add_argument("--lmbda", type=float, help="interpolation weight λ (instead of the run's choice)")
        sp.add_argument("--memory", help="a memory model's run folder: its distribution mixed with the LM's at the "
                                         "λ tuned by `knnlm evaluate --memory` (then --lmbda 0: no retrieval)")
        sp.add_argument("--datastore", metavar="NAME", help="the run's datastore of this name (`knnlm datastore "
                        "--name`), at the settings `knnlm evaluate --datastore NAME` chose")
        sp.set_defaults(fn=fn)
        if name == "score":
            sp.add_argument("file", help="UTF-8 text, read like a corpus file (one end-of-line token per line)")
            sp.add_argument("--tokens", action="store_true", help="also print one tab-separated line per token")
            sp.add_argument("--json", action="store_true", help="print the totals as JSON")
            sp.add_argument("--explain", type=int, metavar="N",
                            help="also print the nearest training contexts of token N (0-based) and what followed them")
        else:
            sp.add_argument("--prompt", default="", help="text to continue")
            sp.add_argument("--max-tokens", type=int, default=50, help="tokens to generate")
            sp.add_argument("--greedy", action="store_true", help="the most likely token at every step")
            sp.add_argument("--sample-temperature", type=float, default=1.0, help="softmax temperature of sampling")
            sp.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (0: all)")
            sp.add_argument("--top-p", type=float, default=1.0, help="nucleus: the smallest set holding this mass")
            sp.add_argument("--seed", type=int, help="random seed of sampling")
    da = sub.add_parser("data", help="download, verify and unpack a WikiText corpus")
    da.add_argument("name", choices=["wikitext-2", "wikitext-103"])
    da.add_argument("--dest", help="corpus folder to create (default: data/NAME)")
    da.add_argument("--url", help="archive URL, or a base URL the archive name is appended to "
                                  "(default: $KNNLM_DATA_URL, else the official S3 archive)")
    da.set_defaults(fn=cmd_data)
    ve = sub.add_parser("verify", help="check a run's files against the sha256 digests its meta.json files record")
    ve.add_argument("--out", required=True, help="run folder")
    ve.set_defaults(fn=cmd_verify)
    for sp in sub.choices.values():  # `knnlm run --debug ...` as well as `knnlm --debug run ...`
        sp.formatter_class = _HelpFormatter
        sp.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")

    # overrides may also follow an option (`knnlm sweep STUDY --out DIR eval.k=64`), where argparse has already
    # filled the positionals
    args, extra = p.parse_known_args(argv)
    if extra and (not hasattr(args, "overrides") or any(x.startswith("-") or "=" not in x for x in extra)):
        p.error(f"unrecognized arguments: {' '.join(extra)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    if args.debug:
        args.fn(args)
        return 0
    try:
        args.fn(args)
    except UserError as e:
        print(f"knnlm: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        return _interrupted(args, e)
    except OSError as e:
        where = f"{e.filename}: " if getattr(e, "filename", None) else ""
        print(f"knnlm: error: {where}{e.strerror or e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

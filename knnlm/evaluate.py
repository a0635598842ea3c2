"""Evaluate LM and kNN-LM perplexity: `knnlm evaluate --out RUN [--split valid|test]`.

Compute once, tune many times. The model scores the split with the same sliding windows as the datastore; each
query key is searched once for its `k_max` nearest keys; the per-token arrays are saved in RUN/eval/<split>/:

    targets.npy (n,) int32        lm_logprobs.npy (n,) fp32     query_keys.npy (n, d) fp16
    neighbors.npy (n, K) row ids  distances.npy (n, K) fp32     knn_logprobs.npy (n,) at the chosen k, temperature
    summary.json                  tuning.json (kNN-LM ppl for every (k, temperature, λ) of the grid)
    meta.json                     written last: model hash, index, k_max, token count, stage times

Two evaluation protocols are reported side by side, both chosen on valid from the same single search (test reuses
each protocol's valid choice):

- `tuned`: λ, k and temperature tuned over the grid `eval.lmbda` × `eval.k` × `eval.temperature`;
- `paper`: the protocol of Khandelwal et al.'s code and of Ton et al. (2022): p_kNN ∝ exp(−d), i.e. temperature 1,
  k = 1024 (or `eval.k_max` if smaller), only λ tuned over `eval.lmbda`.

A second `evaluate` with another grid reads the saved neighbours and never searches again.

Which datastore, which text, where (`Place`): `--datastore NAME` searches the run's named datastore
(`knnlm.datastore`) and reads the valid/test splits of the corpus it was built from, into
RUN/datastores/NAME/eval/<split>. A `data.path=DIR` naming a text other than the datastore's own (e.g. a domain's
valid split searched in the run's own datastore) is read with the run's vocabulary and evaluated into
HOME/eval-<folder name>-<digest>/<split> (HOME: the run folder, or RUN/datastores/NAME), never into the folder of
the datastore's own text.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from .artifacts import (UserError, nan_at, atomic_dir, check_fields, file_sha256, kill_point, load_npy, read_json,
                        save_npy, swapping, write_json)
from .checkpoint import latest_meta, load_model
from .config import Config, from_dict
from .data import cache_key, corpus_files, token_stream, split_ids
from .datastore import Datastore, datastore_home, neighbour_values, stride_of
from .distributed import barrier, broadcast_array, default_device, setup_distributed
from .knn import KnnScores, KnnTable, grid_table, interpolate, perplexities, perplexity
from .search.auto import choose_exact_search
from .search.base import CountingSearch, search_all
from .search.registry import EXACT, make_searcher, resolve_index
from .search.sharded import ShardedSearch
from .models import corpus_for, corpus_for_run
from .scoring import score_stream

ARRAYS = ("targets", "lm_logprobs", "query_keys", "neighbors", "distances")
TABLE_ARRAYS = ("knn_grid", "target_rank")  # with eval.k_store < eval.k_max (`KnnTable`)

PAPER_K, PAPER_TEMPERATURE = 1024, 1.0
PROTOCOLS = {
    "tuned": "λ, k and temperature tuned on valid over eval.lmbda × eval.k × eval.temperature",
    "paper": "temperature 1 (p_kNN ∝ exp(−d), Khandelwal et al.'s code, Ton et al. 2022), k = 1024 "
             "(eval.k_max if smaller), λ tuned on valid over eval.lmbda",
}


@dataclass(frozen=True)
class Place:
    """Which datastore answers an evaluation, which corpus's valid and test splits it reads, where its results go."""

    datastore: Path  # RUN/datastore, or RUN/datastores/NAME/datastore
    data_path: str  # the corpus whose split is evaluated (a config's data.path)
    root: Path  # results: root/<split>/
    name: str | None = None  # the named datastore (None: the run's own)

    def folder(self, split: str) -> Path:
        return self.root / split

    def command(self, run: Path) -> str:
        """The `knnlm evaluate` options that name this place (for messages)."""
        return f"--out {run}" + (f" --datastore {self.name}" if self.name else "")


def place_for(run: str | Path, cfg: Config, datastore: str | None = None) -> Place:
    """Where `knnlm evaluate [--datastore NAME] [data.path=DIR]` reads and writes.

    The text is the datastore's own corpus (the run's for its own datastore, the one a named datastore was built
    from) unless `cfg.data.path` names another than the run's training config does; results of the datastore's own
    text go to HOME/eval/<split>, those of another text (compared by content) to HOME/eval-<folder>-<digest>/<split>."""
    run = Path(run)
    home = datastore_home(run, datastore)  # a named one must exist: else the names there are
    own_path = read_run_data_path(run)
    meta_path = home / "datastore" / "meta.json"
    meta = read_json(meta_path, "datastore meta") if meta_path.is_file() else {}
    meta = meta if isinstance(meta, dict) else {}  # a damaged one is refused by `Datastore` itself
    if datastore is not None:
        own_path = str(meta.get("corpus", ""))
    data_path = own_path if datastore is not None and cfg.data.path == read_run_data_path(run) else cfg.data.path
    root = home / "eval"
    if data_path != own_path:
        folder, files = corpus_files(data_path or None)
        digest = cache_key(files)
        if digest != meta.get("corpus_sha256"):
            slug = re.sub(r"[^A-Za-z0-9._-]+", "-", folder.resolve().name).strip("-.") or "corpus"
            root = home / f"eval-{slug[:40]}-{digest[:8]}"
    return Place(home / "datastore", data_path, root, datastore)


def read_run_data_path(run: Path) -> str:
    """The corpus the run was trained on, as its checkpoint's config names it ("" = the default)."""
    meta = latest_meta(run)
    return from_dict(meta["config"], meta["path"]).data.path


def paper_k(cfg: Config) -> int:
    """k of the paper protocol: 1024, or every stored neighbour when fewer are searched."""
    return min(PAPER_K, cfg.eval.k_max)


def scoring_settings(ds: Datastore, train_cfg: Config) -> tuple[int, bool]:
    """Stride and precision of the pass that scores a split: the datastore's own, so that query keys come from the
    same windows and arithmetic as the stored keys (datastores written before knnlm 0.2 used the checkpoint's)."""
    return ds.meta.get("stride", stride_of(train_cfg)), ds.meta.get("bf16", train_cfg.train.bf16)


def datastore_fingerprint(ds: Datastore) -> str:
    """What identifies a datastore's contents (not where or how fast it was built)."""
    fields = {k: v for k, v in ds.meta.items() if k not in ("seconds", "checkpoint", "corpus", "ranks")}
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]


def _search_is_cached(folder: Path, ds: Datastore, index: str, k_max: int, rerank: bool, inputs: dict,
                      targets: np.ndarray, k_store: int = 0, grid: dict | None = None) -> bool:
    """True only if the saved search answers exactly these inputs: the same datastore and model, the same tokens of
    the same split with the same vocabulary, stride and precision, and at least k_max neighbours of the same index
    (all of them stored; or, where `grid` asks for a table (`KnnTable`), the same k_max, at least k_store stored,
    and every (k, temperature) of `grid` on the saved table's grid or within its stored neighbours). The tokens
    are compared with the saved targets themselves, so any change of the text recomputes."""
    if not (folder / "meta.json").is_file():
        return False
    meta = read_eval_meta(folder)
    same_index = meta.get("index") == index or (meta.get("index") in EXACT and index in EXACT)  # exact = exact
    saved_grid = meta.get("grid")
    if saved_grid is None:  # every neighbour stored: answers any grid
        enough = meta.get("k_max", 0) >= k_max
    else:  # a table: the same k_max, as many neighbours stored, and every asked (k, T) on its grid or within them
        enough = (grid is not None and meta.get("k_max") == k_max and meta.get("k_store", 0) >= k_store and all(
            (k in saved_grid["k"] and t in saved_grid["temperature"]) or k <= meta["k_store"]
            for k in grid["k"] for t in grid["temperature"]))
    if not (meta.get("model_sha256") == ds.meta["model_sha256"] and same_index
            and enough and meta.get("rerank", True) == rerank
            and meta.get("tokens") == len(targets) and meta.get("datastore_size") == len(ds)):
        return False
    # folders from before these were recorded carry the only settings the code then used: the checkpoint's
    recorded = meta.get("inputs", {})
    if any(recorded.get(key, value) != value for key, value in inputs.items()):
        return False
    saved = load_search(folder)[1]["targets"]  # a damaged folder is refused, not silently replaced
    return saved.shape == targets.shape and bool(np.array_equal(saved, targets))


def read_eval_meta(folder: Path) -> dict:
    """An evaluation's meta.json, with the entries its readers rely on checked (a hand-edited one is refused)."""
    if not (folder / "meta.json").is_file():
        raise UserError(f"{folder}: no complete evaluation here (meta.json missing; was the step run to the end?)")
    path = folder / "meta.json"
    meta = check_fields(read_json(path, "evaluation meta"), path, {"tokens": int, "k_max": int})
    grid = meta.get("grid")
    if grid is not None and not (isinstance(grid, dict) and isinstance(meta.get("k_store"), int)
                                 and 1 <= meta["k_store"] <= meta["k_max"]
                                 and all(isinstance(grid.get(a), list) and grid[a] for a in ("k", "temperature"))):
        raise UserError(f"{path}: 'grid' should be {{\"k\": [...], \"temperature\": [...]}} with 'k_store' in "
                        f"[1, k_max], found {_shown(grid)}")
    for key in ("tokens", "k_max"):
        if meta[key] < (1 if key == "k_max" else 0):
            raise UserError(f"{path}: {key!r} should be {'positive' if key == 'k_max' else 'non-negative'}, "
                            f"found {meta[key]!r}")
    if where := nan_at(meta):
        raise UserError(f"{path}: NaN at {where}; expected numbers (the file was edited)")
    optional = {"inputs": (dict, "a JSON object"), "seconds": (dict, "a JSON object of seconds"),
                "index": (str, "a string"), "words": (int, "a positive integer"),
                "datastore_size": (int, "an integer"), "searched_queries": ((int, type(None)), "an integer or null")}
    for key, (typ, kind) in optional.items():
        value = meta.get(key)
        if key in meta and (not isinstance(value, typ) or isinstance(value, bool)
                            or (key == "words" and value < 1)
                            or (key == "seconds" and not all(_number(v) is not None for v in value.values()))):
            raise UserError(f"{path}: {key!r} should be {kind}, found {_shown(value)}")
    return meta


def load_search(folder: Path) -> tuple[dict, dict[str, np.ndarray]]:
    """An evaluation's meta.json (written last) and its saved per-token arrays, checked against it; both are read under
    one shared lock, so a re-evaluation never pairs the old meta with the new arrays."""
    with swapping(folder, exclusive=False):  # never the old meta with the new arrays of a re-evaluation
        meta = read_eval_meta(folder)
        names = ARRAYS + (TABLE_ARRAYS if meta.get("grid") is not None else ())
        arrays = {a: load_npy(folder / f"{a}.npy", mmap=a in ("query_keys", "neighbors", "distances", "knn_grid"))
                  for a in names}
    n, K = meta["tokens"], meta["k_store"] if meta.get("grid") is not None else meta["k_max"]  # neighbours stored
    table = (n, len(meta["grid"]["k"]), len(meta["grid"]["temperature"])) if meta.get("grid") is not None else None
    for name, arr in arrays.items():
        want = ((n, K) if name in ("neighbors", "distances") else (n,) if name in ("targets", "lm_logprobs", "target_rank")
                else table if name == "knn_grid" else None)
        if arr.shape[:1] != (n,) or (want is not None and arr.shape != want):
            raise UserError(f"{folder / (name + '.npy')}: shape {arr.shape} disagrees with meta.json ({n} tokens, "
                            f"{K} neighbours stored)")
    return meta, arrays


def searcher_for(ds: Datastore, cfg: Config, sharded: bool = False, k: int | None = None,
                 queries: np.ndarray | None = None):
    """The search backend `cfg.eval` asks for over a datastore (an index is loaded from, or saved to, its folder).
    `sharded`: under `torchrun`, each rank searches its share of the store with that (exact) backend. `k`: the
    neighbours it will be asked for (default `eval.k_max`), at which `auto` times its candidates; `queries`: those
    it will be asked about, on which `auto` times them (default: stored keys)."""
    e = cfg.eval
    if sharded:
        return ShardedSearch(ds.keys, lambda rows: make_searcher(rows, resolve_index(e.index)))
    if e.index.strip() == "auto":  # the fastest exact search on this store, by a probe remembered in knnlm's cache
        return choose_exact_search(ds.keys, k or e.k_max, None, ds.meta["model_sha256"],  # remembered in the cache
                                   probe_queries=queries)
    return make_searcher(ds.keys, resolve_index(e.index), e.nprobe, ds.folder, ds.meta["model_sha256"],
                         rerank_factor=e.rerank_factor if e.rerank else 0)


def score_and_search(run: Path, cfg: Config, split: str, progress: bool = True, save: bool = True,
                     place: Place | None = None) -> dict | None:
    """The expensive part: LM scores, query keys and k_max neighbours of every token of `split` (cached).

    `save=False` (a what-if evaluation) only reads a saved search: one that must be made anew is refused, since
    saving it would replace the folder that holds the run's results.

    Under `torchrun` with an exact index the store is split across the ranks (`ShardedSearch`): rank 0 scores the
    split and sends the query keys to all, every rank searches its share, rank 0 writes the result and returns it
    (the other ranks return None). An approximate index is searched by rank 0 alone.

    `place`: which datastore and text, and where the result goes (default: the run's own, `place_for`)."""
    rank, world, dev = setup_distributed()
    main = rank == 0
    place = place or place_for(run, cfg)
    ckpt_meta = latest_meta(run)  # the model itself is loaded only if the split must be scored
    ds = Datastore(place.datastore)
    ds.check_model(ckpt_meta)
    e = cfg.eval
    if e.k_max > len(ds):
        raise UserError(f"eval.k_max: {e.k_max} is larger than the datastore ({len(ds)} keys)")
    index = resolve_index(e.index)
    folder = place.folder(split)
    rerank = e.rerank or index in EXACT  # exact searches need no re-ranking
    corpus = corpus_for_run(run, dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, path=place.data_path)),
                            ckpt_meta)  # another text than the run's own: read with the run's vocabulary
    ids = split_ids(corpus, cfg, split)
    train_cfg = from_dict(ckpt_meta["config"], ckpt_meta["path"])
    stride, bf16 = scoring_settings(ds, train_cfg)
    inputs = {"split": split, "vocab_hash": corpus.vocab_hash, "datastore": datastore_fingerprint(ds),
              "stride": stride, "bf16": bf16, "key_site": ds.meta["key_site"], "key_layer": ds.meta["key_layer"]}
    k_store = e.k_store or e.k_max
    ks, temperatures = tuning_grid(cfg)
    grid = {"k": ks, "temperature": temperatures} if k_store < e.k_max else None  # a table, not every neighbour
    asked = {"k": e.k, "temperature": e.temperature} if grid else None  # what a saved table must answer
    if _search_is_cached(folder, ds, index, e.k_max, rerank, inputs, ids, k_store, asked):  # every rank reads it
        return read_eval_meta(folder) if main else None
    if not save:
        raise UserError(what_if_needs_a_search(run, folder, split, e.k_max, place))
    sharded = world > 1 and index in EXACT
    if not (main or sharded):
        barrier()  # rank 0 searches the approximate index alone
        return None

    t0 = time.time()
    q = None
    if main:
        model, train_cfg, ckpt_meta = load_model(run, dev)
        s = token_stream(ids, corpus.eos_id)
        keys, targets, lm = [], [], []
        bar = tqdm(total=len(ids), desc=f"score {split}", unit="tok", unit_scale=True, disable=not progress,
                   dynamic_ncols=True)
        for batch, (k, tgt, lp) in enumerate(score_stream(model, s, stride, cfg.datastore.batch_size, bf16), 1):
            keys.append(k), targets.append(tgt), lm.append(lp)
            bar.update(len(tgt))
            kill_point("evaluate", batch)
        bar.close()
        q = torch.cat(keys).numpy()
        targets = torch.cat(targets).numpy().astype(np.int32)
        lm = torch.cat(lm).numpy()
    if sharded:
        q = broadcast_array(q)
    t_lm = time.time() - t0

    t0 = time.time()
    searcher = CountingSearch(searcher_for(ds, cfg, sharded, queries=q))
    t_index = time.time() - t0
    t0 = time.time()
    each, tables = None, {}
    if grid is not None and main:  # each batch's k_max neighbours reduced to the grid's scores as they come
        values, dev = ds.vals, default_device()

        def each(lo: int, d: np.ndarray, i: np.ndarray) -> None:
            tables[lo] = grid_table(d, values[i], targets[lo : lo + len(d)], ks, temperatures, dev)
    D, I = search_all(searcher, q, e.k_max, progress=progress and main, keep=k_store, each=each)
    t_search, searched = time.time() - t0, searcher.queries
    if not main:
        barrier()  # until rank 0 has written the result
        return None

    id_dtype = np.int32 if len(ds) < 2**31 else np.int64
    record = {"model_sha256": ds.meta["model_sha256"], "index": index, "search": searcher.describe(),
              "search_choice": searcher.auto_reason,  # why `auto` took it
              "k_max": e.k_max, "k_store": k_store, "grid": grid, "tokens": len(targets),
              "words": corpus.words(split, len(targets)), "oov_rate": corpus.oov_rate(split, len(targets)),
              "rerank": rerank,
              "datastore_size": len(ds), "searched_queries": searched, "inputs": inputs, "search_ranks": world if sharded else 1,
              "datastore": place.name, "corpus": str(corpus.folder), "corpus_sha256": corpus.digest,
              "seconds": {"lm": t_lm, "index": t_index, "search": t_search}}
    with atomic_dir(folder) as tmp:
        saved = [("targets", targets), ("lm_logprobs", lm), ("query_keys", q), ("neighbors", I.astype(id_dtype)),
                 ("distances", D)]
        if grid is not None:
            saved += [("knn_grid", np.concatenate([tables[lo][0] for lo in sorted(tables)])),
                      ("target_rank", np.concatenate([tables[lo][1] for lo in sorted(tables)]))]
        for name, arr in saved:
            save_npy(tmp / f"{name}.npy", arr)
        record["sha256"] = {f"{name}.npy": file_sha256(tmp / f"{name}.npy") for name, _ in saved}  # `knnlm verify`
        write_json(tmp / "meta.json", record)  # last: marks the folder complete
    if world > 1:
        barrier()
    return record


def what_if_needs_a_search(run: Path, folder: Path, split: str, k_max: int, place: Place | None = None) -> str:
    """Why a what-if evaluation cannot run: the saved search it would read is missing, too short or stale."""
    where = place.command(run) if place else f"--out {run}"
    again = f"`knnlm evaluate {where}{' --split test' if split == 'test' else ''}`"
    meta = read_eval_meta(folder) if (folder / "meta.json").is_file() else {}
    if meta.get("grid") is not None and meta.get("k_max") == k_max:
        return (f"{folder} keeps the scores of its tuning grid and {meta['k_store']} neighbours per token "
                f"(eval.k_store); this what-if asks for a k beyond them at a setting off that grid: evaluate again "
                f"with it in eval.k / eval.temperature, or a larger eval.k_store")
    stored = meta.get("k_max", 0)
    why = (f"{folder} stores {stored} neighbours per token, this what-if needs {k_max}; raise eval.k_max and run"
           if 0 < stored < k_max else f"{folder} holds no saved search for these settings; run")
    return f"{why} {again} (without --k/--lmbda/--temperature) first: a what-if evaluation writes nothing"


def tuning_arrays(run: Path, split: str, place: Place | None = None) -> tuple[np.ndarray, KnnScores]:
    """What tuning reads from a saved search: LM log-probs (n,) and the kNN scores of the same tokens (`KnnScores`:
    targets (n,), neighbour distances (n, K), the neighbours' values (n, K)). `place`: another datastore or text than
    the run's own (`place_for`)."""
    folder = place.folder(split) if place else Path(run) / "eval" / split
    meta, arrays = load_search(folder)
    ds = Datastore(place.datastore if place else Path(run) / "datastore")
    ids = np.asarray(arrays["neighbors"])
    # row ids of this datastore; -1 pads an IVF probe that found fewer candidates (its distance is inf)
    if ids.size and (int(ids.min()) < -1 or int(ids.max()) >= len(ds)):
        bad = int(ids.min()) if int(ids.min()) < -1 else int(ids.max())
        raise UserError(f"{folder / 'neighbors.npy'}: neighbour id {bad} is outside the "
                        f"datastore's rows [0, {len(ds)}) (the file is damaged or from another datastore)")
    dists, values, targets = np.asarray(arrays["distances"]), neighbour_values(ds.vals, ids), arrays["targets"]
    if "knn_grid" in arrays:  # eval.k_store < eval.k_max: the grid's scores, and the first neighbours
        return arrays["lm_logprobs"], KnnTable(arrays["knn_grid"], meta["grid"]["k"], meta["grid"]["temperature"],
                                               arrays["target_rank"], meta["k_max"], dists, values, targets)
    return arrays["lm_logprobs"], KnnScores(dists, values, targets)


def tuning_grid(cfg: Config) -> tuple[list[int], list[float]]:
    """The k and temperature values scored on valid: the tuned protocol's grid plus the paper protocol's point."""
    ks = sorted({*cfg.eval.k, paper_k(cfg)})
    temperatures = sorted({*cfg.eval.temperature, PAPER_TEMPERATURE})
    return ks, temperatures


def grid_logprobs(scores: KnnScores, cfg: Config) -> dict[tuple[int, float], np.ndarray]:
    """log p_kNN (n,) of every token at every (k, temperature) of the grid (`tuning_grid`), from the cached neighbours
    only: what `tune` ranks and `held_out_selection` slices. Scores that keep only their grid's table and a few
    neighbours (`KnnTable`) may lack a cross pair of a what-if's grid (the paper's k at another temperature): such
    pairs are left out; a pair a protocol chooses among is not."""
    ks, temperatures = tuning_grid(cfg)
    for k, tau in [(k, tau) for k in cfg.eval.k for tau in cfg.eval.temperature] + [(paper_k(cfg), PAPER_TEMPERATURE)]:
        check_answers(scores, k, tau)
    pairs = [(k, tau) for k in ks for tau in temperatures if scores.answers(k, tau)]
    return scores.at(pairs, device=default_device())


def tune(lm: np.ndarray, scores: KnnScores, cfg: Config,
         knn: dict[tuple[int, float], np.ndarray] | None = None) -> list[dict]:
    """kNN-LM perplexity for every (k, temperature, λ) of the grid (`tuning_grid`); `knn`: the tokens' log p_kNN at
    each (k, temperature) where already computed (`grid_logprobs`)."""
    knn = grid_logprobs(scores, cfg) if knn is None else knn
    return [{"k": k, "temperature": tau, "lambda": lmbda, "ppl": ppl} for (k, tau), lp in knn.items()
            for lmbda, ppl in zip(cfg.eval.lmbda, perplexities(lm, lp, cfg.eval.lmbda))]


def check_answers(scores: KnnScores, k: int, temperature: float) -> None:
    """Refuse a (k, temperature) the saved search cannot score: beyond its stored neighbours and off the grid it
    kept (`KnnTable`)."""
    if not scores.answers(k, temperature):
        raise UserError(f"k = {k} at temperature {temperature:g}: the saved search keeps the scores of its tuning grid "
                        f"and {scores.distances.shape[1]} neighbours per token (eval.k_store); evaluate again with "
                        "this setting in eval.k / eval.temperature, or a larger eval.k_store")


def knn_at(scores: KnnScores, c: dict) -> np.ndarray:
    """log p_kNN (n,) at a choice's k and temperature, refused in one line where the saved search lacks it."""
    check_answers(scores, c["k"], c["temperature"])
    return scores.logprob(c["k"], c["temperature"])


def protocol_rows(grid: list[dict], cfg: Config, protocol: str) -> list[dict]:
    """The rows of a tuning grid a protocol chooses among (see PROTOCOLS)."""
    if protocol == "tuned":
        ks, taus = set(cfg.eval.k), set(cfg.eval.temperature)
        return [r for r in grid if r["k"] in ks and r["temperature"] in taus]
    if protocol == "paper":
        return [r for r in grid if r["k"] == paper_k(cfg) and r["temperature"] == PAPER_TEMPERATURE]
    raise UserError(f"protocol: expected one of {', '.join(PROTOCOLS)}, got {protocol!r}")


def choose(grid: list[dict], cfg: Config, protocol: str) -> dict:
    """The best row of a tuning grid under a protocol."""
    rows = protocol_rows(grid, cfg, protocol)
    if not rows:
        raise UserError(f"the tuning grid holds no setting of the {protocol} protocol; evaluate valid again")
    return min(rows, key=lambda r: r["ppl"])


def held_out_selection(lm: np.ndarray, scores: KnnScores, cfg: Config, whole: dict[str, dict],
                       knn: dict[tuple[int, float], np.ndarray] | None = None) -> dict:
    """Each protocol's (k, temperature, λ) chosen on valid's first half of tokens and scored on its second half,
    beside the choice made on the whole of valid scored on the same second half (which has seen those tokens):
    how much choosing among a grid on the tokens one reports flatters the figure. Test is scored with the first
    half's choices too (`held_out` of test's summary). `knn`: the whole split's `grid_logprobs` where already
    computed; each token's log p_kNN is its own, so the halves are its rows."""
    n = len(scores)
    h = n // 2
    knn = grid_logprobs(scores, cfg) if knn is None else knn
    grid = tune(lm[:h], scores, cfg, {pair: lp[:h] for pair, lp in knn.items()})  # rows of the first half
    second = slice(h, n)
    out = {"chosen_on": [0, h], "scored_on": [h, n], "lm_ppl": perplexity(lm[second]), "protocols": {}}
    for p in PROTOCOLS:
        c = choose(grid, cfg, p)
        w = whole[p]
        out["protocols"][p] = {
            "k": c["k"], "temperature": c["temperature"], "lambda": c["lambda"],
            "knnlm_ppl": score_choice(lm[second], knn[(c["k"], c["temperature"])][second], c),
            "first_half_ppl": c["ppl"],
            "whole_valid_choice_ppl": score_choice(lm[second], knn[(w["k"], w["temperature"])][second], w)}
    return out


def score_choice(lm: np.ndarray, knn: np.ndarray, c: dict) -> float:
    """kNN-LM perplexity of these tokens under one (k, temperature, λ), from their log p_kNN at its k and temperature."""
    return perplexity(interpolate(lm, knn, c["lambda"]))


def grid_edges(best: dict, cfg: Config) -> list[str]:
    """Tuned values that sit at an open end of their grid (k at its largest, the temperature at either end), each
    with the overrides that widen the grid past it (for k, eval.k_max too when it bounds the grid: a new search);
    λ's grid is the whole of [0, 1], so it has none."""
    e, edges = cfg.eval, []
    if len(e.k) > 1 and best["k"] == max(e.k):
        wider = sorted(set(e.k) | {2 * max(e.k), 4 * max(e.k)})
        raise_max = f"eval.k_max={max(wider)} " if max(wider) > e.k_max else ""
        edges.append(f"tuned k = {best['k']} is the largest of eval.k (widen it: "
                     f"{raise_max}eval.k={','.join(map(str, wider))})")
    if len(e.temperature) > 1 and best["temperature"] in (min(e.temperature), max(e.temperature)):
        t = best["temperature"]
        beyond = float(f"{(t / 3 if t == min(e.temperature) else t * 3):.3g}")
        wider = sorted(set(e.temperature) | {beyond})
        edges.append(f"tuned temperature = {t:g} is at an end of eval.temperature (widen it: "
                     f"eval.temperature={','.join(f'{x:g}' for x in wider)})")
    return edges


def _number(x) -> float | None:
    """A JSON value as a finite float, or None (bools, strings, null, huge integers, ±inf are not)."""
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return None
    try:
        x = float(x)
    except OverflowError:
        return None
    return x if math.isfinite(x) else None


def _shown(x) -> str:
    """A hand-edited value as an error message shows it (a 400-digit number is cut)."""
    text = repr(x)
    return text if len(text) <= 40 else text[:37] + "..."


def valid_choices(path: Path, stored: int, bound: str = "the neighbours stored for this split",
                  held_out: bool = False) -> dict[str, dict] | None:
    """Each protocol's (k, temperature, λ) as valid's summary.json recorded them, checked like config options: k an
    integer in [1, stored neighbours], temperature finite > 0, λ in [0, 1]; a hand-edited value is refused.
    `held_out`: the choices made on valid's first half (`held_out_selection`), None if valid's summary predates them."""
    summary = read_json(path, "valid summary")
    where = "protocols"
    if held_out:
        if not isinstance(summary, dict) or "held_out" not in summary:
            return None
        summary, where = summary["held_out"], "held_out.protocols"
    protocols = summary.get("protocols") if isinstance(summary, dict) else None
    if not isinstance(protocols, dict):
        raise UserError(f"{path}: '{where}' should be a JSON object of valid's choices (evaluate valid again)")
    choices = {}
    for p in PROTOCOLS:
        c, at = protocols.get(p), f"{where}.{p}"
        if not isinstance(c, dict):
            raise UserError(f"{path}: '{at}' should be a JSON object, found {_shown(c)}")
        k, tau, lmbda = c.get("k"), _number(c.get("temperature")), _number(c.get("lambda"))
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= stored:
            raise UserError(f"{path}: {at}.k: expected an integer in [1, {stored}] ({bound}), "
                            f"found {_shown(c.get('k'))}")
        if tau is None or tau <= 0:
            raise UserError(f"{path}: {at}.temperature: expected a finite number > 0, "
                            f"found {_shown(c.get('temperature'))}")
        if lmbda is None or not 0 <= lmbda <= 1:
            raise UserError(f"{path}: {at}.lambda: expected a number in [0, 1], found {_shown(c.get('lambda'))}")
        choices[p] = {"k": k, "temperature": c["temperature"], "lambda": c["lambda"]}
    return choices


def evaluate(run: str | Path, cfg: Config, split: str = "valid", progress: bool = True, save: bool = True,
             fixed: dict | None = None, datastore: str | None = None) -> dict | None:
    """LM and kNN-LM perplexity of `split`; hyper-parameters tuned here on valid, reused from valid on test.

    `save=False` is a what-if evaluation (e.g. `knnlm evaluate --k 32`): the numbers are returned, and the run's
    tuned choices, tuning grid and summaries are left as they were. `fixed` ({"k", "temperature", "lambda"}: any of
    them) replaces the tuned protocol's choice on test; on valid, `cfg.eval`'s grid holds the given values.
    `datastore`: a named datastore of the run (its own corpus's split unless `cfg.data.path` names another text;
    see `place_for` for where the results go)."""
    run = Path(run)
    if split not in ("valid", "test"):
        raise UserError(f"--split: expected valid or test, got {split!r}")
    place = place_for(run, cfg, datastore)
    if split == "test":  # test uses valid's choices: evaluate valid first if that has not been done
        valid_summary = place.folder("valid") / "summary.json"
        v = read_json(valid_summary, "valid summary") if valid_summary.is_file() else None
        if v is None or (isinstance(v, dict) and "protocols" not in v):  # none, or from before the protocols
            if not save:  # valid would be tuned on the what-if's grid and saved
                raise UserError(f"{valid_summary}: no valid choices to reuse; run `knnlm evaluate {place.command(run)}` "
                                "(without --k/--lmbda/--temperature) first: a what-if evaluation writes nothing")
            evaluate(run, cfg, "valid", progress, datastore=datastore)
    record = score_and_search(run, cfg, split, progress, save, place)
    if record is None:
        return None  # a rank other than 0 under torchrun: it took its part of the search; rank 0 reports
    folder = place.folder(split)
    t_tuning = time.perf_counter()
    lm, scores = tuning_arrays(run, split, place)
    if max(cfg.eval.k) > scores.stored:
        raise UserError(f"eval.k: {max(cfg.eval.k)} is more than the {scores.stored} neighbours stored in {folder}")

    knn_grid = None  # valid: log p_kNN of every token at every (k, temperature) of the grid, computed once
    if split == "valid":
        knn_grid = grid_logprobs(scores, cfg)
        grid = tune(lm, scores, cfg, knn_grid)
        if save:
            write_json(folder / "tuning.json", grid)
        choices = {p: choose(grid, cfg, p) for p in PROTOCOLS}
        edges = grid_edges(choices["tuned"], cfg)
        for edge in edges:
            print(f"warning: {folder}: {edge}; the optimum may lie outside the grid", file=sys.stderr)
        held_out = held_out_selection(lm, scores, cfg, choices, knn_grid) if len(scores) >= 2 else None
    else:
        edges = []  # test reuses valid's choice of each protocol: nothing is tuned here
        choices = valid_choices(place.folder("valid") / "summary.json", scores.stored)
        choices["tuned"].update(fixed or {})
        halves = valid_choices(place.folder("valid") / "summary.json", scores.stored, held_out=True)
        held_out = None if halves is None else {  # scored with the choices of valid's first half
            "chosen_on": "valid's first half", "protocols": {
                p: {**c, "knnlm_ppl": score_choice(lm, knn_at(scores, c), c)} for p, c in halves.items()}}

    words = record.get("words", len(scores))  # per-word perplexity: the same total loss over the words
    protocols, tuned_knn = {}, None
    for p, c in choices.items():
        knn = knn_grid[(c["k"], c["temperature"])] if knn_grid is not None else knn_at(scores, c)
        if p == "tuned":
            tuned_knn = knn.astype(np.float32)
        mixed = interpolate(lm, knn, c["lambda"])
        protocols[p] = {
            "knnlm_ppl": perplexity(mixed), "knnlm_word_ppl": math.exp(-float(np.sum(mixed, dtype=np.float64)) / words),
            "lambda": c["lambda"], "k": c["k"], "temperature": c["temperature"],
            "target_in_neighbors": scores.target_in_neighbors(c["k"]),
            "description": PROTOCOLS[p],
        }
    best = protocols["tuned"]
    summary = {
        "split": split, "tokens": int(len(scores)), "words": int(words),
        "oov_rate": record.get("oov_rate"),  # share of <unk> tokens (None: searched by an older knnlm)
        "lm_ppl": perplexity(lm), "knnlm_ppl": best["knnlm_ppl"],  # the tuned protocol; both are under "protocols"
        "lm_word_ppl": math.exp(-float(np.sum(lm, dtype=np.float64)) / words),
        "knnlm_word_ppl": best["knnlm_word_ppl"],
        "lambda": best["lambda"], "k": best["k"], "temperature": best["temperature"],
        "target_in_neighbors": best["target_in_neighbors"],
        "protocols": protocols,
        "grid_edges": edges,
        "held_out": held_out,  # the protocols chosen on valid's first half, scored on its second half (and on test)
        "index": record["index"], "search": record.get("search"), "datastore_size": record["datastore_size"],
        "searched_queries": record.get("searched_queries"),
        # the scoring and search are done once and their times kept; tuning (valid's grid, or test's chosen settings)
        # is timed in this call
        "seconds": {**record["seconds"], "tuning": time.perf_counter() - t_tuning},
    }
    if save:  # the arrays only once everything was computed: a failure leaves the folder as it was
        if nan_at(summary) is None:
            save_npy(folder / "knn_logprobs.npy", tuned_knn)
        write_json(folder / "summary.json", summary)  # refuses NaN: then knn_logprobs.npy was not written either
    else:
        summary["what_if"] = "settings given on the command line; the run's summary.json was left as it was"
    return summary


def check_lambda(lmbda: float) -> float:
    if not (0 <= lmbda <= 1) or math.isnan(lmbda):
        raise UserError(f"--lmbda: expected a value in [0, 1], got {lmbda}")
    return lmbda


# ---- a memory model beside the base LM (knnlm.distill): no retrieval at inference --------------------------

def mix(base: np.ndarray, memory: np.ndarray, lmbda: float) -> np.ndarray:
    """log(λ p_memory + (1 − λ) p_base) per token: the memory model interpolated with the base LM."""
    return interpolate(base, memory, lmbda)


def tune_memory_lambda(base: np.ndarray, memory: np.ndarray, lambdas: list[float]) -> tuple[float, list[dict]]:
    """The λ of `mix` with the lowest perplexity, and the perplexity at every λ of the grid."""
    grid = [{"lambda": lm, "ppl": perplexity(mix(base, memory, lm))} for lm in lambdas]
    return min(grid, key=lambda r: r["ppl"])["lambda"], grid


def memory_run_config(memory: Path) -> Config:
    """The training config of a memory model's run (from its latest checkpoint)."""
    meta = latest_meta(memory)
    return from_dict(meta["config"], meta["path"])


def check_memory_summary(summary: dict, path: Path) -> dict:
    """A memory evaluation's valid summary, with the choices test and the API read from it checked."""
    check_fields(summary, path, {"memory_lambda": float, "protocols": dict})
    lmbda = summary["memory_lambda"]
    if not 0 <= lmbda <= 1:
        raise UserError(f"{path}: 'memory_lambda' should be in [0, 1], found {lmbda!r}")
    return summary


def score_memory(run: Path, memory: Path, cfg: Config, split: str, targets: np.ndarray,
                 progress: bool = True) -> tuple[np.ndarray, float]:
    """The memory model's log-probabilities of the base evaluation's tokens (same windows, stride and precision),
    cached in MEMORY/memory_eval/<split>/; and the seconds the scoring pass took."""
    base_meta, mem_meta = latest_meta(run), latest_meta(memory)
    if mem_meta["vocab_hash"] != base_meta["vocab_hash"]:
        raise UserError(f"--memory {memory}: trained with another vocabulary than the base run {run}")
    ds = Datastore(run / "datastore")
    stride, bf16 = scoring_settings(ds, from_dict(base_meta["config"], base_meta["path"]))
    mem_cfg = from_dict(mem_meta["config"], mem_meta["path"])
    if mem_cfg.model.context != from_dict(base_meta["config"], base_meta["path"]).model.context:
        raise UserError(f"--memory {memory}: context {mem_cfg.model.context} differs from the base run's; "
                        "the two must read the same windows")
    folder = memory / "memory_eval" / split
    inputs = {"base_model": base_meta["model_sha256"], "memory_model": mem_meta["model_sha256"], "split": split,
              "tokens": len(targets), "stride": stride, "bf16": bf16}
    if (folder / "meta.json").is_file():
        meta = read_json(folder / "meta.json", "memory evaluation meta")
        if meta.get("inputs") == inputs:
            saved = load_npy(folder / "targets.npy")
            if np.array_equal(saved, targets):
                return load_npy(folder / "lm_logprobs.npy").astype(np.float64), float(meta["seconds"])
    model, _, _ = load_model(memory, default_device())
    corpus = corpus_for(cfg)
    s = token_stream(split_ids(corpus, cfg, split), corpus.eos_id)
    t0 = time.time()
    tgt, lp = [], []
    bar = tqdm(total=len(targets), desc=f"memory {split}", unit="tok", unit_scale=True, disable=not progress,
               dynamic_ncols=True)
    for _, t, p in score_stream(model, s, stride, cfg.datastore.batch_size, bf16, want_keys=False):
        tgt.append(t), lp.append(p)
        bar.update(len(t))
    bar.close()
    seconds = time.time() - t0
    tgt = torch.cat(tgt).numpy().astype(np.int32)
    lp = torch.cat(lp).numpy()
    if not np.array_equal(tgt, targets):
        raise UserError(f"{run / 'eval' / split}: its tokens are not those of {split} read now; evaluate it again")
    with atomic_dir(folder) as tmp:
        save_npy(tmp / "targets.npy", tgt)
        save_npy(tmp / "lm_logprobs.npy", lp)
        write_json(tmp / "meta.json", {"inputs": inputs, "seconds": seconds, "sha256": {
            n: file_sha256(tmp / n) for n in ("targets.npy", "lm_logprobs.npy")}})
    return lp.astype(np.float64), seconds


def _bytes(paths: list[Path]) -> int:
    return sum(p.stat().st_size for p in paths if p.is_file())


def evaluate_memory(run: str | Path, memory: str | Path, cfg: Config, split: str = "valid",
                    progress: bool = True) -> dict:
    """The base LM with a memory model beside it, without and with the kNN on top.

    On valid, λ of the memory model (`memory_lambda`) is tuned first, with no retrieval; then the kNN-LM's λ, k and
    temperature are tuned on top of that pair under both protocols, exactly as `knnlm evaluate` tunes them over the
    LM alone. Test reuses valid's choices. Writes MEMORY/memory_eval/<split>/summary.json and returns it."""
    run, memory = Path(run), Path(memory)
    if split not in ("valid", "test"):
        raise UserError(f"--split: expected valid or test, got {split!r}")
    valid_path = memory / "memory_eval" / "valid" / "summary.json"
    if split == "test" and not valid_path.is_file():
        evaluate_memory(run, memory, cfg, "valid", progress)
    if not (run / "eval" / split / "summary.json").is_file():
        evaluate(run, cfg, split, progress)
    base = read_json(run / "eval" / split / "summary.json", "evaluation summary")
    record = read_json(run / "eval" / split / "meta.json", "evaluation meta")
    lm, scores = tuning_arrays(run, split)
    lm = lm.astype(np.float64)
    mem, mem_seconds = score_memory(run, memory, cfg, split, scores.targets, progress)

    if split == "valid":
        lam, lam_grid = tune_memory_lambda(lm, mem, cfg.eval.lmbda)
        pair = mix(lm, mem, lam)
        grid = tune(pair, scores, cfg)
        choices = {p: choose(grid, cfg, p) for p in PROTOCOLS}
    else:
        v = check_memory_summary(read_json(valid_path, "memory valid summary"), valid_path)
        lam, lam_grid = v["memory_lambda"], None
        pair = mix(lm, mem, lam)
        choices = valid_choices(valid_path, scores.stored)  # checked like options: a hand edit is refused
    protocols = {}
    for p, c in choices.items():
        knn = knn_at(scores, c)  # a hand-edited test choice off a table's grid: one line
        protocols[p] = {"knnlm_ppl": perplexity(interpolate(pair, knn, c["lambda"])), "lambda": c["lambda"],
                        "k": c["k"], "temperature": c["temperature"], "description": PROTOCOLS[p]}

    n = len(scores)
    sec = record.get("seconds", {})
    lm_s, search_s = float(sec.get("lm", math.nan)), float(sec.get("search", math.nan))
    ckpt = lambda folder: [Path(latest_meta(folder)["path"]) / "model.safetensors"]  # the weights the run uses
    summary = {
        "split": split, "tokens": n, "base_run": str(run), "memory_run": str(memory),
        "lm_ppl": perplexity(lm), "memory_model_ppl": perplexity(mem), "memory_lambda": lam,
        "lm_memory_ppl": perplexity(pair),
        "knnlm_ppl": base["protocols"]["tuned"]["knnlm_ppl"], "knnlm_ppl_paper": base["protocols"]["paper"]["knnlm_ppl"],
        "lm_memory_knnlm_ppl": protocols["tuned"]["knnlm_ppl"], "protocols": protocols,
        "memory_lambda_grid": lam_grid,
        # inference cost: each pass's time over the split's tokens (the LM pass also computes the query keys)
        "seconds": {"lm": lm_s, "memory_model": mem_seconds, "search": search_s},
        "tokens_per_s": {"lm": n / lm_s, "lm_memory": n / (lm_s + mem_seconds), "knnlm": n / (lm_s + search_s)},
        "inference_bytes": {"lm": _bytes(ckpt(run)), "memory_model": _bytes(ckpt(memory)),
                            "datastore": _bytes([run / "datastore" / "keys.npy", run / "datastore" / "vals.npy"])},
    }
    write_json(memory / "memory_eval" / split / "summary.json", summary)
    return summary

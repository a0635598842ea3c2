"""Nearest-neighbour search over a datastore's keys: one interface, one registry of backends.

Every backend is a `Searcher` (`base.py`): `search(queries (n, d) fp32, k) -> (distances (n, k) fp32, ids (n, k))`,
squared L2, nearest first, and `describe()`. The registry (`registry.BACKENDS`) names them for `eval.index`:
- `amx-exact`, `avx512-exact`, `avx2-exact`: knnlm's exact search on CPUs (`cpu_kernels.py`, C++ in `csrc/`): each
  kernel prunes with a proven lower bound (keys projected onto their principal directions; only keys that could
  be among the k nearest get an exact distance), or, with `prune=False`, picks `k + margin` candidates by bf16
  products and re-ranks them exactly. On WikiText-2's 2.09M keys at k = 1024: `amx-exact` 8.8x FAISS Flat (Intel
  Xeon with AMX, 2 cores), `avx512-exact` 7x (AMD Zen 5, 2 cores) (`benchmarks/search.py`).
- `bf16-exact`: the margin search written with PyTorch ops, for GPUs (tensor cores); `bf16-pruned`: the pruned
  search in PyTorch (`torch_search.py`; not yet measured on a GPU, so not what `auto` picks unprobed).
- `Flat`, and any other FAISS `index_factory` string (`IVF4096,PQ32`, ...; `faiss_index.py`, the only module that
  imports FAISS, an optional extra): approximate indexes are cached beside the datastore and re-ranked with exact
  distances read from the stored keys, as kNN-LM found helpful.
- `auto` (the default): over a datastore, the fastest of the exact searches this machine has on those keys at that
  k, chosen by a timed probe and remembered with its reason (`auto.choose_exact_search`); without a datastore
  (`registry.resolve_index`), the first backend in registry order that runs here and may be taken untimed.
Under `torchrun` an exact backend searches a store split across the ranks (`sharded.ShardedSearch`).

Adding a backend touches this package only: a class with the `Searcher` methods in a module here, one `Backend`
entry in `registry.BACKENDS` (with `auto_variants` if `auto` should time it), its name in `names.py` (which
`knnlm.config` validates with, importing no search code), and a test against the float64 brute force of
`tests/test_knn.py`. This file imports nothing, so `knnlm.config` stays light: import from the modules
(`knnlm.search.registry.make_searcher`, ...). The kNN-LM's mathematics on the answers is `knnlm.knn`.
"""

"""The names `eval.index` accepts besides FAISS factory strings, importing no search code (torch, FAISS):
`knnlm.config` validates with them. `registry.BACKENDS` implements every one but `auto`, in this order
(tests/test_structure.py checks that the two agree)."""

NAMED_INDEXES = ("auto", "amx-exact", "avx512-exact", "avx2-exact", "bf16-exact", "bf16-pruned", "Flat")

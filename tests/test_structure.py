"""The package's layering: no import cycle between knnlm's modules, and no import inside a function to hide one.

The graph counts every `from .x import ...` / `import knnlm.x`, at module level or inside a function, so a lazy
import can never hide a cycle. Lazy imports of knnlm modules are allowed only where a reason is written below.
"""

import ast
from pathlib import Path

import torch.nn as nn

PACKAGE = Path(__file__).resolve().parent.parent / "knnlm"


def _module_name(path: Path) -> str:
    """knnlm/data.py -> "data"; knnlm/studies/engine.py -> "studies.engine"; a package's __init__ -> the package
    ("studies"), knnlm's own -> "__init__"."""
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    if parts[-1] == "__init__" and len(parts) > 1:
        parts = parts[:-1]
    return ".".join(parts)


FILES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}
MODULES = sorted(FILES)
PACKAGES = {m for m, p in FILES.items() if p.name == "__init__.py"}

SEARCH = sorted(m for m in MODULES if m == "search" or m.startswith("search."))


# (importer, imported) -> why the import is inside a function; "*": any knnlm module
LAZY_ALLOWED = {
    ("cli", "*"): "each subcommand imports what it runs (torch, FAISS) when it runs: `knnlm --help` and config "
                  "errors answer in 0.25 s instead of 1.8 s",
    ("__init__", "api"): "`knnlm.load` / `knnlm.KNNLM` import torch on first use, so `import knnlm` stays quick",
}


def _resolve(dotted: str) -> str:
    """The knnlm module a dotted name (relative to knnlm) lives in: the longest prefix that is a module."""
    parts = dotted.split(".")
    for n in range(len(parts), 0, -1):
        if ".".join(parts[:n]) in FILES:
            return ".".join(parts[:n])
    return dotted  # not a module: graph() says so


def _imported_modules(node: ast.AST, importer: str) -> list[str]:
    """The knnlm modules one import statement names."""
    package = importer.split(".") if importer in PACKAGES and importer != "__init__" else importer.split(".")[:-1]
    if isinstance(node, ast.ImportFrom):
        if node.level == 0:
            if not node.module or node.module.split(".")[0] != "knnlm":
                return []
            base = node.module.split(".")[1:]
        else:
            assert node.level - 1 <= len(package), f"knnlm/{importer}: relative import beyond the package"
            base = package[:len(package) - (node.level - 1)] + (node.module.split(".") if node.module else [])
        if not base:  # from knnlm import x / from . import x at the top
            return [a.name for a in node.names if a.name in FILES] or ["__init__"]
        prefix = ".".join(base)
        found = [f"{prefix}.{a.name}" for a in node.names if f"{prefix}.{a.name}" in FILES]  # from .pkg import module
        return found or [_resolve(prefix)]
    if isinstance(node, ast.Import):
        return [_resolve(a.name.split(".", 1)[1]) if "." in a.name else "__init__" for a in node.names
                if a.name.split(".")[0] == "knnlm"]
    return []


def import_edges() -> list[tuple[str, str, bool]]:
    """(importer, imported, inside a function) for every import of a knnlm module by a knnlm module."""
    edges = []
    for name in MODULES:
        tree = ast.parse(FILES[name].read_text(encoding="utf-8"))

        def visit(node, in_function):
            for child in ast.iter_child_nodes(node):
                for target in _imported_modules(child, name):
                    if target != name:
                        edges.append((name, target, in_function))
                visit(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))

        visit(tree, False)
    return edges


def graph(edges) -> dict[str, set[str]]:
    """Module -> the modules it imports."""
    g = {m: set() for m in MODULES}
    for a, b, _ in edges:
        assert b in g, f"knnlm/{a}.py imports knnlm.{b}, which does not exist"
        g[a].add(b)
    return g


def find_cycle(g: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the graph as [m0, m1, ..., m0], or None (depth-first search, colouring the path)."""
    state, path = {}, []

    def dfs(m):
        state[m] = "open"
        path.append(m)
        for n in sorted(g[m]):
            if state.get(n) == "open":
                return path[path.index(n):] + [n]
            if n not in state and (cycle := dfs(n)):
                return cycle
        state[m] = "done"
        path.pop()
        return None

    for m in sorted(g):
        if m not in state and (cycle := dfs(m)):
            return cycle
    return None


def reachable(g, start) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for n in g[todo.pop()] - seen:
            seen.add(n)
            todo.append(n)
    return seen


def test_the_cycle_finder_finds_a_planted_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_no_import_cycle_between_knnlm_modules():
    cycle = find_cycle(graph(import_edges()))
    assert cycle is None, "import cycle: " + " → ".join(cycle)


def test_no_function_level_import_of_a_knnlm_module_without_a_written_reason():
    lazy = sorted({(a, b) for a, b, inside in import_edges() if inside})
    unexplained = [f"knnlm/{a}.py imports .{b} inside a function" for a, b in lazy
                   if (a, b) not in LAZY_ALLOWED and (a, "*") not in LAZY_ALLOWED]
    assert not unexplained, "\n".join([*unexplained, "(move the code where it belongs, or give a reason in LAZY_ALLOWED)"])


def test_the_two_language_models_do_not_depend_on_each_other():
    """model.py and hf.py both implement knnlm.lm's interface; models.py, above both, chooses one."""
    g = graph(import_edges())
    assert "hf" not in reachable(g, "model") and "model" not in reachable(g, "hf")
    assert {"model", "hf", "models"}.isdisjoint(reachable(g, "data") | reachable(g, "lm"))


def test_both_language_models_implement_the_interface():
    from knnlm.config import ModelConfig
    from knnlm.hf import HFCausalLM
    from knnlm.lm import LanguageModel
    from knnlm.model import TransformerLM

    lm = TransformerLM(ModelConfig(d_model=16, n_layers=1, n_heads=2, d_ff=32, context=8, cutoffs=[20]), 50)
    assert isinstance(lm, LanguageModel) and isinstance(lm, nn.Module)
    methods = [n for n, v in vars(LanguageModel).items() if callable(v) and not n.startswith("_")]
    assert {"forward", "target_logprob", "full_logprobs", "key_module", "num_params", "flops_per_token"} <= set(methods)
    for name in methods:  # HFCausalLM needs a model folder to instantiate; its attributes are set in __init__
        assert callable(getattr(HFCausalLM, name, None)), f"HFCausalLM lacks {name}"
    assert issubclass(HFCausalLM, nn.Module)


def test_the_option_names_in_config_are_the_ones_the_code_implements():
    """config.py lists key sites and regularizers (so validation needs no model code); each name must work."""
    import torch

    from knnlm.config import KEY_SITES, REGULARIZERS, ModelConfig, TrainConfig
    from knnlm.model import TransformerLM
    from knnlm.cli import main
    from knnlm.regularizers import REGISTRY, make_regularizer

    assert tuple(REGISTRY) == REGULARIZERS  # the config's names-only tuple is the registry's keys, in order
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()) as help_text, contextlib.suppress(SystemExit):
        main(["train", "--help"])
    assert all(name in help_text.getvalue() for name in REGULARIZERS)  # the CLI's choices come from the same names
    for site in KEY_SITES:
        model = TransformerLM(ModelConfig(d_model=8, n_layers=1, n_heads=2, d_ff=16, context=4, cutoffs=[4], key_site=site), 8)
        assert model(torch.zeros(1, 4, dtype=torch.long)).key.shape == (1, 4, 8)
    kinds = {type(make_regularizer(TrainConfig(regularizer=r), model, 8, 8, block=4)).__name__ for r in REGULARIZERS}
    assert len(kinds) == len(REGULARIZERS)  # each name makes its own loss


def test_the_import_graph_resolves_the_search_package():
    edges = {(a, b) for a, b, _ in import_edges()}
    assert ("config", "search.names") in edges and ("search.registry", "search.cpu_kernels") in edges
    assert ("search.registry", "artifacts") in edges and ("evaluate", "search.registry") in edges


def test_imports_flow_one_way_between_search_knn_and_the_pipeline():
    """The search package sits below the pipeline: it imports only knnlm's foundations (files, config, corpus
    cache, processes) and itself; knn.py (the kNN-LM's mathematics) imports no search code and no knnlm module."""
    g = graph(import_edges())
    below = {"artifacts", "config", "data", "distributed", *SEARCH}
    for m in SEARCH:
        assert reachable(g, m) <= below, f"knnlm/{m}: imports {sorted(reachable(g, m) - below)}"
    assert g["knn"] == set(), "knnlm/knn.py: kNN-LM mathematics only, no knnlm imports"
    assert g["search"] == set() and g["search.names"] == set(), "config imports search.names: nothing heavy there"
    knn_imports = {a.name.split(".")[0] for node in ast.walk(ast.parse(FILES["knn"].read_text()))
                   if isinstance(node, (ast.Import, ast.ImportFrom)) for a in
                   (node.names if isinstance(node, ast.Import) else [ast.alias(node.module or "")])}
    assert knn_imports <= {"__future__", "math", "numpy", "torch"}, knn_imports


def test_config_names_every_search_backend_of_the_registry():
    """config validates eval.index with the names-only tuple (`search/names.py`, no torch); the registry implements
    each, in the same order; every backend's searcher has the `Searcher` methods."""
    import numpy as np
    import pytest

    from knnlm.artifacts import UserError
    from knnlm.config import NAMED_INDEXES, Config, validate
    from knnlm.search.base import Searcher
    from knnlm.search.registry import BACKENDS

    assert NAMED_INDEXES == ("auto", *BACKENDS)
    assert all(name == b.name for name, b in BACKENDS.items())
    cfg = Config()
    cfg.eval.index = "no such index!"
    with pytest.raises(UserError) as e:  # what the command line answers to an unknown eval.index
        validate(cfg)
    assert all(name in str(e.value) for name in BACKENDS)
    design = (PACKAGE.parent / "docs" / "design.md").read_text()
    assert all(f"`{name}`" in design for name in BACKENDS), "docs/design.md describes every backend"
    keys = np.random.default_rng(0).standard_normal((64, 8)).astype(np.float16)
    for b in BACKENDS.values():
        if b.runs_here():
            s = b.build(keys)
            assert isinstance(s, Searcher), b.name
            d, i = s.search(np.asarray(keys[:2], dtype=np.float32), 3)
            assert d.shape == i.shape == (2, 3) and i[:, 0].tolist() == [0, 1], b.name  # each key nearest to itself


def test_cli_and_readme_name_the_regularizers_of_the_registry():
    """`knnlm train --regularizer` offers exactly the registry's names, and so does the README's command line."""
    import contextlib
    import io
    import re

    import pytest

    from knnlm.cli import main
    from knnlm.regularizers import REGISTRY

    with contextlib.redirect_stderr(io.StringIO()) as err, pytest.raises(SystemExit):
        main(["train", "--out", "x", "--regularizer", "no-such-loss"])
    choices = re.search(r"choose from (.*)\)", err.getvalue()).group(1)
    assert tuple(re.findall(r"'([^']+)'", choices)) == tuple(REGISTRY)
    readme = (PACKAGE.parent / "README.md").read_text()
    assert tuple(re.search(r"--regularizer ([a-z0-9|-]+)\]", readme).group(1).split("|")) == tuple(REGISTRY)


def test_a_missing_optional_dependency_is_a_one_line_error_naming_its_extra(monkeypatch):
    import importlib
    import sys

    import numpy as np
    import pytest

    from knnlm.artifacts import UserError, optional_import
    from knnlm.search.faiss_index import FaissSearch
    from knnlm.search.registry import resolve_index

    keys = np.zeros((10, 4), dtype=np.float16)
    monkeypatch.setitem(sys.modules, "faiss", None)  # as if faiss-cpu were not installed
    with pytest.raises(UserError, match=r"pip install 'knnlm\[faiss\]'") as e:
        FaissSearch(keys, "Flat")
    assert "\n" not in str(e.value)
    with pytest.raises(UserError, match=r"'Flat' needs FAISS: pip install 'knnlm\[faiss\]'"):
        resolve_index("Flat")
    # figures and the GMM analysis: matplotlib and scikit-learn, the `plots` extra, imported where they are used
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.delitem(sys.modules, "knnlm.studies.plots", raising=False)
    with pytest.raises(UserError, match=r"figures: matplotlib is not installed \(pip install 'knnlm\[plots\]'\)"):
        importlib.import_module("knnlm.studies.plots")
    monkeypatch.undo()  # knnlm.studies.plots and matplotlib as they were, for the analysis module
    from knnlm.studies.analysis import gmm_loglik_split

    for name in ("sklearn", "sklearn.mixture"):  # as if never installed, though other tests imported it
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(UserError, match=r"the GMM analysis: sklearn is not installed \(pip install 'knnlm\[plots\]'\)"):
        gmm_loglik_split(np.zeros((20, 4), dtype=np.float32), np.zeros(20))
    with pytest.raises(UserError, match="knnlm\\[x\\]"):
        optional_import("no_such_package_knnlm", "x", "a test")


def test_the_studies_sit_on_top_of_the_pipeline_and_the_engine_knows_no_stage():
    """knnlm/studies/ (engine, stages, statistics, analyses, plots) composes the pipeline; only the CLI calls it. The
    engine reaches the stages through their registry alone: adding a stage or a study touches no engine code."""
    g = graph(import_edges())
    users = {m for m in MODULES if not m.startswith("studies") and any(n.startswith("studies") for n in g[m])}
    assert users <= {"cli"}, f"{sorted(users)} import knnlm.studies"
    members = {m for m in MODULES if m.startswith("studies.stages.")}
    assert not (g["studies.engine"] & members), "the engine imports a stage's own module"
    source = FILES["studies.engine"].read_text(encoding="utf-8")
    from knnlm.config import REGULARIZERS

    named = [name for name in REGULARIZERS if f'"{name}"' in source or f"'{name}'" in source]
    assert not named, f"the engine names regularizer(s) {named}"

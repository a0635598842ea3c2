"""The docs name only what exists: every `results/...` path in the README and docs/ is a committed file or folder."""

import re

from conftest import REPO

PATH = re.compile(r"(?<![\w/.])(?:\.\./)?(results/[A-Za-z0-9_./*{},-]+[A-Za-z0-9_/*}])")


def expand(path: str) -> list[str]:
    """`a/{b,c}.md` -> a/b.md, a/c.md (the brace lists the docs use)."""
    m = re.search(r"\{([^{}]*)\}", path)
    if not m:
        return [path]
    return [q for part in m.group(1).split(",") for q in expand(path[: m.start()] + part + path[m.end():])]


def test_every_results_path_the_docs_name_exists():
    docs = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
    missing = []
    for doc in docs:
        for raw in PATH.findall(doc.read_text()):
            for path in expand(raw.rstrip(".,")):
                if "*" in path:
                    found = list(REPO.glob(path))
                else:
                    found = [q for q in (path, path + ".md") if (REPO / q).exists()]  # `--out X` writes X.md
                if not found:
                    missing.append(f"{doc.name}: {path}")
    assert not missing, "\n".join(missing)

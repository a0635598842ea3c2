"""The docs name only what exists: every `results/...` path in the README and docs/ is a committed file or folder,
and the README's safety section gives the true number of tests behind each guarantee."""

import json
import os
import re
import subprocess
import sys

from conftest import GUARANTEES, REPO

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


def test_the_safety_section_counts_the_tests_of_each_guarantee(tmp_path, request):
    """Each bullet of the README's "Safety" section starts `**name** (N tests)`; the tests marked
    `@pytest.mark.guarantee("name")` are counted by collecting the suite (a parametrized case counts once each),
    and every marked guarantee has its bullet."""
    readme = (REPO / "README.md").read_text()
    section = readme.split("\n## Safety\n", 1)[1].split("\n## ", 1)[0]
    claimed = {name: int(n) for name, n in re.findall(r"^- \*\*([\w-]+)\*\* \((\d+) tests?\)", section, re.M)}
    counts = request.config.stash.get(GUARANTEES, None)  # this session collected the whole suite: its own count
    if counts is None:  # run on its own: collect the files that mark guarantees
        files = sorted(str(p) for p in (REPO / "tests").glob("test_*.py") if "mark.guarantee(" in p.read_text())
        out = tmp_path / "counts.json"
        subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *files],
                       cwd=REPO, env={**os.environ, "KNNLM_COUNT_GUARANTEES": str(out)}, capture_output=True, check=True)
        counts = json.loads(out.read_text())
    assert claimed == counts


def test_every_archived_result_says_what_it_is():
    """results/archive/ has one shape: a folder per archived set, named by date and content, whose README.md says
    what it holds, where it came from and why it left the current results."""
    folders = [p for p in (REPO / "results" / "archive").iterdir() if not p.name.startswith(".")]
    assert folders and all(p.is_dir() and re.match(r"\d{4}-\d{2}(-\d{2})?-[a-z0-9-]+$", p.name) for p in folders)
    for p in folders:
        assert (p / "README.md").is_file(), f"{p.relative_to(REPO)}: no README.md"
        assert (p / "README.md").read_text().startswith("# "), f"{p.relative_to(REPO)}/README.md: no title"

"""What the commands print: aligned tables of a run's numbers, and the closing line that says where they were written.

Every command prints for a reader by default; `--json` prints the same record as JSON for a program instead.
"""

from __future__ import annotations

from pathlib import Path


def table(rows: list[tuple[str, str]], header: tuple[str, str] = ("", "value")) -> str:
    """A Markdown table of (name, value) rows with both columns padded to their widest cell; values align right."""
    w0 = max(len(header[0]), *(len(a) for a, _ in rows))
    w1 = max(len(header[1]), *(len(b) for _, b in rows))
    lines = [f"| {header[0]:<{w0}} | {header[1]:>{w1}} |", f"|{'-' * (w0 + 2)}|{'-' * (w1 + 1)}:|"]
    return "\n".join(lines + [f"| {a:<{w0}} | {b:>{w1}} |" for a, b in rows])


def _ppl(x: float) -> str:
    return f"{x:.2f}"


def evaluation_table(summary: dict) -> str:
    """An evaluation summary (`knnlm.evaluate.evaluate`) as a table: perplexities per token and per word under
    both protocols, the chosen settings, how often the target is among the neighbours, and the search."""
    tokens, words = summary["tokens"], summary.get("words", summary["tokens"])
    rows = [("tokens (words)", f"{tokens:,} ({words:,})")]
    if summary.get("oov_rate") is not None:
        rows.append(("OOV rate (<unk> tokens)", f"{100 * summary['oov_rate']:.2f}%"))
    rows.append(("LM ppl (per word)", f"{_ppl(summary['lm_ppl'])} ({_ppl(summary['lm_word_ppl'])})"))
    for name, p in summary["protocols"].items():
        rows.append((f"kNN-LM ppl, {name} (per word)", f"{_ppl(p['knnlm_ppl'])} ({_ppl(p['knnlm_word_ppl'])})"))
        rows.append((f"  {name}: λ, k, temperature", f"{p['lambda']:g}, {p['k']}, {p['temperature']:g}"))
        rows.append((f"  {name}: target among the k neighbours", f"{100 * p['target_in_neighbors']:.1f}%"))
    held = summary.get("held_out")
    if held and summary["split"] == "valid":  # chosen on the first half: the second half has not been looked at
        lo, hi = held["scored_on"]
        rows.append((f"second half (tokens {lo:,}–{hi:,}): LM ppl", _ppl(held["lm_ppl"])))
        for name, p in held["protocols"].items():
            rows.append((f"  {name}, chosen on the first half / on all of valid",
                         f"{_ppl(p['knnlm_ppl'])} / {_ppl(p['whole_valid_choice_ppl'])}"))
    elif held:
        for name, p in held["protocols"].items():
            rows.append((f"kNN-LM ppl, {name} chosen on valid's first half", _ppl(p["knnlm_ppl"])))
    rows.append(("search", f"{summary.get('search') or summary['index']} over {summary['datastore_size']:,} keys"))
    return table(rows, (f"{summary['split']}", "value"))


def memory_table(summary: dict) -> str:
    """A memory-model evaluation (`knnlm.evaluate.evaluate_memory`) as a table."""
    rows = [("tokens", f"{summary['tokens']:,}"), ("LM ppl", _ppl(summary["lm_ppl"])),
            ("memory model ppl", _ppl(summary["memory_model_ppl"])),
            (f"LM + memory ppl (μ = {summary['memory_lambda']:g})", _ppl(summary["lm_memory_ppl"])),
            ("kNN-LM ppl, tuned", _ppl(summary["knnlm_ppl"])),
            ("LM + memory + kNN ppl, tuned", _ppl(summary["lm_memory_knnlm_ppl"]))]
    return table(rows, (summary["split"], "value"))


def train_table(summary: dict) -> str:
    """`knnlm train`'s summary as a table."""
    rows = [("steps (epochs)", f"{summary['steps']} ({summary['epochs']:.2f})"),
            ("train ppl", _ppl(summary["train_ppl"])), ("valid ppl", _ppl(summary["valid_ppl"])),
            ("parameters", f"{summary['params']:,}"), ("tokens / s", f"{summary['tokens_per_s']:,.0f}"),
            ("seconds", f"{summary['train_seconds']:.0f}")]
    return table(rows)


def wrote(what: str, where: str | Path) -> str:
    """The closing line of a command: what it made and where it is."""
    return f"{what}: {where}"

"""One run trained on two devices (`knnlm twins`): a device's own effect, to weigh pairs across devices.

    knnlm twins --first RECORDS_A/ --second RECORDS_B/ --out OUT      # folders of study records
"""

from __future__ import annotations

from pathlib import Path

from ..artifacts import UserError, markdown_table, read_json
from ..config import changed_settings
from .statistics import PAIRED_LABELS, PAIRED_METRICS, cell, over_seeds


def records_by_name(folders: list[Path]) -> dict[str, dict]:
    """{run name: record} over study-record folders; a folder listed earlier wins."""
    found = {}
    for folder in folders:
        if not Path(folder).is_dir():
            raise UserError(f"{folder}: expected a folder of study records (<name>.json)")
        for path in sorted(Path(folder).glob("*.json")):
            record = read_json(path, "study record")
            if isinstance(record, dict) and "name" in record and "valid_lm_ppl" in record:
                found.setdefault(record["name"], record)
    return found


def device_twins(first: list[Path], second: list[Path]) -> dict:
    """Runs recorded in both sets of folders with the same training settings on two different devices: per run,
    the first set's record minus the second's (valid LM and kNN-LM under both protocols), and mean ± std over runs.
    Training settings must match (evaluation settings may differ: the pairs are compared on the metrics both have)."""
    a, b = records_by_name(first), records_by_name(second)
    twins = {}
    for name in sorted(a.keys() & b.keys()):
        x, y = a[name], b[name]
        if x.get("device") == y.get("device"):
            continue
        if any(not c.startswith("eval.") for c in changed_settings(y.get("config", {}), x.get("config", {}))):
            continue
        twins[name] = {"devices": [x.get("device", ""), y.get("device", "")],
                       **{m: x[m] - y[m] for m in PAIRED_METRICS if m in x and m in y}}
    over = over_seeds({m: [t[m] for t in twins.values() if m in t] for m in PAIRED_METRICS})
    return {"runs": twins, "mean_std_n": over}


def twins_markdown(twins: dict) -> str:
    rows = [[name, *t["devices"], *(f"{t[m]:+.2f}" if m in t else "" for m in PAIRED_LABELS)]
            for name, t in twins["runs"].items()]
    over = twins["mean_std_n"]
    rows.append(["mean ± std", "", "", *(cell(*over[m], signed=True) if m in over else "" for m in PAIRED_LABELS)])
    return markdown_table("One run trained on two devices (same settings and seed): first − second",
                          ["run", "first device", "second device", *(f"Δ {v}" for v in PAIRED_LABELS.values())], rows,
                          "Same initialisation and data order; a CPU and a GPU draw different dropout masks from the "
                          "same seed and round differently, so a difference is the device's own effect plus noise.")

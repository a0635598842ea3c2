"""The studies, on top of the pipeline: `knnlm sweep experiments/<study>.toml --out runs/<study>`.

- `engine.py`: the grid, the runner and the order of things; it knows no study and no regularizer;
- `study.py`: the study file's keys; `records.py`: one run of a study and its record;
- `stages/`: what a study file can name in `stages = [...]`, one stage a file, each writing its tables and figures
  from the records;
- `statistics.py`: mean ± std over seeds, pairs against ω = 0 of the same seed, Markdown tables;
- `twins.py` (`knnlm twins`), `analysis.py` (`knnlm analyze`), `plots.py` (every figure, from saved numbers).
"""

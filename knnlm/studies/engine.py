"""The study engine: `knnlm sweep experiments/<study>.toml --out runs/<study>`.

A study file (knnlm/studies/study.py) names a base config, a grid of ω and seeds for one regularizer, and its
stages (knnlm/studies/stages/). The engine trains, builds the datastore of and evaluates one model per (ω, seed)
and per run a stage asks for, several at once with `--jobs`; each finished run's numbers are written at once to
`RESULTS/runs/<name>.json` (knnlm/studies/records.py). After each run, and once at the end, every stage rewrites
its tables and figures from the records; `--tables-only` does only that, from the committed records. RESULTS is
the study's `results`, or results/<study name> beside the experiments/ folder.

Order: the grid (seed-major: a stopped study already has every ω at the first seeds) with the runs the stages
start beside it, then each stage's `after` step in the study's order. `--stop-after` starts no run after the
deadline; the same command continues from the records.
"""

from __future__ import annotations

import multiprocessing
import os
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from pathlib import Path

import torch

from ..artifacts import UserError, kill_point, read_json, write_json
from ..config import load_config
from .records import recorded, run_one
from .stages import make_stages
from .study import Study, load_study


def _run_task(task: tuple) -> dict:
    *args, threads, prune = task
    torch.set_num_threads(threads)
    try:
        return run_one(*args, progress=False, prune=prune)
    finally:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()  # this worker may idle while others still search: leave them the memory


class Runner:
    """Runs `run_one` tasks in order, `jobs` at a time in their own processes (spawned: CUDA does not survive a
    fork), and starts none after the deadline (`--stop-after`): a stopped sweep continues from its records."""

    def __init__(self, jobs: int = 1, stop_after: float = 0.0, threads: int = 0, prune: bool = False):
        self.jobs, self.t0, self.stop_after = max(1, jobs), time.time(), stop_after
        self.threads = threads or max(1, (os.cpu_count() or 1) // self.jobs)
        self.prune, self.skipped = prune, 0

    def out_of_time(self) -> bool:
        return bool(self.stop_after) and time.time() - self.t0 > self.stop_after

    def run(self, tasks: list[tuple], done) -> None:
        """Run the tasks; call `done(record)` in this process as each finishes. Tasks already recorded are taken
        from their records whatever the deadline."""
        todo = []
        for task in tasks:
            rec = recorded(*task)
            if rec is not None:
                done(rec)
            else:
                todo.append(task)
        tasks = todo
        if self.jobs == 1:
            for i, task in enumerate(tasks):
                if self.out_of_time():
                    self.skipped += len(tasks) - i
                    return
                done(run_one(*task, prune=self.prune))
                kill_point("sweep", i + 1)
            return
        pending, running = list(tasks), set()
        with ProcessPoolExecutor(self.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            try:
                while pending or running:
                    while pending and len(running) < self.jobs and not self.out_of_time():
                        running.add(pool.submit(_run_task, (*pending.pop(0), self.threads, self.prune)))
                    if not running:
                        break
                    finished, running = wait(running, return_when=FIRST_COMPLETED)
                    for f in finished:
                        done(f.result())
            finally:
                self.skipped += len(pending)
                for f in running:
                    f.cancel()


def _order(record: dict) -> tuple:
    return record["regularizer"], record["omega"], record["seed"]


class Sweep:
    """A study being run: its records so far, and what its stages may ask for (knnlm/studies/stages/base.py)."""

    def __init__(self, study: Study, out: Path, results: Path, runner: Runner | None = None, early: bool = False):
        self.study, self.out, self.results, self.runner, self.early = study, out, results, runner, early
        self.records = sorted((read_json(p, "study record") for p in sorted((results / "runs").glob("*.json"))), key=_order)
        self.stages = make_stages(study)

    def task(self, regularizer: str, omega: float, seed: int, extra: list[str] = ()) -> tuple:
        """One run's arguments for `run_one`."""
        return (self.study, self.out, self.results, regularizer, omega, seed, list(extra))

    def _add(self, record: dict) -> None:
        self.records = sorted([r for r in self.records if r["name"] != record["name"]] + [record], key=_order)

    def done(self, record: dict) -> None:
        if record in self.records:
            return  # read from its record: already in the tables
        self._add(record)
        self.write()

    def update(self, record: dict) -> None:
        """A record changed by a stage (e.g. test figures added): written to its file and kept."""
        write_json(self.results / "runs" / f"{record['name']}.json", record)
        self._add(record)

    def run(self, tasks: list[tuple]) -> None:
        self.runner.run(tasks, self.done)

    def write(self) -> None:
        """Every stage's tables and figures, from the records."""
        for stage in self.stages:
            stage.write(self)


def run_sweep(study_path: str | Path, out: Path, overrides: list[str] = (), jobs: int = 1, stop_after: float = 0.0,
              threads: int = 0, prune: bool = False, results: str | None = None, tables_only: bool = False,
              early: bool = False) -> None:
    """Run a study (see the top of this file); `tables_only`: rewrite its tables and figures from the recorded runs
    and train nothing (e.g. after the table code changed, or with records copied from another machine); `early`:
    start the stages' runs beside the grid where they can be chosen from the records so far (a machine with room
    for more models at once: a GPU)."""
    study_path = Path(study_path)
    study = load_study(study_path)
    study.overrides = [*study.overrides, *overrides]
    results = Path(results or (study_path.parent / study.results if study.results else
                               study_path.resolve().parent.parent / "results" / study_path.stem))
    (results / "runs").mkdir(parents=True, exist_ok=True)
    load_config(study.base, study.overrides)  # fail early on a bad base config or override
    try:
        sweep = Sweep(study, out, results, Runner(jobs, stop_after, threads, prune), early)
    except UserError as e:
        raise UserError(f"{study_path}: {e}") from None
    if not tables_only:
        grid = [sweep.task(study.regularizer, omega, seed) for seed in study.seeds for omega in study.omegas]
        sweep.run(grid + [t for stage in sweep.stages for t in stage.beside(sweep)])
        for stage in sweep.stages:
            if sweep.runner.skipped:
                break
            stage.after(sweep)
        if sweep.runner.skipped:
            print(f"stopped after {stop_after:g} s: {sweep.runner.skipped} runs not started; rerun the same command "
                  "to continue", flush=True)
    sweep.write()

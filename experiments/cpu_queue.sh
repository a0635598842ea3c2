#!/usr/bin/env bash
# The open CPU studies one after another (one heavy job at a time on a 2-core machine), most important first:
# distillation (issue 31), then the memorizing regime, MOCO beside L2, and the key site's curves (issue 33).
#   bash experiments/cpu_queue.sh RUNS_DIR      # e.g. /work/runs; logs in RUNS_DIR/logs/<study>.log
# Each study continues from its records (results/<study>/runs/) and from the run folders under RUNS_DIR; a killed
# queue loses at most the steps since a run's last checkpoint. Run it from a worktree of the commit to measure, so
# that editing the checkout does not change the code a running study imports.
set -u
RUNS=${1:?usage: bash experiments/cpu_queue.sh RUNS_DIR}
cd "$(dirname "$0")/.."
mkdir -p "$RUNS/logs"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
$PY experiments/distill_study.py experiments/distill_study.toml --out "$RUNS/distill_study" \
  >>"$RUNS/logs/distill_study.log" 2>&1 || { echo "distill_study failed: $RUNS/logs/distill_study.log" >&2; exit 1; }
# the MOCO study's ω = 0 runs are the distillation study's bases (same settings; the sweep checks them)
mkdir -p "$RUNS/moco_study"
for seed in 0 1 2; do
  [ -e "$RUNS/moco_study/l2_omega0_seed$seed" ] || ln -s "../distill_study/base_seed$seed" "$RUNS/moco_study/l2_omega0_seed$seed"
done
# Disk: a memorizing run stores 1,024 neighbours of every valid and test token (about 3.8 GB) beside its tables;
# --prune drops the test ones, and the valid ones of ω > 0 runs, once the run is recorded (its tables, the k-depth
# stage's arrays and ω = 0's neighbours for the rescaling control stay). Not for the MOCO study, whose ω = 0 runs are
# the distillation study's folders.
for study in memorizing_study moco_study key_site_curves_study key_site_memorizing_study; do
  prune=""
  case $study in *memorizing*) prune="--prune" ;; esac
  $PY -m knnlm.cli sweep "experiments/$study.toml" --out "$RUNS/$study" $prune >>"$RUNS/logs/$study.log" 2>&1 \
    || { echo "$study failed: $RUNS/logs/$study.log" >&2; exit 1; }
done

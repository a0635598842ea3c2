#!/usr/bin/env bash
# The README's ω-study family (ω study with MOCO, key site, over-fit) at once on one GPU, every model in its own
# process: a model this small leaves a GPU idle between its kernel launches, so many trainings share one H100/H200.
# Each sweep starts only what its records lack. The objectives study is not here: its records are all CPU runs (its
# pairs are one kind of device), so it runs on the CPU: knnlm sweep experiments/objectives_study.toml --out RUNS.
#   bash experiments/gpu_studies.sh RUNS_DIR [SECONDS]
# Records land in results/<study>/runs/ as each model finishes; a rerun continues from them. SECONDS bounds every
# sweep (no MOCO run starts after 55 % of it). SMOKE=1 runs the same on tiny settings (a CPU check of the script).
set -u
RUNS=${1:-runs}
LIMIT=${2:-520}
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1
mkdir -p "$RUNS/logs"
EXTRA=()
RESULTS=results
if [ "${SMOKE:-0}" = 1 ]; then
  EXTRA=(data.max_train_tokens=20000 data.max_eval_tokens=2000 model.d_model=32 model.d_ff=64 model.n_heads=2
         model.context=32 train.batch_size=8 train.epochs=1 train.warmup_steps=2 eval.k_max=16 eval.k=4,16)
  RESULTS=$RUNS/results
fi
python3 -c "from knnlm.data import load_corpus; print('corpus:', load_corpus().folder)" || exit 1  # fills the cache once
# jobs: each study's whole first stage at once (the ω study's grid and its MOCO runs, --early)
for spec in "omega_study 18" "key_site_study 6" "overfit_study 4"; do
  read -r study jobs <<<"$spec"
  [ "${SMOKE:-0}" = 1 ] && jobs=2
  timeout "$LIMIT" python3 -m knnlm.cli sweep "experiments/$study.toml" --out "$RUNS/$study" --results "$RESULTS/$study" \
    --jobs "$jobs" --threads 1 --prune --early --stop-after $((LIMIT * 55 / 100)) "${EXTRA[@]}" \
    >"$RUNS/logs/$study.log" 2>&1 &
done
wait
tail -n 3 "$RUNS"/logs/*.log

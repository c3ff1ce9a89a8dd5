#!/usr/bin/env bash
# Execute the notebooks headless into OUT (executed copies; the committed notebooks stay
# as they are), their figures into OUT/figures. A cell that raises fails the script.
#   notebooks/run_notebooks.sh [--out DIR] [--demo STEPS] [--regimes LIST] [--batches N] [NOTEBOOK...]
#   --out DIR      default build/notebooks
#   --demo STEPS   first make the inputs under OUT/data with $FLOWLOOP (default build/flowloop):
#                  a looped (loop 4) and an ODE-depth (rk4, 4 steps on [0, 4]) model trained
#                  STEPS steps each on p-hop (16 symbols, 4 hops); `flowloop compare` on each
#                  (--regimes LIST, default all; --batches N of 32, default 4); `flowloop
#                  trajectory` of the looped model and of the ODE one under dopri5; a small
#                  `flowloop sweep` (3 training regimes, STEPS steps), a 2-arm `flowloop study`
#                  and `flowloop bench wp` of a small model; `flowloop flow-match` record of the
#                  looped model, two students (STEPS steps) and their evaluation
#   NOTEBOOK...    default every notebooks/*.ipynb
# The inputs are otherwise FLOWLOOP_COMPARE_DIRS, FLOWLOOP_TRAJECTORY_DIRS, FLOWLOOP_SWEEP_DIR,
# FLOWLOOP_STUDY_DIRS, FLOWLOOP_WP_FILES and FLOWLOOP_FM_DIRS (':'-separated)
# or the notebooks' defaults (OUT/data of --demo with the default OUT).
# Needs Debian's python3-numpy, -matplotlib, -nbconvert, -nbformat, -ipykernel (`./run.sh
# figures` installs them).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
out=$root/build/notebooks
demo=0 regimes="" batches=4 notebooks=()
while (($#)); do
  case "$1" in
    --out) out=$(mkdir -p "$2" && cd "$2" && pwd); shift 2 ;;
    --demo) demo=$2; shift 2 ;;
    --regimes) regimes=$2; shift 2 ;;
    --batches) batches=$2; shift 2 ;;
    -h|--help) awk 'NR > 1 && !/^#/ {exit} NR > 1' "$0"; exit 0 ;;
    -*) echo "run_notebooks.sh: unknown option $1" >&2; exit 2 ;;
    *) notebooks+=("$(cd "$(dirname "$1")" && pwd)/$(basename "$1")"); shift ;;
  esac
done
((${#notebooks[@]})) || notebooks=("$root"/notebooks/*.ipynb)

py=/usr/bin/python3
$py -c "import numpy, matplotlib, nbconvert, nbformat, ipykernel" 2>/dev/null || {
  echo "run_notebooks.sh: needs python3-numpy python3-matplotlib python3-nbconvert python3-nbformat" \
    "python3-ipykernel (./run.sh figures installs them)" >&2
  exit 1
}

if ((demo)); then
  fl=${FLOWLOOP:-$root/build/flowloop}
  data=$out/data
  mkdir -p "$data"
  common=(--task phop --task-n 16 --hops 4 --steps "$demo" --batch 64 --lr 1e-3
          --warmup "$((demo / 5))" --eval-every "$demo")
  echo "== training a looped and an ODE-depth model, $demo steps each"
  "$fl" train "${common[@]}" --loops 4 --out "$data/looped" >/dev/null
  "$fl" train "${common[@]}" --solver rk4 --solver-steps 4 --out "$data/ode" >/dev/null
  for m in looped ode; do
    echo "== flowloop compare: $m"
    "$fl" compare -m "$data/$m/model.safetensors" --out "$data/cmp_$m" --batches "$batches" --batch 32 \
      ${regimes:+--regimes "$regimes"} >/dev/null
  done
  echo "== flowloop trajectory: looped, and the ODE model under dopri5"
  "$fl" trajectory -m "$data/looped/model.safetensors" --out "$data/traj_looped" >/dev/null
  "$fl" trajectory -m "$data/ode/model.safetensors" --solver dopri5 --out "$data/traj_ode" >/dev/null
  small=(--task phop --task-n 8 --hops 2 --d-model 32 --n-head 2 --batch 32 --warmup 2)
  echo "== flowloop sweep: loop 4, rk4 4 steps, dopri5 1e-2, $demo steps each; flowloop study: 2 arms"
  "$fl" sweep "${small[@]}" --steps "$demo" --eval-every "$demo" --eval-batches 1 \
    --train-depths loop:4,rk4:4,dopri5:1e-2 --regimes loop:2,loop:4,rk4:2,rk4:4,dopri5:1e-2,dopri5:1e-4 \
    --compare-batches "$batches" --compare-batch 32 --out "$data/sweep" 2>/dev/null >/dev/null
  "$fl" study --task phop --task-n 8 --hops 2 --d-model 32 --n-head 2 --batch 32 --warmup 2 --steps "$demo" \
    --arms looped,deep --curve-points 4 --eval-batches 1 --out "$data/study" 2>/dev/null >/dev/null
  echo "== flowloop bench wp: a small model on [0, 40]"
  "$fl" init --vocab 11 --context 8 --d-model 16 --n-head 2 --n-block 1 --depth 4 --seed 3 \
    -o "$data/wp_model.safetensors" >/dev/null
  echo '{"tokens": [[1, 2, 3, 4, 5, 6], [7, 8, 9, 10, 0, 1]]}' > "$data/wp_tokens.json"
  "$fl" bench wp -m "$data/wp_model.safetensors" --tokens "$data/wp_tokens.json" --t1 40 --reps 1 --seconds 0 \
    > "$data/wp.jsonl"
  echo "== flowloop flow-match: the looped model's paths, two students (icfm with the decode loss, trajectory with shortcut)"
  "$fl" flow-match record -m "$data/looped/model.safetensors" --examples 1024 --test-examples 128 \
    --shard-size 512 --out "$data/fm_data" >/dev/null 2>&1
  "$fl" flow-match train --data "$data/fm_data" --decode-weight 1 --steps "$demo" --eval-every "$demo" \
    --warmup "$((demo / 5))" --out "$data/fm_icfm" >/dev/null 2>&1
  "$fl" flow-match train --data "$data/fm_data" --matcher trajectory --shortcut --shortcut-steps 16 \
    --shortcut-fraction 0.25 --steps "$demo" --eval-every "$demo" \
    --warmup "$((demo / 5))" --out "$data/fm_traj" >/dev/null 2>&1
  for s in fm_icfm fm_traj; do
    "$fl" flow-match eval -m "$data/$s/model.safetensors" --data "$data/fm_data" --csv "$data/$s/eval.csv" \
      >/dev/null 2>&1
  done
  export FLOWLOOP_SWEEP_DIR=${FLOWLOOP_SWEEP_DIR:-$data/sweep}
  export FLOWLOOP_STUDY_DIRS=${FLOWLOOP_STUDY_DIRS:-$data/study}
  export FLOWLOOP_WP_FILES=${FLOWLOOP_WP_FILES:-$data/wp.jsonl}
  export FLOWLOOP_COMPARE_DIRS=${FLOWLOOP_COMPARE_DIRS:-$data/cmp_looped:$data/cmp_ode}
  export FLOWLOOP_TRAJECTORY_DIRS=${FLOWLOOP_TRAJECTORY_DIRS:-$data/traj_looped:$data/traj_ode}
  export FLOWLOOP_FM_DIRS=${FLOWLOOP_FM_DIRS:-$data/fm_icfm:$data/fm_traj}
fi

# relative input paths are the repository root's, as in the notebooks
export FLOWLOOP_FIGURES=${FLOWLOOP_FIGURES:-$out/figures}
export MPLBACKEND=Agg PYDEVD_DISABLE_FILE_VALIDATION=1
for nb in "${notebooks[@]}"; do
  echo "== executing $(basename "$nb")"
  # the kernel runs in the notebook's directory, where flowloop_nb.py is
  $py -m nbconvert --to notebook --execute --ExecutePreprocessor.timeout=600 --log-level WARN \
    --output-dir "$out" "$nb" || { echo "run_notebooks.sh: $(basename "$nb") failed" >&2; exit 1; }
done
echo "executed notebooks in $out, figures in $FLOWLOOP_FIGURES"

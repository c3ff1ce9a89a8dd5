#!/usr/bin/env bash
# Data-parallel training on 2 MPI ranks (mpirun -np 2 --oversubscribe) against one process:
# the same global batches, so losses and gradient norms agree to float rounding
# (rel < 1e-5), looped and as a per-sequence adaptive ODE with the kinetic regulariser;
# two runs on 2 ranks give the same bits; a run stopped on 2 ranks resumes on 1 and one
# stopped on 1 resumes on 2, each equal to the uninterrupted run; what cannot be sharded
# is refused with an error naming it; flow-match train on 2 ranks against 1 process too.
# Usage: mpi_check.sh FLOWLOOP MPIEXEC WORK_DIR (MPI_CHECK_DEVICE=cuda: on the GPU, as
# ./run.sh gpu-check runs it; default cpu)
set -euo pipefail
fl=$1 mpiexec=$2 work=$3
rm -rf "$work"
mkdir -p "$work"
# CI and these machines run as root; Open MPI needs its consent for that
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_rmaps_base_oversubscribe=1
np2=("$mpiexec" -np 2 --oversubscribe --bind-to none)
base=(--task phop --task-n 8 --hops 2 --d-model 16 --n-head 2 --steps 6 --warmup 2 --eval-every 3
  --checkpoint-every 3 --eval-batches 1 --seed 3 --device "${MPI_CHECK_DEVICE:-cpu}")
common=("${base[@]}" --batch 9)  # ranks of 5 and 4 rows
loop=(--loops 2)
ode=(--solver dopri5 --rtol 1e-3 --atol 1e-4 --t1 2 --kinetic 0.1)

train1() { "$fl" train "$@" >/dev/null 2>"$work/err.txt" || { cat "$work/err.txt" >&2; exit 1; }; }
train2() { "${np2[@]}" "$fl" train "$@" >/dev/null 2>"$work/err.txt" || { cat "$work/err.txt" >&2; exit 1; }; }

compare() {  # compare A B TOL [exact]: every step's loss and grad_norm
  python3 - "$@" <<'PY'
import json, math, sys
a, b, tol = sys.argv[1], sys.argv[2], float(sys.argv[3])
exact = len(sys.argv) > 4
la = [json.loads(l) for l in open(a + "/metrics.jsonl")]
lb = [json.loads(l) for l in open(b + "/metrics.jsonl")]
assert len(la) == len(lb) == 6, (a, b, len(la), len(lb))
worst = 0.0
for x, y in zip(la, lb):
    for k in ("loss", "grad_norm"):
        u, v = x[k], y[k]
        assert math.isfinite(u) and math.isfinite(v), (k, u, v)
        if exact:
            assert u == v, (a, b, x["step"], k, u, v)
        worst = max(worst, abs(u - v) / max(abs(u), abs(v), 1e-30))
assert worst <= tol, (a, b, "rel", worst, "tol", tol)
print(f"{a} vs {b}: max rel difference {worst:.2e} (tol {tol:g}{', bits' if exact else ''})")
PY
}

same_weights() {  # same_weights A B: every tensor's bytes equal (the metadata names each run's directory)
  python3 - "$@" <<'PY'
import json, struct, sys
def tensors(path):
    raw = open(path, "rb").read()
    (n,) = struct.unpack("<Q", raw[:8])
    head = json.loads(raw[8:8 + n])
    data = raw[8 + n:]
    return {k: data[v["data_offsets"][0]:v["data_offsets"][1]] for k, v in head.items() if k != "__metadata__"}
a, b = tensors(sys.argv[1]), tensors(sys.argv[2])
assert a.keys() == b.keys() and all(a[k] == b[k] for k in a), "the weights differ"
print(f"{len(a)} tensors, the same bytes")
PY
}

for mode in loop ode; do
  declare -n spec=$mode
  train1 "${common[@]}" "${spec[@]}" --out "$work/${mode}_np1"
  train2 "${common[@]}" "${spec[@]}" --out "$work/${mode}_np2"
  train2 "${common[@]}" "${spec[@]}" --out "$work/${mode}_np2_again"
  compare "$work/${mode}_np1" "$work/${mode}_np2" 1e-5
  compare "$work/${mode}_np2" "$work/${mode}_np2_again" 0 exact
  same_weights "$work/${mode}_np2/model.safetensors" "$work/${mode}_np2_again/model.safetensors"
  python3 - "$work/${mode}_np2/metrics.jsonl" <<'PY'
import json, sys
lines = [json.loads(l) for l in open(sys.argv[1])]
for l in lines:
    assert l["ranks"] == 2 and l["load_imbalance"] >= 1.0 and l["allreduce_s"] >= 0 and l["gradient_bytes"] > 0, l
    assert l["communicator"] in ("mpi", "mpi+nccl"), l
print("imbalance per step:", [round(l["load_imbalance"], 3) for l in lines])
PY
  # stopped after its first step on 2 ranks, resumed on 1; and the other way round
  train2 "${common[@]}" "${spec[@]}" --max-seconds 1e-9 --out "$work/${mode}_2to1"
  train1 "${common[@]}" "${spec[@]}" --resume --out "$work/${mode}_2to1"
  compare "$work/${mode}_np1" "$work/${mode}_2to1" 1e-5
  train1 "${common[@]}" "${spec[@]}" --max-seconds 1e-9 --out "$work/${mode}_1to2"
  train2 "${common[@]}" "${spec[@]}" --resume --out "$work/${mode}_1to2"
  compare "$work/${mode}_np1" "$work/${mode}_1to2" 1e-5
done

# flow matching on the loop teacher's recorded paths: 2 ranks against 1 process, bits repeated
"$fl" flow-match record -m "$work/loop_np1/model.safetensors" --examples 24 --test-examples 8 --batch 4 \
  --shard-size 8 --out "$work/paths" --device cpu >/dev/null 2>"$work/err.txt" || { cat "$work/err.txt" >&2; exit 1; }
fm=(flow-match train --data "$work/paths" --matcher otcfm --steps 6 --batch 5 --warmup 2 --eval-every 3
  --checkpoint-every 3 --eval-batches 1 --time-freq 8 --seed 3 --device "${MPI_CHECK_DEVICE:-cpu}")
"$fl" "${fm[@]}" --out "$work/fm_np1" >/dev/null 2>"$work/err.txt" || { cat "$work/err.txt" >&2; exit 1; }
"${np2[@]}" "$fl" "${fm[@]}" --out "$work/fm_np2" >/dev/null 2>"$work/err.txt" || { cat "$work/err.txt" >&2; exit 1; }
"${np2[@]}" "$fl" "${fm[@]}" --out "$work/fm_np2_again" >/dev/null 2>"$work/err.txt" || { cat "$work/err.txt" >&2; exit 1; }
compare "$work/fm_np1" "$work/fm_np2" 1e-5
compare "$work/fm_np2" "$work/fm_np2_again" 0 exact
same_weights "$work/fm_np2/model.safetensors" "$work/fm_np2_again/model.safetensors"

expect_error() {  # expect_error TEXT ARGS...: the run fails and says TEXT
  local text=$1
  shift
  if "${np2[@]}" "$fl" train "${base[@]}" "$@" --out "$work/bad" >/dev/null 2>"$work/err.txt"; then
    echo "mpi_check: expected an error containing '$text'" >&2; exit 1
  fi
  grep -qF "$text" "$work/err.txt" || { echo "mpi_check: the error does not say '$text':" >&2; cat "$work/err.txt" >&2; exit 1; }
}
expect_error "drop batch_coupled" --solver dopri5 --batch-coupled --batch 9
expect_error "every rank needs a row" --loops 2 --batch 1
echo "mpi_check: ok"

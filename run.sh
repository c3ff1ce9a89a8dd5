#!/usr/bin/env bash
# flowloop's one entry point for a fresh machine.
#   ./run.sh          install what is missing, build (Release), run the default job on p-hop
#                     induction: train a looped and an ODE-depth model, compare them under
#                     every depth regime, trace their latent trajectories, render the figures
#                     (about 9 minutes on 2 cores with the build); prints where the tables
#                     and figures are
#   ./run.sh study    a small looped-vs-deep-vs-ODE study on p-hop (a few minutes)
#   ./run.sh test     install what is missing, build, run the test suite (ctest)
#   ./run.sh tour     init a model, run it looped and as an ODE, benchmark the field
#   ./run.sh peer     the PyTorch side-by-side benchmark (installs python3-torch)
#   ./run.sh figures [ARGS]  execute notebooks/*.ipynb headless into build/notebooks (installs
#                     matplotlib and nbconvert); no ARGS: on two small p-hop models, looped and
#                     ODE-depth, trained here first; ARGS go to notebooks/run_notebooks.sh
#   ./run.sh studies  the study figures of docs/studies.md (notebooks/figures) from full-size models
#                     (about 40 minutes on 2 cores)
#   ./run.sh flowmatch  the flow-matching study of docs/flow-matching.md: an 8-loop p-hop teacher, its recorded
#                     latent paths, seven flow students, their evaluation and figures (about
#                     an hour on 2 cores)
#   ./run.sh reproduce  the looped-vs-deep tables of docs/studies.md in full: p-hop and modarith,
#                     every arm at most 10 minutes, the ODE-depth table and looped vs deep at
#                     12,000 steps over 3 seeds, the tolerance sweep (about 5 hours on 2 cores)
#   ./run.sh fuzz [SECONDS]  the input parsers under libFuzzer (clang, ASan + UBSan), each SECONDS
#                     (default 60) from its seed corpus in tests/fuzz/corpus
#   ./run.sh sanitize [SECONDS]  the same clang build: the test suite under ASan + UBSan, then
#                     the fuzzers (what CI runs after ./run.sh test)
#   ./run.sh scaling [STEPS]  data-parallel training: 1 process against 2 MPI ranks on this
#                     machine (tokens/s, the allreduce's share of a step, gradient bytes)
#   ./run.sh hf-bench  Llama-family forward against transformers at SmolLM2-135M's shape (tokens/s,
#                     side by side), and the peak memory and seconds of loading a 1.4B BF16 checkpoint
#                     (makes build/hf-venv; writes 2.9 GB under build/hf-bench)
#   ./run.sh gpu-check  on a GPU machine: build the CUDA backend, run its agreement tests against
#                     the CPU and the whole suite, then the GPU benchmarks against cuBLAS and
#                     PyTorch + torchdiffeq (`gpu-check tests`: the tests only; fails without a GPU)
# Environment: BUILD_DIR (default build), JOBS (default: all cores).
set -euo pipefail
cd "$(dirname "$0")"
BUILD_DIR=${BUILD_DIR:-build}
JOBS=${JOBS:-$(nproc)}
mode=${1:-main}

need_pkgs() {
  local missing=()
  for p in "$@"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  if ((${#missing[@]})); then
    echo "flowloop: installing ${missing[*]}" >&2
    local sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  fi
}

build_targets=()  # what build_in builds (none named: everything)
build_in() {  # build_in DIR [CMAKE ARGS]
  local dir=$1
  shift
  need_pkgs g++ cmake make libeigen3-dev libboost-dev libcli11-dev catch2 nlohmann-json3-dev \
    libopenblas-dev libopenblas-openmp-dev libpcre2-dev libutf8proc-dev fortunes openmpi-bin libopenmpi-dev \
    python3-dev pybind11-dev python3-numpy python3-pytest
  # the Python module and its tests against Debian's python3 (numpy, pytest, pybind11 are its)
  cmake -S . -B "$dir" -DCMAKE_BUILD_TYPE=Release -DPython_EXECUTABLE=/usr/bin/python3 "$@" >/dev/null
  cmake --build "$dir" -j "$JOBS" "${build_targets[@]}" >/dev/null
}
build() { build_in "$BUILD_DIR" "$@"; }
# The Hugging Face reference tests' environment: Debian's torch, transformers 4.46 from PyPI
# (never a dependency of the library), in $BUILD_DIR/hf-venv.
hf_env() {
  need_pkgs python3-torch python3-venv python3-pip python3-pytest python3-numpy
  local venv="$BUILD_DIR/hf-venv"
  if ! "$venv/bin/python" -c "import transformers, torch" 2>/dev/null; then
    echo "flowloop: making $venv (transformers 4.46.3 on Debian's torch)" >&2
    /usr/bin/python3 -m venv --system-site-packages "$venv"
    "$venv/bin/pip" install -q --disable-pip-version-check "transformers==4.46.3"
  fi
}

case "$mode" in
  main)
    build
    fl="$BUILD_DIR/flowloop"
    out="$BUILD_DIR/main"
    common=(--task phop --task-n 16 --hops 4 --batch 64 --lr 1e-3 --seed 0)
    echo "== 1/4 train: one block looped 4 times, 3000 steps ($out/looped)"
    "$fl" train "${common[@]}" --loops 4 --steps 3000 --warmup 200 --eval-every 1000 --eval-batches 4 \
      --checkpoint-every 3000 --out "$out/looped" >/dev/null
    echo "== 1/4 train: the same block continued as an ODE on [0, 4], 600 steps: each batch a random"
    echo "   method (euler, midpoint, rk4) and step count (2-8), kinetic regulariser 10 ($out/ode)"
    "$fl" train "${common[@]}" --solver rk4 --random-solvers euler,midpoint,rk4 --random-steps-min 2 \
      --random-steps-max 8 --kinetic 10 --init-from "$out/looped/model.safetensors" --steps 600 --warmup 50 \
      --eval-every 600 --eval-batches 4 --checkpoint-every 600 --out "$out/ode" >/dev/null
    for m in looped ode; do
      echo "== 2/4 compare: the $m model under every depth regime ($out/compare_$m)"
      "$fl" compare -m "$out/$m/model.safetensors" --batches 4 --batch 64 --out "$out/compare_$m" \
        > "$out/compare_$m.txt"
    done
    echo "== 3/4 trajectory: the looped model's 4 loops, the ODE model under dopri5 at 17 depths"
    "$fl" trajectory -m "$out/looped/model.safetensors" --out "$out/trajectory_looped" >/dev/null
    "$fl" trajectory -m "$out/ode/model.safetensors" --solver dopri5 --out "$out/trajectory_ode" >/dev/null
    echo "== 4/4 figures"
    need_pkgs python3 python3-numpy python3-matplotlib python3-nbformat python3-nbconvert python3-ipykernel
    FLOWLOOP_COMPARE_DIRS="$out/compare_looped:$out/compare_ode" \
      FLOWLOOP_TRAJECTORY_DIRS="$out/trajectory_looped:$out/trajectory_ode" FLOWLOOP_FIGURES="$out/figures" \
      notebooks/run_notebooks.sh --out "$out/notebooks" notebooks/loop_vs_ode.ipynb \
      notebooks/latent_trajectories.ipynb >/dev/null
    echo
    for m in looped ode; do
      echo "-- the $m model ($(($(wc -l < "$out/compare_$m/compare.csv") - 1)) regimes in $out/compare_$m/compare.csv), its Pareto front:"
      head -1 "$out/compare_$m.txt"
      grep "(pareto)" "$out/compare_$m.txt"
    done
    echo
    echo "tables: $out/compare_{looped,ode}/{compare,pareto}.csv, $out/trajectory_{looped,ode}/lens.csv"
    echo "figures: $out/figures/*.png (executed notebooks in $out/notebooks)"
    ;;
  studies)
    # the figures of docs/studies.md's "The three studies": the looped p-hop model of the ODE-depth
    # table (seed 0, 12,000 steps) and its continuation as an ODE (3,000 steps, random
    # discretisation, kinetic 10); compare, trajectories, figures into notebooks/figures
    # (about 40 minutes on 2 cores)
    build
    fl="$BUILD_DIR/flowloop"
    out="$BUILD_DIR/studies"
    common=(--task phop --task-n 16 --hops 4 --batch 64 --lr 1e-3 --min-lr 1e-4 --warmup 200 --seed 0
            --eval-batches 4)
    "$fl" train "${common[@]}" --loops 4 --steps 12000 --eval-every 3000 --checkpoint-every 3000 --out "$out/looped"
    "$fl" train "${common[@]}" --solver rk4 --random-solvers euler,midpoint,rk4 --random-steps-min 2 \
      --random-steps-max 8 --kinetic 10 --init-from "$out/looped/model.safetensors" --steps 3000 --eval-every 1000 \
      --checkpoint-every 1000 --out "$out/ode"
    "$fl" compare -m "$out/looped/model.safetensors" --out "$out/compare_looped"
    "$fl" compare -m "$out/ode/model.safetensors" --out "$out/compare_ode"
    "$fl" trajectory -m "$out/looped/model.safetensors" --batches 4 --batch 64 --out "$out/trajectory_looped"
    "$fl" trajectory -m "$out/looped/model.safetensors" --solver dopri5 --batches 4 --batch 64 \
      --out "$out/trajectory_looped_dopri5"
    "$fl" trajectory -m "$out/ode/model.safetensors" --solver dopri5 --batches 4 --batch 64 --out "$out/trajectory_ode"
    need_pkgs python3 python3-numpy python3-matplotlib python3-nbformat python3-nbconvert python3-ipykernel
    FLOWLOOP_COMPARE_DIRS="$out/compare_looped:$out/compare_ode" \
      FLOWLOOP_TRAJECTORY_DIRS="$out/trajectory_looped:$out/trajectory_looped_dopri5:$out/trajectory_ode" \
      FLOWLOOP_FIGURES=notebooks/figures notebooks/run_notebooks.sh --out "$out/notebooks" \
      notebooks/loop_vs_ode.ipynb notebooks/latent_trajectories.ipynb
    ;;
  flowmatch)
    # the flow-matching study of docs/flow-matching.md: a p-hop teacher looped 8 times (12,000 steps), its
    # latent paths on 131,072 training and 2,048 test examples, seven students of 20,000 steps,
    # each sampled under every solver against the teacher and the truncated teacher; the
    # figures into notebooks/figures (about an hour on 2 cores; a rerun resumes)
    build
    fl="$BUILD_DIR/flowloop"
    out="$BUILD_DIR/flowmatch"
    resume() { [ -f "$1/checkpoint.safetensors" ] && echo --resume || true; }
    "$fl" train --task phop --task-n 16 --hops 4 --loops 8 --steps 12000 --batch 64 --lr 1e-3 --warmup 200 \
      --seed 0 --eval-every 2000 --eval-batches 4 --checkpoint-every 2000 --out "$out/teacher" \
      $(resume "$out/teacher") >/dev/null
    "$fl" flow-match record -m "$out/teacher/model.safetensors" --examples 131072 --test-examples 2048 \
      --shard-size 4096 --out "$out/data"
    students=("icfm:--matcher icfm" "icfm_decode:--matcher icfm --decode-weight 1"
              "otcfm:--matcher otcfm --coupling exact" "trajectory:--matcher trajectory"
              "trajectory_s2:--matcher trajectory --state-stride 2"
              "icfm_shortcut:--matcher icfm --shortcut"
              "trajectory_s2_shortcut:--matcher trajectory --state-stride 2 --shortcut --shortcut-steps 16 --shortcut-fraction 0.25")
    dirs=()
    for s in "${students[@]}"; do
      name=${s%%:*}
      echo "== flow-match train: $name (${s#*:})"
      # shellcheck disable=SC2086
      "$fl" flow-match train --data "$out/data" ${s#*:} --steps 20000 --lr 2e-3 --eval-every 5000 \
        --checkpoint-every 5000 --out "$out/$name" $(resume "$out/$name") >/dev/null
      "$fl" flow-match eval -m "$out/$name/model.safetensors" --data "$out/data" --csv "$out/$name/eval.csv" \
        > "$out/$name/eval.txt"
      cat "$out/$name/eval.txt"
      dirs+=("$out/$name")
    done
    need_pkgs python3 python3-numpy python3-matplotlib python3-nbformat python3-nbconvert python3-ipykernel
    FLOWLOOP_FM_DIRS=$(IFS=:; echo "${dirs[*]}") FLOWLOOP_FIGURES=notebooks/figures \
      notebooks/run_notebooks.sh --out "$out/notebooks" notebooks/flow_matching.ipynb
    ;;
  study)
    build
    "$BUILD_DIR/flowloop" study --task phop --task-n 16 --hops 4 --depth 4 --steps 3000 --ode-steps 300 \
      --batch 64 --lr 1e-3 --warmup 200 --out "$BUILD_DIR/study"
    ;;
  reproduce)
    build
    fl="$BUILD_DIR/flowloop"
    common=(--depth 4 --steps 36000 --batch 64 --lr 1e-3 --warmup 200 --ode-seconds 570)
    # the three looped/deep arms at equal steps, then the ODE arms (plain and with the
    # kinetic-energy regulariser) under a 10-minute budget
    "$fl" study --task phop --task-n 16 --hops 4 "${common[@]}" --arms looped,deep,shallow --out "$BUILD_DIR/reproduce/phop"
    "$fl" study --task phop --task-n 16 --hops 4 "${common[@]}" --arms ode --ode-steps 2000 --out "$BUILD_DIR/reproduce/phop_ode"
    "$fl" study --task phop --task-n 16 --hops 4 "${common[@]}" --arms ode --ode-steps 2000 --kinetic 10 \
      --out "$BUILD_DIR/reproduce/phop_ode_kinetic"
    "$fl" study --task modarith --task-n 8 --prime 2 "${common[@]}" --arms looped,deep,shallow --out "$BUILD_DIR/reproduce/modarith8"
    "$fl" study --task modarith --task-n 6 --prime 2 "${common[@]}" --arms looped,deep,shallow --out "$BUILD_DIR/reproduce/modarith"
    "$fl" study --task modarith --task-n 6 --prime 2 "${common[@]}" --arms ode --ode-steps 3000 --kinetic 10 \
      --out "$BUILD_DIR/reproduce/modarith_ode_kinetic"
    # ODE depth that stays an ODE: the looped model continued as an ODE under a random
    # discretisation per batch, 3 seeds, each model evaluated under every regime
    "$fl" study --task phop --task-n 16 --hops 4 --depth 4 --steps 12000 --ode-steps 3000 --seeds 3 \
      --batch 64 --lr 1e-3 --warmup 200 --arms looped,ode --ode-from-looped --solver rk4 \
      --random-solvers euler,midpoint,rk4 --random-steps-min 2 --random-steps-max 8 \
      --eval-depths loop,euler:4,euler:16,dopri5:1e-2,dopri5:1e-3,dopri5:1e-4,dopri5:1e-5,rk4:4,rk4:8,rk4:16 \
      --out "$BUILD_DIR/reproduce/phop_ode_random"
    # the same with the kinetic-energy regulariser on the ODE arm (the looped arm retrains
    # to the same bits: every run is a function of its configuration and seed)
    "$fl" study --task phop --task-n 16 --hops 4 --depth 4 --steps 12000 --ode-steps 3000 --seeds 3 \
      --batch 64 --lr 1e-3 --warmup 200 --arms looped,ode --ode-from-looped --solver rk4 \
      --random-solvers euler,midpoint,rk4 --random-steps-min 2 --random-steps-max 8 --kinetic 10 \
      --eval-depths loop,euler:4,euler:16,dopri5:1e-2,dopri5:1e-3,dopri5:1e-4,dopri5:1e-5,rk4:4,rk4:8,rk4:16 \
      --out "$BUILD_DIR/reproduce/phop_ode_random_kinetic"
    # looped vs deep vs one block over 3 seeds at 12,000 steps (a rerun resumes each arm)
    "$fl" study --task phop --task-n 16 --hops 4 --depth 4 --steps 12000 --batch 64 --lr 1e-3 --warmup 200 \
      --seeds 3 --arms looped,deep,shallow --out "$BUILD_DIR/reproduce/phop12k_seeds"
    # the tolerance study: the seed-0 looped model continued 1,500 steps under each training
    # regime, each evaluated under every regime of compare (notebooks/tolerance_study.ipynb)
    "$fl" sweep --task phop --task-n 16 --hops 4 --train-depths loop:4,rk4:4,dopri5:0.01,dopri5:0.001 \
      --init-from "$BUILD_DIR/reproduce/phop12k_seeds/looped-s0/model.safetensors" --steps 1500 --warmup 50 \
      --batch 64 --lr 1e-3 --min-lr 1e-4 --seed 0 --eval-every 500 --eval-batches 4 --checkpoint-every 500 \
      --out "$BUILD_DIR/reproduce/sweep"
    for d in phop phop_ode phop_ode_kinetic modarith8 modarith modarith_ode_kinetic phop_ode_random phop_ode_random_kinetic \
      phop12k_seeds; do
      echo "== $d"; cat "$BUILD_DIR/reproduce/$d/results.md"
    done
    ;;
  tour)
    build
    out="$BUILD_DIR/demo"
    mkdir -p "$out"
    fl="$BUILD_DIR/flowloop"
    echo "== init: a 2-block looped GPT (V=256, C=128, 4 heads), seed 1"
    "$fl" init --vocab 256 --context 64 --d-model 128 --n-head 4 --n-block 2 --depth 4 --seed 1 \
      -o "$out/model.safetensors"
    echo "== forward: two rows of bytes, looped 4 times"
    bytes() { printf '%s' "$1" | od -An -tu1 -v | tr -s ' \n' ',' | sed 's/^,//; s/,$//'; }
    echo "{\"tokens\": [[$(bytes "flowloop: depth as an ODE.")], [$(bytes "h_{k+1} = h_k + f(h_k) ...")]]}" \
      > "$out/tokens.json"
    "$fl" forward -m "$out/model.safetensors" --tokens "$out/tokens.json" --loops 4 -o "$out/logits.json"
    echo "== forward: the same depth as an ODE, dopri5 on [0, 4]"
    "$fl" forward -m "$out/model.safetensors" --tokens "$out/tokens.json" --solver dopri5 -o "$out/ode.json"
    echo "== bench: one field evaluation at sizes S and M against sgemm in the same run"
    "$fl" bench field --size S
    "$fl" bench field --size M
    ;;
  hf-bench)
    build
    hf_env
    # OPENBLAS_CORETYPE / OPENBLAS_L2_SIZE (set on some machines for old OpenBLAS builds) would
    # pin both sides to another kernel: unset for this command alone
    export PYTHONPATH="$PWD/$BUILD_DIR/python" FLOWLOOP_CLI="$PWD/$BUILD_DIR/flowloop"
    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE "$BUILD_DIR/hf-venv/bin/python" experiments/hf_bench.py forward
    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE "$BUILD_DIR/hf-venv/bin/python" experiments/hf_bench.py load \
      --dir "$BUILD_DIR/hf-bench"
    ;;
  test)
    build
    hf_env
    cd "$BUILD_DIR" && ctest --output-on-failure -j "$JOBS"
    ;;
  gpu-check)
    # on a GPU machine: the CUDA backend's agreement tests against the CPU (float and
    # double) with the device named, the whole suite, 2 MPI ranks against 1 process on the
    # GPU, then the GPU benchmarks: bench
    # field (the field on the GPU against cuBLAS sgemm of the MLP's shape) at M and G,
    # and PyTorch + torchdiffeq on the same GPU side by side (a dopri5 solve at M and G,
    # a training step at M and G). `gpu-check tests` stops after the tests. Fails where
    # no GPU is visible.
    build -DFLOWLOOP_CUDA=ON
    rc=0
    "$BUILD_DIR/tests/flowloop_cuda_tests" || rc=$?
    if ((rc == 77)); then
      echo "gpu-check: no CUDA device visible here" >&2
      exit 1
    fi
    ((rc == 0)) || exit "$rc"
    (cd "$BUILD_DIR" && ctest -j "$JOBS" --output-on-failure >ctest.log 2>&1 && tail -3 ctest.log) ||
      { tail -40 "$BUILD_DIR/ctest.log"; exit 1; }
    # data parallelism on the GPU: 2 ranks against 1 process (one GPU: the ranks share it
    # and sum through the host; a GPU each: NCCL)
    echo "== data parallel on cuda: tests/mpi_check.sh with --device cuda"
    MPI_CHECK_DEVICE=cuda bash tests/mpi_check.sh "$BUILD_DIR/flowloop" "$(command -v mpirun)" "$BUILD_DIR/mpi_check_cuda"
    [ "${2:-}" = tests ] && exit 0
    figs="$BUILD_DIR/gpu-check"
    mkdir -p "$figs"
    echo "== bench field --device cuda: the field and its vjp against cuBLAS sgemm of the MLP's shape"
    for size in M G; do
      "$BUILD_DIR/flowloop" bench field --device cuda --size "$size" --time-cond --seconds 3 | tee "$figs/field_$size.json"
    done
    echo "== PyTorch + torchdiffeq on the same GPU (python3 with torch and torchdiffeq)"
    peer=(python3 experiments/peer_torch.py --flowloop "$BUILD_DIR/flowloop" --device cuda --threads "$JOBS"
      --rounds 1 --seconds 2)
    for what in bench solve train; do
      "${peer[@]}" "$what" --sizes M G | tee "$figs/$what.jsonl"
    done
    echo "== the table (docs/performance.md; the records are in $figs)"
    python3 experiments/gpu_table.py "$figs"
    ;;
  fuzz | sanitize)
    # One clang build (build-asan: -O1, ASan + UBSan everywhere, libFuzzer's coverage in the
    # library) serves both. `sanitize` (CI) runs the whole test suite under the sanitizers,
    # then fuzzes; `fuzz` builds the harnesses only and fuzzes. Each harness of tests/fuzz
    # first replays its regression inputs, then fuzzes SECONDS (default 60) from its seed
    # corpus, all four at once; a crash, leak or sanitizer report fails with the input kept
    # in build-asan/findings/.
    secs=${2:-60}
    dir=build-asan
    need_pkgs clang libclang-rt-14-dev libomp-14-dev
    # (a tree configured by another compiler, as build-asan was with GCC once, starts afresh)
    if [ -f "$dir/CMakeCache.txt" ] && ! grep -q "^CMAKE_CXX_COMPILER:.*clang" "$dir/CMakeCache.txt"; then
      rm -rf "$dir"
    fi
    if [ "$mode" = fuzz ]; then
      build_targets=(--target fuzz_safetensors fuzz_tokens fuzz_train_config fuzz_manifest fuzz_hf)
    fi
    CC=clang CXX=clang++ build_in "$dir" -DCMAKE_BUILD_TYPE=RelWithDebInfo \
      -DCMAKE_CXX_FLAGS_RELWITHDEBINFO="-O1 -g1 -DNDEBUG" -DFLOWLOOP_FUZZ=ON -DFLOWLOOP_CUDA=OFF
    if [ "$mode" = sanitize ]; then
      echo "== the tests under AddressSanitizer + UndefinedBehaviorSanitizer"
      (cd "$dir" && ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
        ctest --output-on-failure -j "$JOBS")
      echo "== the input parsers under libFuzzer, $secs s each"
    fi
    mkdir -p "$dir/findings"
    fuzz_one() {
      local name=$1 bin="$dir/tests/fuzz/fuzz_$1" corpus="$dir/corpus/$1"
      mkdir -p "$corpus"  # what the fuzzer adds; the committed seeds stay as they are
      local kept
      mapfile -t kept < <(find "tests/fuzz/regressions/$name" -type f ! -name README | sort)
      if ((${#kept[@]})); then
        "$bin" "${kept[@]}" >"$dir/$name.log" 2>&1 ||
          { echo "fuzz $name: a regression input fails again" >&2; tail -30 "$dir/$name.log" >&2; return 1; }
      fi
      "$bin" "$corpus" tests/fuzz/corpus/"$name" -max_total_time="$secs" -max_len=65536 -rss_limit_mb=2048 \
        -timeout=10 -print_final_stats=1 -artifact_prefix="$dir/findings/$name-" >"$dir/$name.log" 2>&1 ||
        { echo "fuzz $name: a finding ($dir/findings/)" >&2; tail -40 "$dir/$name.log" >&2; return 1; }
      echo "fuzz $name: $(grep -m1 -o 'stat::number_of_executed_units: *[0-9]*' "$dir/$name.log" |
        grep -o '[0-9]*$') runs in $secs s, corpus $(ls "$corpus" | wc -l) inputs, no finding"
    }
    rc=0
    pids=()
    for name in safetensors tokens train_config manifest hf; do fuzz_one "$name" & pids+=($!); done
    for p in "${pids[@]}"; do wait "$p" || rc=1; done
    exit $rc
    ;;
  scaling)
    # data-parallel training on this machine: tokens/s of 1 process (2 threads) against
    # 2 MPI ranks (1 thread each), the allreduce's share of a step, and the gradient bytes
    build
    export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
    out="$BUILD_DIR/scaling"
    rm -rf "$out"
    common=(--task phop --task-n 16 --hops 4 --batch 64 --steps "${2:-60}" --eval-every 100000
      --checkpoint-every 100000 --eval-batches 1 --seed 0 --device cpu)
    for spec in "loop:--loops 4" "ode:--solver dopri5 --rtol 1e-3 --atol 1e-4 --t1 4"; do
      name=${spec%%:*}
      # shellcheck disable=SC2086
      OMP_NUM_THREADS=2 "$BUILD_DIR/flowloop" train "${common[@]}" ${spec#*:} --out "$out/${name}_np1" >/dev/null
      # shellcheck disable=SC2086
      mpirun -np 2 --oversubscribe --bind-to none -x OMP_NUM_THREADS=1 "$BUILD_DIR/flowloop" train "${common[@]}" \
        ${spec#*:} --out "$out/${name}_np2" >/dev/null
    done
    python3 experiments/scaling_table.py "$out"
    ;;
  peer)
    build
    need_pkgs python3 python3-torch python3-numpy python3-scipy python3-pip
    /usr/bin/python3 -c "import torchdiffeq" 2>/dev/null || \
      /usr/bin/python3 -m pip install -q --break-system-packages --no-deps torchdiffeq==0.2.5
    /usr/bin/python3 experiments/peer_torch.py check --flowloop "$BUILD_DIR/flowloop"
    /usr/bin/python3 experiments/peer_torch.py bench --flowloop "$BUILD_DIR/flowloop" "${@:2}"
    /usr/bin/python3 experiments/peer_torch.py solve --flowloop "$BUILD_DIR/flowloop" "${@:2}"
    /usr/bin/python3 experiments/peer_torch.py train --flowloop "$BUILD_DIR/flowloop" --sizes S M "${@:2}"
    /usr/bin/python3 experiments/peer_torch.py loops --flowloop "$BUILD_DIR/flowloop" --sizes S "${@:2}"
    /usr/bin/python3 experiments/peer_torch.py wp --flowloop "$BUILD_DIR/flowloop" --sizes S M "${@:2}"
    ;;
  figures)
    build
    need_pkgs python3 python3-numpy python3-matplotlib python3-nbformat python3-nbconvert python3-ipykernel
    (($# > 1)) || set -- figures --demo 300
    FLOWLOOP="$BUILD_DIR/flowloop" notebooks/run_notebooks.sh --out "$BUILD_DIR/notebooks" "${@:2}"
    ;;
  *)
    echo "usage: ./run.sh [main|study|studies|flowmatch|test|tour|peer|reproduce|figures|gpu-check|fuzz|scaling]" >&2
    exit 2
    ;;
esac

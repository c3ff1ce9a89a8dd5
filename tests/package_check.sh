#!/usr/bin/env bash
# The installed CMake package: `cmake --install` into a fresh prefix, then
# experiments/consumer configured against it alone (find_package(flowloop REQUIRED)) and
# built twice, on the shared and on the static library; both programs must run and print
# the same result. The exported targets must not carry -march=native or a path of the
# source or build tree. The README's C++ example (experiments/consumer/lorenz.cpp) builds
# and runs against the same install.
# Usage: package_check.sh BUILD_DIR SOURCE_DIR WORK_DIR
set -euo pipefail
build=$1 src=$2 work=$3
rm -rf "$work"
mkdir -p "$work"
prefix="$work/prefix"
cmake --install "$build" --prefix "$prefix" >/dev/null
for f in include/flowloop/flowloop.hpp lib/libflowloop.a lib/libflowloop.so bin/flowloop \
  lib/cmake/flowloop/flowloopConfig.cmake lib/cmake/flowloop/flowloopConfigVersion.cmake; do
  [ -e "$prefix/$f" ] || { echo "package_check: the install lacks $f" >&2; exit 1; }
done
targets=$(cat "$prefix"/lib/cmake/flowloop/flowloopTargets*.cmake)
if grep -q -- '-march' <<<"$targets"; then
  echo "package_check: -march leaks through the exported targets" >&2; exit 1
fi
for p in "$src" "$build"; do
  if grep -qF "$(realpath "$p")" <<<"$targets"; then
    echo "package_check: the exported targets name $(realpath "$p")" >&2; exit 1
  fi
done
cmake -S "$src/experiments/consumer" -B "$work/consumer" -DCMAKE_BUILD_TYPE=Release \
  -DCMAKE_PREFIX_PATH="$prefix" >/dev/null
cmake --build "$work/consumer" -j 2 >/dev/null
shared=$("$work/consumer/consumer_shared" "$work/model_shared.safetensors")
static=$("$work/consumer/consumer_static" "$work/model_static.safetensors")
echo "shared: $shared"
echo "static: $static"
[ "$shared" = "$static" ] || { echo "package_check: the shared and static builds disagree" >&2; exit 1; }
cmp "$work/model_shared.safetensors" "$work/model_static.safetensors"
# the README's C++ example: a Lorenz system on a user's tableau and controller (rtol =
# atol = 1e-6), against y(1) = (-9.3785700109, -8.3570337884, 29.3623253374) from classical
# RK4 with 40,000 steps (unchanged to 1e-13 from 20,000)
lorenz=$("$work/consumer/lorenz")
echo "lorenz: $lorenz"
grep -q '^success: ' <<<"$lorenz" || { echo "package_check: the Lorenz example failed" >&2; exit 1; }
sed -E 's/.*\(([^,]+), ([^,]+), ([^)]+)\).*/\1 \2 \3/' <<<"$lorenz" | awk '{
  split("-9.3785700109 -8.3570337884 29.3623253374", r, " ");
  for (i = 1; i <= 3; ++i) if (!($i - r[i] < 1e-4 && r[i] - $i < 1e-4)) { print "package_check: the Lorenz example'"'"'s y(1)[" i-1 "] = " $i ", expected " r[i] " within 1e-4" > "/dev/stderr"; exit 1 } }'
# the installed command reads what the consumer wrote
echo '{"tokens": [[1, 2, 3]]}' > "$work/tokens.json"
"$prefix/bin/flowloop" forward -m "$work/model_shared.safetensors" --tokens "$work/tokens.json" --device cpu \
  --solver dopri5 -o "$work/forward.json" >/dev/null
grep -q '"logits"' "$work/forward.json"
echo "package_check: ok"

#!/usr/bin/env bash
# A/B of decode-step variants on the device machine (one H100/H200), from the repository
# root, with the binaries of scripts/device_build.sh in .dev/:
#
#   scripts/device_ab.sh PREFIX SHAPES BATCHES CONTEXTS RUNS VARIANT...
#
#   VARIANT  name, or name:ENV=VALUE[,ENV=VALUE...] (environment switches, e.g.
#            nosplit:KAIROS_CUDA_GEMV_SPLIT=0; "def" for the defaults)
# Every variant runs `kairos bench decode --shapes SHAPES --batches BATCHES --contexts
# CONTEXTS --steps ${STEPS:-30} --no-prefill` RUNS times, alternated (run 1 of every
# variant, then run 2, ...), into $OUT/PREFIX_<card>_<name>_r<run>.json (card: h100 or h200);
# then tools/ab_table.py prints the graph-only ms per step side by side. Variants compare
# only within one call: machines differ by a few percent for the same binary.
set -uo pipefail
cd "$(dirname "$0")/.."
[ $# -ge 6 ] || { sed -n 2,13p "$0"; exit 2; }
prefix=$1 shapes=$2 batches=$3 contexts=$4 runs=$5; shift 5
source scripts/device_env.sh
out=${OUT:-bench/out} logs=/tmp/ab_logs  # the JSON comes back, the logs stay (fewer files)
mkdir -p "$out" "$logs"
names=()
for v in "$@"; do names+=("${v%%:*}"); done
failed=0
for r in $(seq 1 "$runs"); do
  for v in "$@"; do
    name=${v%%:*} envs=()
    [ "$name" != "$v" ] && IFS=, read -r -a envs <<<"${v#*:}"
    f="${prefix}_${card}_${name}_r$r"
    if ! env ${envs[@]+"${envs[@]}"} timeout "${LIMIT:-300}" "$bin/kairos" bench decode --shapes "$shapes" --batches "$batches" \
      --contexts "$contexts" --steps "${STEPS:-30}" --no-prefill --out "$out/$f.json" >"$logs/$f.log" 2>&1; then
      echo "variant $name run $r failed:"; tail -5 "$logs/$f.log"; failed=$((failed + 1))
    fi
  done
done
python3 tools/ab_table.py "$out" "${prefix}_${card}" "${names[@]}"
exit $failed

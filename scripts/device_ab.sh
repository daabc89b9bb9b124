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
# variant, then run 2, ...). Two files go to $OUT (a device call returns at most 8), both
# refreshed after every run: PREFIX_<card>.json, the runs merged as {"<name>_r<run>": run}
# (card: h100 or h200), and PREFIX_<card>.md, tools/ab_table.py's graph-only ms per step side
# by side. The single runs and their logs stay in /tmp/ab. Variants compare only within one
# call: machines differ by a few percent for the same binary.
set -uo pipefail
cd "$(dirname "$0")/.."
[ $# -ge 6 ] || { sed -n 2,13p "$0"; exit 2; }
prefix=$1 shapes=$2 batches=$3 contexts=$4 runs=$5; shift 5
source scripts/device_env.sh
out=${OUT:-bench/out} work=/tmp/ab/$prefix  # the merged JSON and the table come back, the rest stays
rm -rf "$work" && mkdir -p "$out" "$work"
names=()
for v in "$@"; do names+=("${v%%:*}"); done
merged="$out/${prefix}_${card}.json"
merge() {  # the runs so far into one file, and its table
  python3 tools/merge_runs.py "$work" '*_r*.json' "$merged"
  python3 tools/ab_table.py "$merged" "${names[@]}" > "${merged%.json}.md"
}
failed=0
for r in $(seq 1 "$runs"); do
  for v in "$@"; do
    name=${v%%:*} envs=()
    [ "$name" != "$v" ] && IFS=, read -r -a envs <<<"${v#*:}"
    f="${name}_r$r"
    if ! env ${envs[@]+"${envs[@]}"} timeout "${LIMIT:-300}" "$bin/kairos" bench decode --shapes "$shapes" --batches "$batches" \
      --contexts "$contexts" --steps "${STEPS:-30}" --no-prefill --out "$work/$f.json" >"$work/$f.log" 2>&1; then
      echo "variant $name run $r failed:"; tail -5 "$work/$f.log"; failed=$((failed + 1))
    fi
    merge
  done
done
cat "${merged%.json}.md"
exit $failed

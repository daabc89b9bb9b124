#!/usr/bin/env bash
# Where a batch-1 decode step's time goes inside the CUDA graph, by ablation: for each kernel the
# step launches, the step time with that kernel skipped (KAIROS_CUDA_SKIP; the results are then
# wrong, only the time counts). The marginal cost (base - skipped) includes what PDL overlaps, which
# a serialising profiler misses. Run on the GPU machine:
#   scripts/ablate_decode.sh KAIROS_BINARY OUT_DIR [shapes...]
# It writes two files into OUT_DIR, as each shape finishes (a device call returns only a few
# files): ablation.json, every run merged (tools/merge_runs.py: {"abl_<shape>_<label>": run}), and
# ablation.md, tools/ablation_table.py's table of it. The runs and their logs stay in
# ${ABL_WORK:-/tmp/ablate}. Skipping changes values downstream (stale activations, other experts
# picked), so treat marginals under ~2% of the step as noise.
set -u
K=${1:?kairos binary}; O=${2:?output dir}; shift 2
shapes=${*:-qwen3-30b-a3b gpt-oss-20b smollm2-135m}
W=${ABL_WORK:-/tmp/ablate}
mkdir -p "$O" "$W"
here=$(cd "$(dirname "$0")/.." && pwd)
one() {  # $1 shape $2 label, rest env
  local sh=$1 l=$2; shift 2
  env "$@" timeout 150 "$K" bench decode --shapes "$sh" --batches 1 --contexts 128,2048 --steps 50 --no-prefill \
    --out "$W/abl_${sh}_${l}.json" > "$W/abl_${sh}_${l}.log" 2>&1 || echo "$sh $l: failed (see $W/abl_${sh}_${l}.log)"
}
merge() {  # the runs so far into OUT_DIR
  python3 "$here/tools/merge_runs.py" "$W" 'abl_*.json' "$O/ablation.json"
  python3 "$here/tools/ablation_table.py" "$O/ablation.json" > "$O/ablation.md"
}
for sh in $shapes; do
  # the kernel names a step launches (weight initialisation's fill kernels too: they serve as a noise check)
  KAIROS_CUDA_LAUNCH_LOG=1 timeout 300 "$K" bench decode --shapes "$sh" --batches 1 --contexts 128 --steps 5 --no-prefill \
    > "$W/names_$sh.log" 2>&1
  grep -o 'launch of kernel [A-Za-z0-9_]*' "$W/names_$sh.log" | sed 's/.* //' | sort -u > "$W/names_$sh.txt"
  one "$sh" base
  while read -r n; do one "$sh" "skip_$n" KAIROS_CUDA_SKIP="$n"; merge; done < "$W/names_$sh.txt"
  # two groups: every kernel that streams weights (GEMVs, expert kernels), and every other one.
  # The step without the first is the chain's latency floor; without the second, the weight
  # streams alone. Their sum against the base says how much of the two overlaps.
  wk=$(grep -E 'gemv|gate_up|mxfp4' "$W/names_$sh.txt" | paste -sd, -)
  rk=$(grep -vE 'gemv|gate_up|mxfp4' "$W/names_$sh.txt" | paste -sd, -)
  [ -n "$wk" ] && one "$sh" "skip_GROUP:weight-kernels" KAIROS_CUDA_SKIP="$wk"
  [ -n "$rk" ] && one "$sh" "skip_GROUP:all-other-kernels" KAIROS_CUDA_SKIP="$rk"
  merge
done

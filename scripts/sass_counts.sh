#!/usr/bin/env bash
# Instruction counts of kernels' SASS for sm_90, compiled here (no GPU) by the nvcc of
# scripts/fetch_nvcc.sh, with and without compile-time defines: a static check of what a
# kernel change does to the instructions per weight before a device call times it.
#
#   scripts/sass_counts.sh MODULE "FUNCTION..." [DEFINES...]
#     MODULE    a kernels/*.cu module name (e.g. moe_q8), compiled after kernels/common.cuh as
#               NVRTC compiles it
#     FUNCTION  extern "C" kernel names, space-separated
#     DEFINES   variants: "" for the defaults, or comma-separated defines (E2M1_PN,PDL_LATE)
# Prints, per function and variant, the static instruction count and the PRMT, IDP (dp4a),
# LOP3, SHF, IMAD, FFMA, LDG and BAR counts. Static counts, not executed ones: a loop body
# counts once per unrolled copy.
set -euo pipefail
cd "$(dirname "$0")/.."
[ $# -ge 2 ] || { sed -n 2,13p "$0"; exit 2; }
module=$1 funcs=$2; shift 2
variants=("$@"); [ ${#variants[@]} -gt 0 ] || variants=("")
N=$(scripts/fetch_nvcc.sh)
export PATH=$N/bin:$PATH
work=$(mktemp -d); trap 'rm -rf "$work"' EXIT
printf '#include "kernels/common.cuh"\n#include "kernels/%s.cu"\n' "$module" > "$work/m.cu"
printf '| function | defines | instructions | PRMT | IDP | LOP3 | SHF | IMAD | FFMA | LDG | BAR |\n'
printf '| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |\n'
for v in "${variants[@]}"; do
  defs=()
  IFS=, read -r -a names <<<"$v"
  for d in ${names[@]+"${names[@]}"}; do defs+=("-D$d"); done
  nvcc -O3 -arch=sm_90 -I"$N/include" -I. ${defs[@]+"${defs[@]}"} -cubin -o "$work/m.cubin" "$work/m.cu"
  cuobjdump -sass "$work/m.cubin" > "$work/m.sass"
  for f in $funcs; do
    awk -v f="$f" '/Function :/ { p = ($3 == f) } p' "$work/m.sass" > "$work/f.sass"
    [ -s "$work/f.sass" ] || { echo "no function $f in $module" >&2; exit 1; }
    c() { grep -cE "^\s+/\*[0-9a-f]{4}\*/\s+(@!?U?P[0-9T] )?$1[ .;]" "$work/f.sass" || true; }
    printf '| %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s |\n' "$f" "${v:-(defaults)}" \
      "$(grep -cE '^\s+/\*[0-9a-f]{4}\*/' "$work/f.sass")" "$(c PRMT)" "$(c IDP)" "$(c LOP3)" "$(c SHF)" \
      "$(c IMAD)" "$(c FFMA)" "$(c LDG)" "$(c BAR)"
  done
done

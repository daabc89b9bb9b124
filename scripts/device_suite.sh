#!/usr/bin/env bash
# Runs on the device machine (one H100/H200; see the device tool's README), from
# the repository root, with the binaries of scripts/device_build.sh in .dev/:
#
#   scripts/device_suite.sh STEP...      (default: tests)
#
#   tests    every GPU test (.dev/cuda, one binary) -> $OUT/tests.log
#   decode   kairos bench decode, random weights: Qwen3-30B-A3B, gpt-oss-20b and
#            SmolLM2 shapes at batch 1/4/16/64, context 128/2048 -> $OUT/decode.{json,log}
#   peer     the torch CUDA-graph peer (.dev/torch_decode_peer.py) in the same call -> $OUT/peer.log
#   smollm2  decode bench on the real SmolLM2 (KAIROS_TEST_MODEL) at batch 1/32,
#            dense and upcycled to 8 experts top-2 (MXFP4 experts) -> $OUT/smollm2.{json,log}
#   dflash   DFlash on SmolLM2, dense and upcycled MoE target (32 prompts per set, batch 1/8/32 as
#            issue 6 asks), with the drafter in
#            $KAIROS_DRAFT (tools/train_dflash.py; tools/TRAIN_DFLASH.md) -> $OUT/dflash*.json
#   dflash_gemv  the dense DFlash run with KAIROS_CUDA_CUBLAS=0: verify steps of 9+
#            rows on the GEMVs instead of cuBLAS (an A/B for the verify cost) -> $OUT/dflash_gemv.json
#   pipeline the embedded demo pipeline (configs/demo.toml) on cuda:0 with SmolLM2:
#            200 generated events at 20/s -> $OUT/pipeline.{log,jsonl}, the verdict and
#            fallback counts at the end of the log
#
# The SmolLM2 GGUF is 98 MB (over one call's 64 MiB): send it in the parts that
# scripts/device_build.sh cuts (.dev/g1..g3) over consecutive calls into /tmp and set
# KAIROS_TEST_MODEL to the joined file (md5 a1231443440b107ff29f02bdb38c9d0a).
# Every step writes its log and results under ${SUITE_WORK:-/tmp/suite}; at the end they are
# packed into $OUT/suite.tar.gz (OUT default bench/out), next to a copy of suite.log, because a
# device call returns at most 8 files from $OUT (`tar xzf suite.tar.gz` unpacks them here). The
# exit status is the number of failed steps.
set -uo pipefail
cd "$(dirname "$0")/.."
source scripts/device_env.sh
dest=${OUT:-bench/out} out=${SUITE_WORK:-/tmp/suite}
mkdir -p "$dest" "$out"
pack() { tar czf "$dest/suite.tar.gz" -C "$out" . && cp "$out/suite.log" "$dest/suite.log"; }
trap pack EXIT
model=${KAIROS_TEST_MODEL:-}
failed=0
run() { # name, command...: runs, logs, counts a failure
  local name=$1; shift
  echo "== $name: $*" | tee -a "$out/suite.log"
  local t0=$SECONDS
  "$@" >"$out/$name.log" 2>&1
  local rc=$?
  echo "== $name: exit $rc in $((SECONDS - t0)) s" | tee -a "$out/suite.log"
  tail -n 40 "$out/$name.log"
  [ $rc -eq 0 ] || failed=$((failed + 1))
}
need_model() {
  [ -n "$model" ] && [ -s "$model" ] && return 0
  echo "== $1: skipped, KAIROS_TEST_MODEL is not a file" | tee -a "$out/suite.log"
  return 1
}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/suite.log"
for step in "${@:-tests}"; do
  case $step in
    tests) run tests $bin/cuda --test-threads=1 --nocapture ;;
    decode)
      run decode $bin/kairos bench decode --shapes qwen3-30b-a3b,gpt-oss-20b,smollm2-135m \
        --batches 1,4,16,64 --contexts 128,2048 --steps 50 --out "$out/decode.json" ;;
    peer) run peer env PYTHONUNBUFFERED=1 python3 .dev/torch_decode_peer.py ;;
    smollm2)
      need_model smollm2 || continue
      run smollm2 $bin/kairos bench decode --shapes '' --model "$model" --batches 1,32 --contexts 128 \
        --steps 100 --out "$out/smollm2.json"
      run smollm2_moe $bin/kairos bench decode --shapes '' --model "$model" --upcycle 8,2 --batches 1,32 \
        --contexts 128 --steps 100 --out "$out/smollm2_moe.json" ;;
    dflash)
      need_model dflash || continue
      draft=${KAIROS_DRAFT:-models/dflash_smollm2}
      [ -s "$draft/model.safetensors" ] || { echo "== dflash: skipped, no drafter in $draft" | tee -a "$out/suite.log"; continue; }
      for target in dense moe; do
        extra=(); [ $target = moe ] && extra=(--upcycle 8,2)
        run "dflash_$target" $bin/kairos bench dflash --device cuda:0 --model "$model" --draft "$draft" "${extra[@]}" \
          --configs configs/fraud.toml=fraud,configs/trading.toml --verdicts 32 --chats 32 --batches 1,8,32 \
          --max-new-tokens 64 --block-size 16 --out "$out/dflash_$target.json"
      done ;;
    dflash_gemv)
      need_model dflash_gemv || continue
      draft=${KAIROS_DRAFT:-models/dflash_smollm2}
      [ -s "$draft/model.safetensors" ] || { echo "== dflash_gemv: skipped, no drafter in $draft" | tee -a "$out/suite.log"; continue; }
      run dflash_gemv env KAIROS_CUDA_CUBLAS=0 $bin/kairos bench dflash --device cuda:0 --model "$model" --draft "$draft" \
        --configs configs/fraud.toml=fraud,configs/trading.toml --verdicts 16 --chats 16 --batches 1,8 \
        --max-new-tokens 64 --block-size 16 --out "$out/dflash_gemv.json" ;;
    pipeline)
      need_model pipeline || continue
      sed -e "s|^path = .*|path = \"$model\"|" -e 's|^device = .*|device = "cuda:0"|' -e '/^fetch_pip/d' \
        -e 's|^rate = .*|rate = 20.0|' -e 's|^count = .*|count = 200|' configs/demo.toml >/tmp/pipeline_gpu.toml
      run pipeline sh -c "$bin/kairos run --config /tmp/pipeline_gpu.toml >$out/pipeline.jsonl"
      echo "verdicts: $(wc -l <"$out/pipeline.jsonl"), fallbacks: $(grep -c '"kairos-fallback":"true"' "$out/pipeline.jsonl" || true)" \
        | tee -a "$out/suite.log" ;;
    *) echo "unknown step $step (tests, decode, peer, smollm2, dflash, dflash_gemv, pipeline)" >&2; failed=$((failed + 1)) ;;
  esac
done
exit $failed

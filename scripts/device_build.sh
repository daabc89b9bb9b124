#!/usr/bin/env bash
# Builds, here and without CUDA (cudarc loads the driver at run time, NVRTC
# compiles kernels/*.cu on the device), everything a GPU session runs:
#   .dev/kairos.xz  the binary with --features cuda (generate/bench/eval --device cuda:K)
#   .dev/cuda.xz    every GPU test in one binary (tests/cuda/)
#   .dev/torch_decode_peer.py  the same-GPU peer, when ../shared/peers has it
# Both stripped and xz-compressed (~7 MB together, so half of the 98 MB SmolLM2
# GGUF still fits one call's 64 MiB). Send them with the device tool's
# `carry: [".dev"]` and run
# scripts/device_suite.sh there. .dev/ is git-ignored.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .dev
cargo build --release --features cuda --bin kairos
exe=$(cargo test --release --features cuda --test cuda --no-run --message-format=json 2>/dev/null \
  | python3 -c 'import json,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == "cuda":
        print(m["executable"])')
[ -n "$exe" ] || { echo "device_build: no cuda test binary was built" >&2; exit 1; }
for pair in "target/release/kairos kairos" "$exe cuda"; do
  set -- $pair
  strip -o ".dev/$2" "$1"
  xz -T0 -6 -f ".dev/$2"
done
# the same-GPU peer of DEVELOPERS.md (../shared does not travel to the device)
if [ -f ../shared/peers/torch_decode_peer.py ]; then cp ../shared/peers/torch_decode_peer.py .dev/; fi
ls -la .dev/

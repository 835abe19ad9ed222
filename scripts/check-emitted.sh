#!/usr/bin/env bash
# Emits every fixture model with upmix (load -> emit, no passes), loads each emitted
# directory in transformers and records the result, with the sha256 of the files that
# transformers loaded, in tests/golden/emitted/<name>.json. tests/roundtrip.rs checks
# that upmix still writes exactly those bytes.
#
# Usage: scripts/setup-fixture-env.sh && scripts/check-emitted.sh
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${UPMIX_FIXTURE_VENV:-.venv-fixtures}"
cargo build --quiet --bin upmix
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
for name in llama llama_tied qwen2 mixtral mixtral_fused; do
  cat > "$work/$name.ron" <<RON
Pipeline(
    models: { "$name": Hf("$PWD/tests/golden/models/$name") },
    emit: [ Hf(model: "$name", dir: "$work/out/$name") ],
)
RON
  ./target/debug/upmix run "$work/$name.ron"
  HF_HUB_OFFLINE=1 "$venv/bin/python" scripts/make_fixtures.py check-emitted "$work/out/$name" "$name"
done

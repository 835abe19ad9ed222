#!/usr/bin/env bash
# Runs every pipeline in tests/golden/gguf_out/*.ron with the release upmix (each writes
# one GGUF file next to it), moves the file into a temporary directory, and records what
# independent software makes of it (scripts/make_gguf_goldens.py: its sha256, what gguf-py
# reads and dequantizes, llama.cpp's logits and greedy continuations, and for smollm2_q8_0
# transformers' logits) in tests/golden/gguf_out/<name>.json (and, for SmolLM2,
# <name>.last_logits.safetensors). No .gguf file is left in tests/golden/gguf_out.
# The smollm2 pipelines need ~/.cache/upmix/SmolLM2-135M-Instruct.Q4_1.gguf
# (scripts/fetch-models.sh) and are skipped without it.
#
# Usage: scripts/setup-fixture-env.sh && scripts/check-gguf.sh
# (UPMIX_SKIP_BUILD=1 uses the upmix binary already built.)
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${UPMIX_FIXTURE_VENV:-.venv-fixtures}"
if [ -z "${UPMIX_SKIP_BUILD:-}" ]; then
  cargo build --quiet --release --bin upmix
fi
upmix="${CARGO_TARGET_DIR:-target}/release/upmix"
# The smollm2 pipelines name this path literally (with ~).
smollm2="$HOME/.cache/upmix/SmolLM2-135M-Instruct.Q4_1.gguf"
dir=tests/golden/gguf_out
work="$(mktemp -d)"
written=""
cleanup() {
  [ -z "$written" ] || rm -f "$written"
  rm -rf "$work"
}
trap cleanup EXIT

skipped=()
for ron in "$dir"/*.ron; do
  name="$(basename "$ron" .ron)"
  if [[ "$name" == smollm2* ]] && [ ! -f "$smollm2" ]; then
    skipped+=("$name")
    continue
  fi
  file="$(sed -n 's/.*Gguf(model: *"[^"]*", *file: *"\([^"]*\)".*/\1/p' "$ron")"
  [ "$file" = "$name.gguf" ] || { echo "$ron: expected file \"$name.gguf\", found \"$file\"" >&2; exit 1; }
  written="$dir/$file"
  "$upmix" run "$ron" --overwrite
  mv "$written" "$work/$file"
  written=""
  HF_HUB_OFFLINE=1 "$venv/bin/python" scripts/make_gguf_goldens.py "$work/$file" "$name"
  rm -f "$work/$file"
done
if [ "${#skipped[@]}" -gt 0 ]; then
  echo "skipped (no $smollm2): ${skipped[*]}"
fi

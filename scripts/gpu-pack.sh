#!/usr/bin/env bash
# First half of the GPU check, run here (Rust toolchain, network): builds the numeric
# golden tests and the forward benchmark with `--features cuda,wgpu` in release mode,
# strips them and packs them into DIR (default gpu-pack/, git-ignored), with the SmolLM2
# GGUF when it fits the budget. scripts/gpu-run.sh runs the pack on a GPU machine that has
# neither a Rust toolchain nor a network; the fixtures travel with the working tree.
#
# Usage: scripts/gpu-pack.sh [DIR]     (UPMIX_PACK_BUDGET_MB, default 64)
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-gpu-pack}"
budget_mb="${UPMIX_PACK_BUDGET_MB:-64}"
tests=(golden merge upcycle upcycle_hidden)
flags=(--release --features cuda,wgpu)
cargo build "${flags[@]}" --example bench_forward
target_args=(); for t in "${tests[@]}"; do target_args+=(--test "$t"); done
# Cargo names each test executable in its JSON messages.
executables="$(cargo test "${flags[@]}" "${target_args[@]}" --no-run --message-format=json \
  | python3 -c 'import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and "test" in m["target"]["kind"]:
        print(m["target"]["name"], m["executable"])')"
staging="$(mktemp -d)"
trap 'rm -rf "$staging"' EXIT
while read -r name path; do strip -o "$staging/$name" "$path"; done <<< "$executables"
strip -o "$staging/bench_forward" "${CARGO_TARGET_DIR:-target}/release/examples/bench_forward"
rm -rf "$out" && mkdir -p "$out"
tar -C "$staging" -cf - . | xz -T0 -6 > "$out/bins.tar.xz"
cache="${UPMIX_MODEL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/upmix}"
model="${UPMIX_SMOLLM2_GGUF:-$cache/SmolLM2-135M-Instruct.Q4_1.gguf}"
used=$(du -m "$out/bins.tar.xz" | cut -f1)
if [ -f "$model" ] && [ $((used + $(du -m "$model" | cut -f1))) -le "$budget_mb" ]; then
  cp "$model" "$out/"
else
  echo "note: $(basename "$model") does not fit the ${budget_mb} MB budget; the benchmark runs on the tiny fixtures" >&2
fi
du -sh "$out"/*

#!/usr/bin/env bash
# For a machine with an NVIDIA GPU: builds with `cuda,wgpu`, runs the numeric golden
# suite on cuda:0 and on wgpu, and prints the forward benchmark (SmolLM2-135M prefill and
# decode tok/s) on each device.
#
# Usage: scripts/gpu-check.sh     (needs the NVIDIA driver; no CUDA toolkit)
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/fetch-models.sh
cargo build --release --features cuda,wgpu --example bench_forward
for device in cuda:0 wgpu; do
  echo "=== golden suite on $device ==="
  UPMIX_TEST_DEVICE=$device cargo test --release --features cuda,wgpu \
    --test golden --test merge --test upcycle --test upcycle_hidden --test smollm2
done
cache="${UPMIX_MODEL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/upmix}"
model="${UPMIX_SMOLLM2_GGUF:-$cache/SmolLM2-135M-Instruct.Q4_1.gguf}"
for device in cpu cuda:0 wgpu; do
  echo "=== forward benchmark on $device ==="
  ./target/release/examples/bench_forward "$model" --device "$device"
done

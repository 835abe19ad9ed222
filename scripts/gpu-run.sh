#!/usr/bin/env bash
# Second half of the GPU check, run on the GPU machine (NVIDIA driver; no Rust toolchain,
# no network) from the repository root, with the pack of scripts/gpu-pack.sh: runs the
# numeric goldens on cuda:0 and on wgpu, printing each golden's difference and each test
# binary's result, then the forward benchmark on cpu, cuda:0 and wgpu.
#
# Usage: scripts/gpu-run.sh [DIR]      (DIR: the pack, default gpu-pack/)
set -uo pipefail
cd "$(dirname "$0")/.."
pack="${1:-gpu-pack}"
bin="$(mktemp -d)"
trap 'rm -rf "$bin"' EXIT
tar -C "$bin" -xJf "$pack/bins.tar.xz"
export UPMIX_REPO_ROOT="$PWD"
status=0
for device in cuda:0 wgpu; do
  for t in golden merge upcycle upcycle_hidden; do
    echo "=== $t on $device ==="
    UPMIX_TEST_DEVICE=$device "$bin/$t" --nocapture --test-threads 1 > "$bin/log" 2>&1 || status=1
    grep -E "difference|max abs|test result|FAILED|panicked" "$bin/log"
  done
done
model="$(ls "$pack"/*.gguf 2>/dev/null | head -1)"
model="${model:-tests/golden/models/llama}"
for device in cpu cuda:0 wgpu; do
  echo "=== forward benchmark on $device: $model ==="
  "$bin/bench_forward" "$model" --device "$device" --decode-at 16,1000 || status=1
done
exit $status

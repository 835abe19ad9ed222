#!/usr/bin/env bash
# The whole test suite, as CI runs it:
#  1. fetch the real model (scripts/fetch-models.sh);
#  2. make sure a Vulkan driver exists for wgpu (Mesa's software one, lavapipe, on a
#     machine without a GPU; installed with apt when missing and running as root);
#  3. every test on the CPU, built with the wgpu feature;
#  4. the numeric golden suite again on wgpu (UPMIX_TEST_DEVICE=wgpu);
#  5. `cargo check --features cuda`, so the CUDA path keeps compiling without a GPU.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/fetch-models.sh

if ! ldconfig -p | grep -q 'libvulkan.so.1' || ! ls /usr/share/vulkan/icd.d/*.json >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "test: installing Mesa's software Vulkan for the wgpu tests"
    apt-get update -q >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q mesa-vulkan-drivers libvulkan1 >/dev/null
  else
    echo "test: no Vulkan driver found; install mesa-vulkan-drivers and libvulkan1" >&2
    exit 1
  fi
fi

# Mesa's Vulkan loader complains without a runtime directory.
export XDG_RUNTIME_DIR="${XDG_RUNTIME_DIR:-$(mktemp -d)}"

echo "=== tests on cpu ==="
cargo test --workspace --features wgpu
echo "=== golden suite on wgpu ==="
# Two SmolLM2 runtime checks (sparse vs dense experts, batched scoring against batched
# generation) compare upmix with itself and take many minutes on a software GPU: CPU only.
UPMIX_TEST_DEVICE=wgpu cargo test --features wgpu \
  --test golden --test merge --test upcycle --test upcycle_hidden --test smollm2 --test devices \
  --test attention_experts --test parallel_attention --test prune --test dtm --test train --test train_loop --test nexus \
  -- --skip upcycled_sparse_experts_equal_the_dense_reference \
  --skip teacher_forced_argmax_agrees_with_greedy_generation
echo "=== cargo check --features cuda ==="
cargo check --features cuda

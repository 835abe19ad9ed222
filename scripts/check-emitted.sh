#!/usr/bin/env bash
# Emits every fixture model with upmix (load -> emit, no passes), loads each emitted
# directory in transformers and records the result, with the sha256 of the files that
# transformers loaded, in tests/golden/emitted/<name>.json. tests/roundtrip.rs checks
# that upmix still writes exactly those bytes. Then upcycles two fixtures into a Mixtral
# MoE and, with a shared expert, a Qwen2-MoE, and records transformers' logits for each
# (tests/golden/emitted/upcycle_*.json, checked by tests/upcycle.rs), and BAM models
# through upmix's remote-code module (bam_*.json), a Mixtral with an added expert
# (add_expert_mixtral.json) and a Nexus MoE in upmix's layout and as Qwen2-MoE (nexus_*.json). Last, SmolLM2 as
# transformers 5 saves it goes through a Cast, and transformers checks what it needs of it.
#
# Usage: scripts/setup-fixture-env.sh && scripts/check-emitted.sh
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${UPMIX_FIXTURE_VENV:-.venv-fixtures}"
cargo build --quiet --bin upmix
upmix="${CARGO_TARGET_DIR:-target}/debug/upmix"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
for name in llama llama_tied qwen2 mixtral mixtral_fused mistral cohere cohere2; do
  cat > "$work/$name.ron" <<RON
Pipeline(
    models: { "$name": Hf("$PWD/tests/golden/models/$name") },
    emit: [ Hf(model: "$name", dir: "$work/out/$name") ],
)
RON
  "$upmix" run "$work/$name.ron"
  HF_HUB_OFFLINE=1 "$venv/bin/python" scripts/make_fixtures.py check-emitted "$work/out/$name" "$name"
done

# Two distinct Llamas upcycled into a Mixtral (the same pass settings as tests/upcycle.rs).
cat > "$work/upcycle.ron" <<RON
Pipeline(
    models: {
        "a": Hf("$PWD/tests/golden/models/llama"),
        "b": Hf("$PWD/tests/golden/models/llama_b"),
    },
    passes: [ Upcycle(into: "moe", experts: ["a", "b"], top_k: 1, router: Random(seed: 3, std: 0.5), base: "a") ],
    emit: [ Hf(model: "moe", dir: "$work/out/upcycle_mixtral") ],
)
RON
"$upmix" run "$work/upcycle.ron"
HF_HUB_OFFLINE=1 "$venv/bin/python" scripts/make_fixtures.py record-emitted "$work/out/upcycle_mixtral" upcycle_mixtral
# The same model with its experts in the fused layout.
sed -e 's/upcycle_mixtral")/upcycle_mixtral_fused", moe_layout: "fused")/' "$work/upcycle.ron" > "$work/upcycle_fused.ron"
"$upmix" run "$work/upcycle_fused.ron"
HF_HUB_OFFLINE=1 "$venv/bin/python" scripts/make_fixtures.py record-emitted "$work/out/upcycle_mixtral_fused" upcycle_mixtral_fused

# The same with a shared expert: a Qwen2-MoE checkpoint.
cat > "$work/upcycle_qwen2_moe.ron" <<RON
Pipeline(
    models: {
        "a": Hf("$PWD/tests/golden/models/llama"),
        "b": Hf("$PWD/tests/golden/models/llama_b"),
    },
    passes: [ Upcycle(into: "moe", experts: ["a", "b"], top_k: 1, router: Random(seed: 3, std: 0.5), shared_expert: "b") ],
    emit: [ Hf(model: "moe", dir: "$work/out/upcycle_qwen2_moe") ],
)
RON
"$upmix" run "$work/upcycle_qwen2_moe.ron"
HF_HUB_OFFLINE=1 "$venv/bin/python" scripts/make_fixtures.py record-emitted "$work/out/upcycle_qwen2_moe" upcycle_qwen2_moe

# BAM (llama, llama_b, llama_c): attention experts with a KV cache per expert and soft
# routing, and with shared K/V, top-2 attention routing and parallel blocks; FFN experts in
# both. transformers loads each through upmix's remote-code module, records its logits, and
# runs one training step (tests/attention_experts.rs checks them).
for variant in "bam_expert_kv:kv: Expert" "bam_shared_kv_parallel:kv: Shared, attention: TopK(2), parallel: Attention"; do
  name="${variant%%:*}"
  cat > "$work/$name.ron" <<RON
Pipeline(
    models: {
        "a": Hf("$PWD/tests/golden/models/llama"),
        "b": Hf("$PWD/tests/golden/models/llama_b"),
        "c": Hf("$PWD/tests/golden/models/llama_c"),
    },
    passes: [ Bam(into: "bam", experts: ["a", "b", "c"], top_k: 2, router: Random(seed: 4, std: 1.0), ${variant#*:}) ],
    emit: [ Hf(model: "bam", dir: "$work/out/$name") ],
)
RON
  "$upmix" run "$work/$name.ron"
  HF_HUB_OFFLINE=1 "$venv/bin/python" scripts/make_fixtures.py record-bam "$work/out/$name" "$name"
done

# The shared-KV BAM with top-2 routing of both mixtures is a JetMoE: written as
# JetMoeForCausalLM, transformers' own JetMoE records its logits.
cat > "$work/bam_jetmoe.ron" <<RON
Pipeline(
    models: {
        "a": Hf("$PWD/tests/golden/models/llama"),
        "b": Hf("$PWD/tests/golden/models/llama_b"),
        "c": Hf("$PWD/tests/golden/models/llama_c"),
    },
    passes: [ Bam(into: "bam", experts: ["a", "b", "c"], top_k: 2, router: Random(seed: 4, std: 1.0), attention: TopK(2), kv: Shared) ],
    emit: [ Hf(model: "bam", dir: "$work/out/bam_jetmoe", architecture: "JetMoeForCausalLM") ],
)
RON
"$upmix" run "$work/bam_jetmoe.ron"
HF_HUB_OFFLINE=1 "$venv/bin/python" scripts/make_fixtures.py record-emitted "$work/out/bam_jetmoe" bam_jetmoe

# A Mixtral read from disk gains a fifth expert from a dense branch of it
# (tests/golden/models/mixtral_branch, scripts/make_nexus_goldens.py), its router row the
# Mixtral's centroid on a new domain's text, and is written again as a Mixtral.
cat > "$work/add_expert_mixtral.ron" <<RON
Pipeline(
    models: {
        "mixtral": Hf("$PWD/tests/golden/models/mixtral"),
        "branch": Hf("$PWD/tests/golden/models/mixtral_branch"),
    },
    passes: [ AddExpert(into: "moe", model: "mixtral", expert: "branch", text: "$PWD/tests/golden/nexus/domain.txt") ],
    emit: [ Hf(model: "moe", dir: "$work/out/add_expert_mixtral") ],
)
RON
"$upmix" run "$work/add_expert_mixtral.ron"
HF_HUB_OFFLINE=1 "$venv/bin/python" scripts/make_fixtures.py record-emitted "$work/out/add_expert_mixtral" add_expert_mixtral

# A Nexus MoE (router projected from the domains' embeddings, the first model's FFN as a
# shared expert) in upmix's layout, run by its remote code, and as a plain Qwen2-MoE with
# the router rows written out.
cat > "$work/nexus.ron" <<RON
Pipeline(
    models: {
        "a": Hf("$PWD/tests/golden/models/llama"),
        "b": Hf("$PWD/tests/golden/models/llama_b"),
    },
    passes: [ Upcycle(into: "moe", experts: ["a", "b"], top_k: 1, shared_expert: "a",
                      router: Nexus(texts: { "a": "$PWD/tests/golden/nexus/code.txt", "b": "$PWD/tests/golden/nexus/domain.txt" }, width: 16)) ],
    emit: [
        Hf(model: "moe", dir: "$work/out/nexus_upmix"),
        Hf(model: "moe", dir: "$work/out/nexus_qwen2_moe", architecture: "Qwen2MoeForCausalLM"),
    ],
)
RON
"$upmix" run "$work/nexus.ron"
HF_HUB_OFFLINE=1 "$venv/bin/python" scripts/make_fixtures.py record-bam "$work/out/nexus_upmix" nexus_upmix
HF_HUB_OFFLINE=1 "$venv/bin/python" scripts/make_fixtures.py record-emitted "$work/out/nexus_qwen2_moe" nexus_qwen2_moe

# SmolLM2 as transformers 5 saves it (tests/golden/smollm2_hf plus the weights that
# scripts/fetch-models.sh converted), through a bf16 Cast: transformers checks that the
# output keeps every saved file, the token ids and the chat template.
cache="${UPMIX_MODEL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/upmix}"
mkdir -p "$work/smollm2"
for f in tests/golden/smollm2_hf/*; do
  [ "$(basename "$f")" = chat.json ] || ln -s "$PWD/$f" "$work/smollm2/"
done
ln -s "$cache/SmolLM2-135M-Instruct-f32/model.safetensors" "$work/smollm2/model.safetensors"
cat > "$work/smollm2.ron" <<RON
Pipeline(
    models: { "s": Hf("$work/smollm2") },
    passes: [ Cast(model: "s", dtype: "bf16") ],
    emit: [ Hf(model: "s", dir: "$work/out/smollm2") ],
)
RON
"$upmix" run "$work/smollm2.ron"
HF_HUB_OFFLINE=1 "$venv/bin/python" scripts/make_fixtures.py check-smollm2-hf "$work/out/smollm2"

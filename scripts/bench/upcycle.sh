#!/usr/bin/env bash
# Upcycling benchmark: upmix against mergekit-moe in one run, on the same job — four
# SmolLM2-135M-sized float32 checkpoints (the dequantized model plus three seeded
# perturbations) into one Mixtral-style MoE, random router, top-2, float32, fused expert
# layout (what mergekit-moe writes). Reports wall time and peak RSS (/usr/bin/time -v) of
# each tool, and `cp` of upmix's output directory as the bandwidth floor. Every tool runs
# twice on a warm page cache; the faster run counts. Every run ends with its output on
# disk (fsync), so all three pay for the same write-back.
#
# Needs: scripts/fetch-models.sh (the model and its gguf venv) and
# scripts/setup-fixture-env.sh (mergekit-moe). Work files go to $UPMIX_BENCH_DIR
# (default: the model cache), about 4.5 GB.
# Usage: scripts/bench/upcycle.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
root="$PWD"
cache="${UPMIX_MODEL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/upmix}"
venv="${UPMIX_FIXTURE_VENV:-$root/.venv-fixtures}"
work="${UPMIX_BENCH_DIR:-$cache/bench-upcycle}"
seed_model="$cache/SmolLM2-135M-Instruct-f32"
[ -d "$seed_model" ] || { echo "missing $seed_model: run scripts/fetch-models.sh" >&2; exit 1; }
[ -x "$venv/bin/mergekit-moe" ] || { echo "missing mergekit-moe in $venv: run scripts/setup-fixture-env.sh" >&2; exit 1; }
mkdir -p "$work"

# The experts: the model itself (linked, plus the tokenizer mergekit needs, written from
# the GGUF by transformers) and three perturbations (made once).
if [ ! -f "$work/m0/tokenizer.json" ]; then
  mkdir -p "$work/m0"
  ln -sf "$seed_model/config.json" "$seed_model/model.safetensors" "$work/m0/"
  "$venv/bin/python" -c 'import sys, transformers
t = transformers.AutoTokenizer.from_pretrained(sys.argv[1], gguf_file=sys.argv[2])
t.save_pretrained(sys.argv[3])' "$cache" "SmolLM2-135M-Instruct.Q4_1.gguf" "$work/m0" 2>/dev/null
fi
models=("$work/m0")
for i in 1 2 3; do
  if [ ! -d "$work/m$i" ]; then
    echo "making perturbed expert m$i"
    "$cache/gguf-venv/bin/python" scripts/bench/perturb.py "$work/m0" "$work/m$i" "$i"
  fi
  models+=("$work/m$i")
done

cat > "$work/upmix.ron" <<RON
(
    models: {
        "m0": Hf("${models[0]}"),
        "m1": Hf("${models[1]}"),
        "m2": Hf("${models[2]}"),
        "m3": Hf("${models[3]}"),
    },
    passes: [
        Upcycle(into: "moe", experts: ["m0", "m1", "m2", "m3"], top_k: 2, base: "m0",
                router: Random(seed: 0, std: 0.02)),
    ],
    emit: [Hf(model: "moe", dir: "out-upmix", moe_layout: "fused")],
)
RON
{
  echo "base_model: ${models[0]}"
  echo "gate_mode: random"
  echo "dtype: float32"
  echo "experts_per_token: 2"
  echo "experts:"
  for m in "${models[@]}"; do
    echo "  - source_model: $m"
    echo "    positive_prompts: [\"\"]"
  done
} > "$work/mergekit.yml"

cargo build --quiet --release
results="$work/results.txt"
: > "$results"
# Each tool writes a fresh directory (removed, and the disk synced, before each timed
# run) and its run ends when its files are on disk: upmix fsyncs what it writes; for
# mergekit-moe and cp, `sync` of the written files is part of the timed command.
measure() { # name, output dir, command...
  local name="$1" out="$2"; shift 2
  for run in 1 2; do
    rm -rf "$out"; sync; sleep 1
    /usr/bin/time -v -o "$work/time.txt" "$@" > "$work/$name.log" 2>&1 \
      || { cat "$work/$name.log" >&2; exit 1; }
    local wall rss
    wall=$(awk -F': ' '/Elapsed \(wall clock\)/ {n=split($2,t,":"); s=0; for(i=1;i<=n;i++) s=s*60+t[i]; print s}' "$work/time.txt")
    rss=$(awk -F': ' '/Maximum resident set size/ {print $2}' "$work/time.txt")
    echo "$name $run $wall $rss" >> "$results"
  done
}
measure upmix "$work/out-upmix" "${CARGO_TARGET_DIR:-$root/target}/release/upmix" run "$work/upmix.ron"
measure mergekit "$work/out-mergekit" bash -c "'$venv/bin/mergekit-moe' '$work/mergekit.yml' \
  '$work/out-mergekit' --quiet --i-understand-this-is-not-useful-without-training \
  && sync '$work/out-mergekit'/* '$work/out-mergekit'"
measure cp "$work/out-cp" bash -c "cp -r '$work/out-upmix' '$work/out-cp' && sync '$work/out-cp'/* '$work/out-cp'"
du -sb "$work/out-upmix" "$work/out-mergekit" | sed 's/^/output bytes: /'

python3 - "$results" <<'PY'
import sys
best = {}
for line in open(sys.argv[1]):
    name, _, wall, rss = line.split()
    w, r = float(wall), int(rss)
    if name not in best or w < best[name][0]:
        best[name] = (w, r)
print(f"{'tool':<9} {'wall s':>8} {'peak RSS MB':>12}")
for name, (w, r) in best.items():
    print(f"{name:<9} {w:>8.2f} {r / 1024:>12.0f}")
u, m, c = best["upmix"], best["mergekit"], best["cp"]
print(f"upmix vs mergekit-moe: {m[0] / u[0]:.1f}x faster, peak RSS {u[1] / m[1]:.3f} of it")
print(f"upmix vs cp: {u[0] / c[0]:.2f}x cp's time")
PY

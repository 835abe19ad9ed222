#!/usr/bin/env bash
# Runtime benchmark, dense against MoE, upmix against transformers, in one run: the dense
# SmolLM2-135M (float32) and the 4-expert top-2 Mixtral upcycled from it and three
# perturbations of it (the job of scripts/bench/upcycle.sh, made here with upmix), each
# run by upmix (cpu) and by transformers (LlamaForCausalLM / MixtralForCausalLM, float32,
# its default sdpa attention), at 1 and 2 threads. Measured: prefill of 256 tokens,
# prefill of a batch of 8 such prompts, greedy decode tok/s after prompts of 100 and 1000
# tokens (128 steps each), peak RSS. Prints the table and the ratios the targets name.
#
# Needs: scripts/fetch-models.sh, scripts/setup-fixture-env.sh, and the experts of
# scripts/bench/upcycle.sh (made by its first run).
# Usage: scripts/bench/moe.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
cache="${UPMIX_MODEL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/upmix}"
venv="${UPMIX_FIXTURE_VENV:-$PWD/.venv-fixtures}"
work="${UPMIX_BENCH_DIR:-$cache/bench-upcycle}"
dense="$cache/SmolLM2-135M-Instruct-f32"
moe="$work/moe-bench"
[ -d "$dense" ] || { echo "missing $dense: run scripts/fetch-models.sh" >&2; exit 1; }
[ -d "$work/m3" ] || { echo "missing the experts in $work: run scripts/bench/upcycle.sh once" >&2; exit 1; }
target="${CARGO_TARGET_DIR:-target}"
cargo build --quiet --release --bin upmix --example bench_forward

if [ ! -f "$moe/model.safetensors" ]; then
  cat > "$work/moe-bench.ron" <<RON
(
    models: { "m0": Hf("$work/m0"), "m1": Hf("$work/m1"), "m2": Hf("$work/m2"), "m3": Hf("$work/m3") },
    passes: [
        Upcycle(into: "moe", experts: ["m0", "m1", "m2", "m3"], top_k: 2, base: "m0",
                router: Random(seed: 0, std: 0.02)),
    ],
    emit: [Hf(model: "moe", dir: "$moe")],
)
RON
  "$target/release/upmix" run "$work/moe-bench.ron"
fi

results="$(mktemp)"
trap 'rm -f "$results"' EXIT
opts=(--prompt-tokens 256 --batch 8 --decode-tokens 128 --decode-at 100,1000)
for threads in 1 2; do
  for model in dense moe; do
    dir="$dense"; [ "$model" = moe ] && dir="$moe"
    echo "running $model at $threads thread(s)" >&2
    RAYON_NUM_THREADS=$threads "$target/release/examples/bench_forward" "$dir" "${opts[@]}" \
      | sed "s/^{/{\"model\": \"$model\", /" >> "$results"
    OMP_NUM_THREADS=$threads "$venv/bin/python" scripts/bench/forward_torch.py "$dir" \
      --threads "$threads" "${opts[@]}" 2>/dev/null \
      | sed "s/^{/{\"model\": \"$model\", /" >> "$results"
  done
done
python3 - "$results" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
def get(tool, model, threads):
    return next(r for r in rows if (r["tool"], r["model"], r["threads"]) == (tool, model, threads))
print(f"{'tool':<8} {'model':<6} {'thr':>3} {'prefill':>8} {'batch8':>8} {'dec@100':>8} {'dec@1000':>9} {'RSS MB':>7}")
for r in rows:
    d = r["decode_tok_s"]
    print(f"{r['tool']:<8} {r['model']:<6} {r['threads']:>3} {r['prefill_tok_s']:>8.1f} "
          f"{r['batch_prefill_tok_s']:>8.1f} {d['100']:>8.1f} {d['1000']:>9.1f} {r['peak_rss_mb']:>7.0f}")
print("(tok/s; prefill 256 tokens, batch 8 x 256, decode 128 steps after 100 / 1000 tokens)")
for t in ("1", "2"):
    ud, um = get("upmix", "dense", t), get("upmix", "moe", t)
    pd, pm = get("pytorch", "dense", t), get("pytorch", "moe", t)
    print(f"threads {t}:")
    print(f"  MoE/dense decode@100 {um['decode_tok_s']['100'] / ud['decode_tok_s']['100']:.2f}x (target >= 0.55), "
          f"prefill {um['prefill_tok_s'] / ud['prefill_tok_s']:.2f}x (target >= 0.5)")
    print(f"  upmix/transformers MoE: prefill {um['prefill_tok_s'] / pm['prefill_tok_s']:.2f}x, "
          f"batch {um['batch_prefill_tok_s'] / pm['batch_prefill_tok_s']:.2f}x, "
          f"decode@100 {um['decode_tok_s']['100'] / pm['decode_tok_s']['100']:.2f}x (target >= 2)")
    print(f"  upmix/transformers dense: prefill {ud['prefill_tok_s'] / pd['prefill_tok_s']:.2f}x (target >= 1.0), "
          f"batch {ud['batch_prefill_tok_s'] / pd['batch_prefill_tok_s']:.2f}x, "
          f"decode@100 {ud['decode_tok_s']['100'] / pd['decode_tok_s']['100']:.2f}x")
    for name, r in (("dense", ud), ("MoE", um)):
        d = r["decode_tok_s"]
        print(f"  upmix {name} decode@1000 / decode@100: {d['1000'] / d['100']:.2f} (target >= 0.8)")
PY

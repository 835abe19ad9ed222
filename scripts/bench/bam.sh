#!/usr/bin/env bash
# Decode speed of BAM against BTX and the dense model, on the same models: SmolLM2-135M
# (float32, dense), the 4-expert top-2 Mixtral upcycled from it and three perturbations of
# it (BTX: FFN experts only), and BAM from the same four models with soft-routed attention
# experts, once with a KV cache per expert and once with shared keys and values. Each run by
# upmix (cpu) at 1 and 2 threads: prefill of 256 tokens and greedy decode tok/s after a
# 100-token prompt (128 steps), peak RSS. transformers has no BAM architecture (upmix's
# remote-code module computes full sequences, without a KV cache), so there is no peer here.
#
# Needs: scripts/fetch-models.sh and the experts of scripts/bench/upcycle.sh (made by its
# first run). Usage: scripts/bench/bam.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
cache="${UPMIX_MODEL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/upmix}"
work="${UPMIX_BENCH_DIR:-$cache/bench-upcycle}"
dense="$cache/SmolLM2-135M-Instruct-f32"
[ -d "$dense" ] || { echo "missing $dense: run scripts/fetch-models.sh" >&2; exit 1; }
[ -d "$work/m3" ] || { echo "missing the experts in $work: run scripts/bench/upcycle.sh once" >&2; exit 1; }
target="${CARGO_TARGET_DIR:-target}"
cargo build --quiet --release --bin upmix --example bench_forward

models='"m0": Hf("'"$work"'/m0"), "m1": Hf("'"$work"'/m1"), "m2": Hf("'"$work"'/m2"), "m3": Hf("'"$work"'/m3")'
experts='experts: ["m0", "m1", "m2", "m3"], top_k: 2, base: "m0", router: Random(seed: 0, std: 0.02)'
for kv in Expert Shared; do
  out="$work/bam-$kv"
  [ -f "$out/model.safetensors" ] && continue
  cat > "$work/bam-$kv.ron" <<RON
(
    models: { $models },
    passes: [ Bam(into: "bam", $experts, kv: $kv) ],
    emit: [Hf(model: "bam", dir: "$out")],
)
RON
  "$target/release/upmix" run "$work/bam-$kv.ron"
done
if [ ! -f "$work/moe-bench/model.safetensors" ]; then
  cat > "$work/moe-bench.ron" <<RON
(
    models: { $models },
    passes: [ Upcycle(into: "moe", $experts) ],
    emit: [Hf(model: "moe", dir: "$work/moe-bench")],
)
RON
  "$target/release/upmix" run "$work/moe-bench.ron"
fi

results="$(mktemp)"
trap 'rm -f "$results"' EXIT
for threads in 1 2; do
  for model in dense btx bam-expert-kv bam-shared-kv; do
    case $model in
      dense) dir="$dense" ;;
      btx) dir="$work/moe-bench" ;;
      bam-expert-kv) dir="$work/bam-Expert" ;;
      bam-shared-kv) dir="$work/bam-Shared" ;;
    esac
    echo "running $model at $threads thread(s)" >&2
    RAYON_NUM_THREADS=$threads "$target/release/examples/bench_forward" "$dir" \
      --prompt-tokens 256 --decode-tokens 128 --decode-at 100 \
      | sed "s/^{/{\"model\": \"$model\", /" >> "$results"
  done
done
python3 - "$results" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
print(f"{'model':<14} {'thr':>3} {'prefill':>8} {'dec@100':>8} {'RSS MB':>7}")
for r in rows:
    print(f"{r['model']:<14} {r['threads']:>3} {r['prefill_tok_s']:>8.1f} "
          f"{r['decode_tok_s']['100']:>8.1f} {r['peak_rss_mb']:>7.0f}")
print("(tok/s; prefill 256 tokens, decode 128 steps after 100 tokens)")
for t in ("1", "2"):
    by = {r["model"]: r for r in rows if r["threads"] == t}
    dense = by["dense"]["decode_tok_s"]["100"]
    print(f"threads {t}: decode relative to dense: " + ", ".join(
        f"{m} {by[m]['decode_tok_s']['100'] / dense:.2f}" for m in ("btx", "bam-expert-kv", "bam-shared-kv")))
PY

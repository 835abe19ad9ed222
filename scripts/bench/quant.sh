#!/usr/bin/env bash
# Quantized execution benchmark, upmix against llama.cpp in one run, on SmolLM2-135M:
# peak RSS of upmix running the model as f32 (the Hugging Face f32 checkpoint), Q8_0 (every
# projection requantized by `upmix convert --quantize q8_0`; the embedding is Q8_0 in the
# source) and Q4_1 (the GGUF as shipped), with ggml activations and with f32 activations;
# and prefill / greedy decode tok/s of the same GGUF files run by upmix and by llama.cpp
# (llama-cpp-python, its defaults) at 1 and 2 threads. Prompt: 100 tokens; 64 decode steps.
# Prints the table and the ratios the targets name (RSS against f32, decode against
# llama.cpp on the same Q4_1 file).
#
# Needs: scripts/fetch-models.sh, scripts/setup-fixture-env.sh.
# Usage: scripts/bench/quant.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
cache="${UPMIX_MODEL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/upmix}"
venv="${UPMIX_FIXTURE_VENV:-$PWD/.venv-fixtures}"
q4_1="$cache/SmolLM2-135M-Instruct.Q4_1.gguf"
f32="$cache/SmolLM2-135M-Instruct-f32"
[ -f "$q4_1" ] && [ -d "$f32" ] || { echo "missing models: run scripts/fetch-models.sh" >&2; exit 1; }
target="${CARGO_TARGET_DIR:-target}"
cargo build --quiet --release --bin upmix --example bench_forward
work="$(mktemp -d)"
results="$work/results.jsonl"
trap 'rm -rf "$work"' EXIT
q8_0="$work/SmolLM2-135M-Instruct.Q8_0.gguf"
"$target/release/upmix" convert "$q4_1" "$q8_0" --quantize q8_0 >&2

opts=(--prompt-tokens 100 --batch 1 --decode-tokens 64 --decode-at 100)
run_upmix() { # label model threads activations
  RAYON_NUM_THREADS=$3 "$target/release/examples/bench_forward" "$2" "${opts[@]}" --activations "$4" \
    | sed "s/^{/{\"model\": \"$1\", \"activations\": \"$4\", /" >> "$results"
}
for threads in 1 2; do
  echo "running at $threads thread(s)" >&2
  run_upmix f32 "$f32" "$threads" float
  for act in ggml float; do
    run_upmix q8_0 "$q8_0" "$threads" "$act"
    run_upmix q4_1 "$q4_1" "$threads" "$act"
  done
  for model in q8_0 q4_1; do
    file="$q8_0"; [ "$model" = q4_1 ] && file="$q4_1"
    "$venv/bin/python" scripts/bench/llama_cpp_forward.py "$file" --threads "$threads" \
      --prompt-tokens 100 --decode-tokens 64 \
      | sed "s/^{/{\"model\": \"$model\", \"activations\": \"ggml\", /" >> "$results"
  done
done
python3 - "$results" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
def decode(r):
    d = r["decode_tok_s"]
    return d if isinstance(d, (int, float)) else d["100"]
print(f"{'tool':<10} {'model':<5} {'act':<5} {'thr':>3} {'prefill':>8} {'decode':>8} {'RSS MB':>7}")
for r in rows:
    print(f"{r['tool']:<10} {r['model']:<5} {r['activations']:<5} {r['threads']:>3} "
          f"{r['prefill_tok_s']:>8.1f} {decode(r):>8.1f} {r['peak_rss_mb']:>7}")
def get(tool, model, act, threads):
    return next(r for r in rows if (r["tool"], r["model"], r["activations"], str(r["threads"]))
                == (tool, model, act, str(threads)))
f32 = get("upmix", "f32", "float", 1)["peak_rss_mb"]
for model in ["q8_0", "q4_1"]:
    rss = get("upmix", model, "ggml", 1)["peak_rss_mb"]
    print(f"upmix peak RSS {model} / f32: {rss / f32:.2f} ({rss} / {f32} MB)")
for threads in [1, 2]:
    for act in ["ggml", "float"]:
        ours = decode(get("upmix", "q4_1", act, threads))
        theirs = decode(get("llama.cpp", "q4_1", "ggml", threads))
        print(f"decode q4_1 at {threads} thread(s), upmix ({act}) / llama.cpp: {ours / theirs:.2f}")
PY

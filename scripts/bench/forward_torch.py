"""transformers side of the forward benchmarks (float32, transformers' default attention,
sdpa, as its users run it).

The same prompts and measurements as examples/bench_forward.rs, best of three runs each:
prefill tok/s of a prompt, prefill tok/s of a batch of such prompts, and KV-cached greedy
decode tok/s after prompts of several lengths; peak RSS. Prints one JSON line.

Usage: forward_torch.py MODEL --threads N [--prompt-tokens 256] [--batch 8]
       [--decode-tokens 64] [--decode-at 16,100,1000]
MODEL: a GGUF file or a Hugging Face checkpoint directory.
"""

import argparse
import json
import os
import resource
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402


def load(path):
    """The model in float32 with transformers' default attention implementation."""
    if os.path.isdir(path):
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return AutoModelForCausalLM.from_pretrained(
        os.path.dirname(os.path.abspath(path)), gguf_file=os.path.basename(path),
        dtype=torch.float32)


def best_of_three(f):
    """Seconds of the fastest of three runs (the machine is shared)."""
    best = float("inf")
    for _ in range(3):
        t = time.perf_counter()
        f()
        best = min(best, time.perf_counter() - t)
    return best


def decode_tok_s(model, prompt, n):
    """Greedy KV-cached decode tok/s after `prompt`, timing only the n single-token steps."""
    def run():
        out = model(torch.tensor([prompt]), use_cache=True, logits_to_keep=1)
        past, nxt = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
        t = time.perf_counter()
        for _ in range(n):
            out = model(nxt, past_key_values=past, use_cache=True)
            past, nxt = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
        return time.perf_counter() - t
    return n / min(run() for _ in range(3))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--threads", type=int, required=True)
    ap.add_argument("--prompt-tokens", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--decode-tokens", type=int, default=64)
    ap.add_argument("--decode-at", default="16")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)

    start = time.perf_counter()
    model = load(a.model).eval()
    load_s = time.perf_counter() - start
    vocab = model.config.vocab_size

    def prompt(row, length):
        return [100 + (i * 7919 + row * 104729) % (vocab - 200) for i in range(length)]

    first = prompt(0, a.prompt_tokens)
    rows = torch.tensor([prompt(r, a.prompt_tokens) for r in range(a.batch)])
    with torch.inference_mode():
        model(torch.tensor([first[:8]]))  # warm up
        prefill_s = best_of_three(lambda: model(torch.tensor([first])))
        batch_s = best_of_three(lambda: model(rows))
        decode = {str(at): round(decode_tok_s(model, prompt(0, at), a.decode_tokens), 2)
                  for at in map(int, a.decode_at.split(","))}

    print(json.dumps({
        "tool": "pytorch", "threads": str(a.threads), "load_s": round(load_s, 3),
        "prefill_tokens": a.prompt_tokens,
        "prefill_tok_s": round(a.prompt_tokens / prefill_s, 2),
        "batch": a.batch, "batch_prefill_tok_s": round(a.batch * a.prompt_tokens / batch_s, 2),
        "decode_tokens": a.decode_tokens, "decode_tok_s": decode,
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
    }))


if __name__ == "__main__":
    main()

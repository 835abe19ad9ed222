"""PyTorch (transformers, float32, eager attention) side of the forward benchmark.

Same prompt ids and measurements as examples/bench_forward.rs: prefill tok/s of a
prompt, then KV-cached greedy decode tok/s after a 16-token prompt, best of three runs
each. Prints one JSON line.

Usage: forward_torch.py GGUF --threads N [--prompt-tokens 256] [--decode-tokens 64]
"""

import argparse
import json
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("gguf")
    ap.add_argument("--threads", type=int, required=True)
    ap.add_argument("--prompt-tokens", type=int, default=256)
    ap.add_argument("--decode-tokens", type=int, default=64)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)

    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(
        os.path.dirname(os.path.abspath(a.gguf)),
        gguf_file=os.path.basename(a.gguf),
        dtype=torch.float32,
        attn_implementation="eager",
    ).eval()
    load_s = time.perf_counter() - start
    vocab = model.config.vocab_size
    prompt = [100 + (i * 7919) % (vocab - 200) for i in range(a.prompt_tokens)]

    with torch.inference_mode():
        model(torch.tensor([prompt[:8]]))  # warm up
        # Best of three runs: the machine is shared, the minimum is the least disturbed.
        prefill_s = decode_s = float("inf")
        for _ in range(3):
            t = time.perf_counter()
            model(torch.tensor([prompt]))
            prefill_s = min(prefill_s, time.perf_counter() - t)

            ids = torch.tensor([prompt[:16]])
            out = model(ids, use_cache=True)
            past, nxt = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
            t = time.perf_counter()
            for _ in range(a.decode_tokens):
                out = model(nxt, past_key_values=past, use_cache=True)
                past, nxt = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
            decode_s = min(decode_s, time.perf_counter() - t)

    print(json.dumps({
        "tool": "pytorch", "threads": a.threads, "load_s": round(load_s, 3),
        "prefill_tokens": a.prompt_tokens, "prefill_tok_s": round(a.prompt_tokens / prefill_s, 2),
        "decode_tokens": a.decode_tokens, "decode_tok_s": round(a.decode_tokens / decode_s, 2),
    }))


if __name__ == "__main__":
    main()

"""llama.cpp's side of scripts/bench/quant.sh, in one JSON line: prefill tok/s of a prompt
and KV-cached greedy decode tok/s after it, best of three runs each, and the process's
peak RSS, for a GGUF file run by llama.cpp (llama-cpp-python, pinned in
scripts/fixtures-requirements.txt) with its defaults (f16 KV cache) at a given thread count.

The prompt is the same sequence of token ids as bench_forward's (`100 + (i * 7919) %
(vocab - 200)`), evaluated as ids, so both tools see the same tokens.

Usage: llama_cpp_forward.py GGUF --threads N [--prompt-tokens 100] [--decode-tokens 64]
"""
import argparse
import json
import resource
import time

import llama_cpp


def main():
    p = argparse.ArgumentParser()
    p.add_argument("gguf")
    p.add_argument("--threads", type=int, required=True)
    p.add_argument("--prompt-tokens", type=int, default=100)
    p.add_argument("--decode-tokens", type=int, default=64)
    a = p.parse_args()
    llm = llama_cpp.Llama(model_path=a.gguf, n_ctx=1024, n_batch=512, n_threads=a.threads,
                          n_threads_batch=a.threads, verbose=False)
    vocab = llm.n_vocab()
    prompt = [100 + (i * 7919) % (vocab - 200) for i in range(a.prompt_tokens)]

    def prefill():
        llm.reset()
        llm.eval(prompt)

    def decode():
        prefill()
        for _ in range(a.decode_tokens):
            logits = llm.scores[llm.n_tokens - 1]
            llm.eval([int(logits.argmax())])

    prefill()  # warm up
    best = lambda f: min(timed(f) for _ in range(3))
    t_prefill = best(prefill)
    t_all = best(decode)
    print(json.dumps({
        "tool": "llama.cpp",
        "threads": a.threads,
        "prefill_tokens": a.prompt_tokens,
        "prefill_tok_s": round(a.prompt_tokens / t_prefill, 2),
        "decode_tokens": a.decode_tokens,
        "decode_tok_s": round(a.decode_tokens / max(t_all - t_prefill, 1e-9), 2),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
    }))


def timed(f):
    t = time.perf_counter()
    f()
    return time.perf_counter() - t


if __name__ == "__main__":
    main()

"""PyTorch side of the training benchmark (scripts/bench/train.sh), run as its users run
it: transformers' model class for the checkpoint (float32, its default sdpa attention),
torch.optim.AdamW with its defaults but the learning rate, one optimizer step per batch.

The text files are tokenized with the checkpoint's tokenizer, joined and cut into windows
of --seq-len tokens, --batch windows a step, in order. Steps are timed from the batch
being handed over to the optimizer step returning (forward, loss, backward, AdamW,
zero_grad); the first step is warmup and is not counted. For a mixture of experts the
load-balancing loss is on (output_router_logits), at the checkpoint's
router_aux_loss_coef. Prints one JSON line with tokens/s.

Usage: train_torch.py MODEL --data FILE [FILE ...] --threads N --batch B --seq-len S
       --steps K --trainable all|router [--lr 1e-3]
"""

import argparse
import json
import os
import re
import resource
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

# A router's weight in transformers' mixture-of-experts classes (Mixtral, Qwen2-MoE).
ROUTER = re.compile(r"\.mlp\.gate\.weight$")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--data", nargs="+", required=True)
    ap.add_argument("--threads", type=int, required=True)
    ap.add_argument("--batch", type=int, required=True)
    ap.add_argument("--seq-len", type=int, required=True)
    ap.add_argument("--steps", type=int, required=True)
    ap.add_argument("--trainable", choices=["all", "router"], required=True)
    ap.add_argument("--lr", type=float, default=1e-3)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    model.train()
    moe = hasattr(model.config, "num_local_experts") or hasattr(model.config, "num_experts")
    trained = []
    for name, p in model.named_parameters():
        p.requires_grad_(args.trainable == "all" or bool(ROUTER.search(name)))
        if p.requires_grad:
            trained.append(p)
    if not trained:
        raise SystemExit(f"no parameter of {args.model} matches {ROUTER.pattern}")
    opt = torch.optim.AdamW(trained, lr=args.lr)

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    ids = []
    for path in args.data:
        with open(path, encoding="utf-8") as f:
            ids += tokenizer(f.read(), add_special_tokens=False)["input_ids"]
    windows = [ids[i:i + args.seq_len] for i in range(0, len(ids) - args.seq_len + 1, args.seq_len)]
    if len(windows) < args.batch:
        raise SystemExit(f"{len(windows)} windows of {args.seq_len} tokens, fewer than {args.batch}")

    times = []
    for step in range(args.steps):
        rows = [windows[(step * args.batch + r) % len(windows)] for r in range(args.batch)]
        batch = torch.tensor(rows)
        t = time.perf_counter()
        out = model(input_ids=batch, labels=batch, **({"output_router_logits": True} if moe else {}))
        out.loss.backward()
        opt.step()
        opt.zero_grad()
        times.append(time.perf_counter() - t)
    timed = times[1:] or times
    tokens = args.batch * args.seq_len
    print(json.dumps({
        "tool": "pytorch",
        "threads": args.threads,
        "tokens_per_s": tokens * len(timed) / sum(timed),
        "step_s": sum(timed) / len(timed),
        "trained_params": sum(p.numel() for p in trained),
        "final_loss": out.loss.item(),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }))


if __name__ == "__main__":
    main()

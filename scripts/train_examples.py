#!/usr/bin/env python3
"""Make the corpora and train the models of the Branch-Train-MiX style example.

Branch-Train-MiX (Sukhbaatar et al., 2024) starts from one dense "seed" model,
trains a copy of it on each domain ("branches"), then makes a Mixture-of-Experts
whose experts are the branches' feed-forward blocks and whose other weights are
the branches' average (here simply the seed's, see 4.). This script makes everything such an example needs, small enough to
commit and to run on a CPU:

  examples/data/<domain>/{train,eval}.txt   three corpora: code, law, math
  examples/data/README.md                   where each corpus comes from, licences
  examples/models/seed/                     dense Llama trained on all three domains
  examples/models/{code,law,math}/          the seed, further trained on one domain
  examples/models/perplexity.json           {"model": {"domain": perplexity}}
  examples/models/full/...                  only with `full-branches`, see 6.

Run it with the fixture environment's Python (pinned torch, transformers and
tokenizers; scripts/setup-fixture-env.sh makes it in .venv-fixtures, or wherever
UPMIX_FIXTURE_VENV points):

    scripts/setup-fixture-env.sh
    /path/to/venv/bin/python scripts/train_examples.py    # e.g. .venv-fixtures/bin/python
    /path/to/venv/bin/python scripts/train_examples.py full-branches    # 6. only

The recipe, top to bottom:

1. Corpora. Each domain has train text and held-out eval text (other files, or
   another random seed, never the same content):
   * code: Rust sources of MIT/Apache-2.0 crates in the local cargo registry
     (~/.cargo/registry/src/*/, or $CARGO_HOME), comment lines dropped; eval is
     other files of those crates.
   * law: licence texts in /usr/share/common-licenses, whole texts held out.
   * math: generated arithmetic lines ("347 + 58 = 405"); eval uses another seed
     and drops lines that occur in train.
   The sources are only needed to regenerate a corpus: a domain whose sources are
   missing on this machine reuses its committed files and says so.
2. Tokenizer: byte-level BPE, 512 tokens, trained on the three train texts;
   <|endoftext|> (id 0) is both bos and eos; no post-processor, so encoding adds
   no tokens.
3. Seed model: a 4-layer Llama (hidden 64, FFN 256, 4 query / 2 key-value heads,
   tied embeddings) trained from scratch on an equal mix of the domains, on
   random 128-token windows that each start with the bos token. It is trained
   briefly on purpose: the corpora are small, and a seed trained until it fits
   them (1500 steps, say) leaves its branches little to gain on held-out text.
4. Branches: one copy of the seed per domain, trained on that domain for half of
   each batch and on the other two domains for the rest (see BRANCH_OWN_SHARE), with
   only the MLP weights (gate_proj, up_proj, down_proj) of layers 1 to 3 trainable
   (see BRANCH_LAYERS). Embeddings, attention, norms and layer 0's MLP stay
   bit-identical to the seed's, so an upcycled MoE can share them unchanged; the
   script checks this after saving. Layer 0 stays the seed's because a router there
   sees little more than the current token's embedding (mergekit's hidden mode reads
   exactly the embedding), so it would route by token identity; from layer 1 on the
   hidden state carries context. The MoE's layer 0 then has three identical experts,
   which gives the dense FFN whatever the router does.
5. Perplexity of every model on every domain's eval text: the text is split into
   windows of 127 tokens, each preceded by bos (128 positions); the mean natural-log
   loss over all predicted tokens, exponentiated.

6. Full branches (`full-branches`, a separate run): a second set of branches for
   the Branch-Attend-Mix (BAM) style example, whose attention experts come from the
   branches' attention blocks, so the branches must train everything: BAM's branches
   do. This mode reads the committed corpora, tokenizer and seed and rewrites none of
   the files above; it trains one branch per domain like 4. (same data mix, steps,
   learning rate schedule and seeds) but with every parameter trainable, and writes
       examples/models/full/{code,law,math}/     the seed, fully trained on one domain
       examples/models/full/perplexity.json      the seed's and these branches' rows
   It checks that every attention weight of each full branch differs from the seed's.

Everything is seeded and runs in float32 on the CPU with two threads, so a rerun on
the same machine and versions writes the same files. It takes a few minutes.
"""

import json
import math
import os
import random
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # noqa: E402
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "examples" / "data"
MODELS = ROOT / "examples" / "models"
DOMAINS = ["code", "law", "math"]

# --- 1. corpora ------------------------------------------------------------------

# (crate, version, licence as in its Cargo.toml, files). All dual MIT / Apache-2.0.
CODE_TRAIN = [
    ("anyhow", "1.0.105", "MIT OR Apache-2.0", [
        "src/error.rs", "src/context.rs", "src/chain.rs"]),
    ("itertools", "0.14.0", "MIT OR Apache-2.0", [
        "src/adaptors/mod.rs", "src/combinations.rs", "src/merge_join.rs"]),
    ("either", "1.19.0", "MIT OR Apache-2.0", ["src/iterator.rs"]),
    ("once_cell", "1.21.4", "MIT OR Apache-2.0", ["src/race.rs", "src/imp_std.rs"]),
    ("thiserror", "2.0.21", "MIT OR Apache-2.0", ["src/lib.rs", "src/display.rs"]),
]
CODE_EVAL = [  # other files of the same crates
    ("anyhow", "1.0.105", "MIT OR Apache-2.0", ["src/fmt.rs"]),
    ("itertools", "0.14.0", "MIT OR Apache-2.0", [
        "src/kmerge_impl.rs", "src/permutations.rs"]),
    ("either", "1.19.0", "MIT OR Apache-2.0", ["src/into_either.rs"]),
    ("once_cell", "1.21.4", "MIT OR Apache-2.0", ["src/imp_pl.rs"]),
]
LICENSES = Path("/usr/share/common-licenses")
# Near-duplicates (GFDL-1.2, GPL-1, LGPL-2) are left out; eval texts are whole
# licences that train never sees.
LAW_TRAIN = ["Apache-2.0", "CC0-1.0", "GFDL-1.3", "GPL-2", "GPL-3", "LGPL-2.1",
             "LGPL-3", "MPL-1.1"]
LAW_EVAL = ["MPL-2.0", "Artistic", "BSD"]
MATH_TRAIN_SEED, MATH_EVAL_SEED = 1234, 5678
MATH_TRAIN_BYTES, MATH_EVAL_BYTES = 150_000, 25_000


def cargo_registry():
    home = Path(os.environ.get("CARGO_HOME", Path.home() / ".cargo"))
    return sorted((home / "registry" / "src").glob("*/"))


def crate_files(crates):
    """Paths of the listed crate files, or None when any is missing here."""
    paths = []
    for name, version, _, files in crates:
        dirs = [d / f"{name}-{version}" for d in cargo_registry()]
        found = [d for d in dirs if d.is_dir()]
        if not found:
            return None
        paths += [(f"{name}-{version}/{f}", found[0] / f) for f in files]
    return paths if all(p.is_file() for _, p in paths) else None


def code_text(crates):
    files = crate_files(crates)
    if files is None:
        return None
    # Comment lines are dropped: they are English prose, which is the law domain's
    # material, and keeping them would blur the two domains token by token.
    def code_only(text):
        return "".join(l for l in text.splitlines(keepends=True) if not l.lstrip().startswith("//"))

    return "".join(f"{code_only(path.read_text())}\n" for _, path in files)


def law_text(names):
    paths = [LICENSES / n for n in names]
    if not all(p.is_file() for p in paths):
        return None
    return "\n\n".join(p.read_text().strip("\n") for p in paths) + "\n"


def arithmetic_lines(seed, nbytes, exclude=frozenset()):
    """Lines like "347 + 58 = 405", "900 - 123 = 777", "12 * 9 = 108"."""
    rng = random.Random(seed)
    lines, size = [], 0
    while size < nbytes:
        op = rng.choice("+-*")
        if op == "*":
            a, b = rng.randint(0, 99), rng.randint(0, 99)
            c = a * b
        elif op == "+":
            a, b = rng.randint(0, 999), rng.randint(0, 999)
            c = a + b
        else:
            a = rng.randint(0, 999)
            b = rng.randint(0, a)
            c = a - b
        line = f"{a} {op} {b} = {c}\n"
        if line not in exclude:
            lines.append(line)
            size += len(line)
    return lines


def build_corpora():
    train_math = arithmetic_lines(MATH_TRAIN_SEED, MATH_TRAIN_BYTES)
    eval_math = arithmetic_lines(MATH_EVAL_SEED, MATH_EVAL_BYTES, frozenset(train_math))
    made = {
        "code": (code_text(CODE_TRAIN), code_text(CODE_EVAL)),
        "law": (law_text(LAW_TRAIN), law_text(LAW_EVAL)),
        "math": ("".join(train_math), "".join(eval_math)),
    }
    corpora = {}
    for domain, (train, held_out) in made.items():
        out = DATA / domain
        if train is None or held_out is None:
            print(f"{domain}: sources not found on this machine, using the committed corpus")
        else:
            out.mkdir(parents=True, exist_ok=True)
            (out / "train.txt").write_text(train)
            (out / "eval.txt").write_text(held_out)
        corpora[domain] = {s: (out / f"{s}.txt").read_text() for s in ("train", "eval")}
        sizes = ", ".join(f"{s} {len(t.encode()):,} bytes" for s, t in corpora[domain].items())
        print(f"{domain}: {sizes}")
    write_data_readme()
    return corpora


def write_data_readme():
    def crate_rows(crates):
        return "\n".join(f"| {n} | {v} | {lic} | {', '.join(fs)} |" for n, v, lic, fs in crates)

    (DATA / "README.md").write_text(f"""# Example corpora

Made by `scripts/train_examples.py` (code, law, math) and `scripts/make_logs_corpus.py`
(logs); each domain has `train.txt` and held-out `eval.txt`.

## code

Rust source files from crates.io with their comment lines (`//`, `///`, `//!`) removed,
one after another. The crates are dual-licensed MIT OR Apache-2.0; their copyright notices and licence
texts are in the crates' packages on crates.io.

`train.txt`:

| crate | version | licence | files |
|---|---|---|---|
{crate_rows(CODE_TRAIN)}

`eval.txt` (other files of the same crates):

| crate | version | licence | files |
|---|---|---|---|
{crate_rows(CODE_EVAL)}

## law

Licence texts from `/usr/share/common-licenses` (Debian's `base-files` package), each
reproduced whole and unmodified, as licence texts are meant to be passed on (the FSF texts
say: "Everyone is permitted to copy and distribute verbatim copies of this license
document, but changing it is not allowed"). Texts are separated by a blank line.

- `train.txt`: {', '.join(LAW_TRAIN)}
- `eval.txt`: {', '.join(LAW_EVAL)}

## math

Arithmetic lines (`a + b = c`, `a - b = c` with 0 <= b <= a, `a * b = c`; operands up
to 999 for + and -, up to 99 for *), generated by the script with Python's `random`:
seed {MATH_TRAIN_SEED} for train, seed {MATH_EVAL_SEED} for eval, which leaves out lines
that occur in train. No licence applies.

## logs

Synthetic service logs, one event per line (`2024-03-05T12:00:10Z INFO  api-5 GET
/v1/carts/404 204 353ms user=u6825`), generated by `scripts/make_logs_corpus.py` with
Python's `random`: seed 4242 for train (about 100 kB), seed 9191 for eval (about 20 kB,
another day, leaving out lines that occur in train). The fourth domain of
`examples/nexus.ron`, which none of the committed models was trained on. No licence
applies.
""")


# --- 2. tokenizer ----------------------------------------------------------------

EOT = "<|endoftext|>"
TOKENIZER_CONFIG = {
    "bos_token": EOT,
    "eos_token": EOT,
    "model_max_length": 256,
    "tokenizer_class": "PreTrainedTokenizerFast",
}


def train_tokenizer(corpora):
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512,
        special_tokens=[EOT],  # id 0
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([corpora[d]["train"] for d in DOMAINS], trainer=trainer)
    assert tok.token_to_id(EOT) == 0 and tok.get_vocab_size() == 512
    return tok


# --- 3./4. models ----------------------------------------------------------------

BOS = 0
WINDOW = 128  # positions per training / eval window, bos included
BATCH = 16
SEED_STEPS, SEED_LR = 600, 3e-3
BRANCH_STEPS, BRANCH_LR = 800, 3e-3
# A branch's batch rows cycle through its own domain BRANCH_OWN_SHARE times for every
# row of each other domain (2:1:1, i.e. half own domain). The replay keeps a branch good
# on the other domains, so a token that the MoE's untrained router sends to the "wrong"
# expert still gets a usable FFN: with 6:1:1 the branches forgot so much that the MoE,
# routed by hidden states, stayed 20-26% above the best branch on code and law.
BRANCH_OWN_SHARE = 2
# The layers whose MLP a branch trains (see 4. above).
BRANCH_LAYERS = range(1, 4)
MLP = ("mlp.gate_proj.", "mlp.up_proj.", "mlp.down_proj.")


def llama_config():
    return LlamaConfig(
        vocab_size=512, hidden_size=64, intermediate_size=256, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        max_position_embeddings=256, rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        tie_word_embeddings=True, bos_token_id=BOS, eos_token_id=BOS,
        attention_dropout=0.0, dtype="float32",
    )


def windows(ids, gen, n):
    """n random windows of WINDOW-1 tokens from ids, each preceded by bos."""
    starts = torch.randint(0, len(ids) - WINDOW + 1, (n,), generator=gen)
    rows = torch.stack([ids[s:s + WINDOW - 1] for s in starts.tolist()])
    return torch.cat([torch.full((n, 1), BOS, dtype=ids.dtype), rows], dim=1)


def train(model, streams, steps, lr, seed, label):
    """AdamW over the trainable parameters, linear warm-up then cosine decay to lr/10.
    The rows of each batch cycle through `streams` (one token tensor per domain)."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    warmup = steps // 20

    def schedule(step):
        if step < warmup:
            return (step + 1) / warmup
        return 0.1 + 0.45 * (1 + math.cos(math.pi * (step - warmup) / (steps - warmup)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    start, avg = time.time(), None
    for step in range(steps):
        per_stream = [sum(1 for r in range(BATCH) if (step * BATCH + r) % len(streams) == i)
                      for i in range(len(streams))]
        batch = torch.cat([windows(s, gen, k) for s, k in zip(streams, per_stream) if k])
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        avg = loss.item() if avg is None else 0.98 * avg + 0.02 * loss.item()
        if (step + 1) % 250 == 0 or step + 1 == steps:
            print(f"  {label} step {step + 1}/{steps}  loss {avg:.3f}  "
                  f"({time.time() - start:.0f} s)", flush=True)
    model.eval()


@torch.no_grad()
def perplexity(model, ids):
    """exp(mean NLL) over ids, in windows of WINDOW-1 tokens each preceded by bos."""
    nll, count = 0.0, 0
    for chunk in ids.split(WINDOW - 1):
        x = torch.cat([torch.tensor([BOS], dtype=ids.dtype), chunk])[None]
        logits = model(input_ids=x).logits[0, :-1].double()
        nll += torch.nn.functional.cross_entropy(logits, x[0, 1:], reduction="sum").item()
        count += len(chunk)
    return math.exp(nll / count)


def save(model, tok, name):
    out = MODELS / name
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps(TOKENIZER_CONFIG, indent=2) + "\n")


def trainable(name):
    """Whether a branch trains the parameter `name` (an MLP weight of BRANCH_LAYERS)."""
    return any(m in name for m in MLP) and any(f"layers.{i}." in name for i in BRANCH_LAYERS)


def check_shared_weights():
    """Every tensor a branch does not train equals the seed's, bit for bit."""
    seed = load_file(MODELS / "seed" / "model.safetensors")
    for d in DOMAINS:
        branch = load_file(MODELS / d / "model.safetensors")
        assert branch.keys() == seed.keys()
        for k, v in seed.items():
            same = torch.equal(branch[k], v)
            assert same != trainable(k), f"{d}: {k} {'un' * same}changed"
    print(f"shared weights: every untrained tensor of {', '.join(DOMAINS)} equals the seed's")


ATTENTION = ("self_attn.q_proj.", "self_attn.k_proj.", "self_attn.v_proj.", "self_attn.o_proj.")


def check_full_branches():
    """Every attention weight of each full branch differs from the seed's."""
    seed = load_file(MODELS / "seed" / "model.safetensors")
    attention = [k for k in seed if any(a in k for a in ATTENTION)]
    assert len(attention) == 4 * llama_config().num_hidden_layers
    for d in DOMAINS:
        branch = load_file(MODELS / "full" / d / "model.safetensors")
        assert branch.keys() == seed.keys()
        same = [k for k in attention if torch.equal(branch[k], seed[k])]
        assert not same, f"full/{d}: attention weights equal the seed's: {same}"
        unchanged = [k for k, v in seed.items() if torch.equal(branch[k], v)]
        print(f"  full/{d}: all {len(attention)} attention weights differ from the seed's; "
              f"{len(unchanged)} of {len(seed)} tensors unchanged")


def full_branches():
    """6.: branches of the committed seed with every parameter trainable."""
    t0 = time.time()
    torch.set_num_threads(2)
    torch.manual_seed(0)
    hf_logging.disable_progress_bar()

    print("reading the committed corpora, tokenizer and seed")
    corpora = {d: {s: (DATA / d / f"{s}.txt").read_text() for s in ("train", "eval")}
               for d in DOMAINS}
    tok = Tokenizer.from_file(str(MODELS / "seed" / "tokenizer.json"))
    assert tok.token_to_id(EOT) == 0 and tok.get_vocab_size() == 512
    ids = {d: {s: torch.tensor(tok.encode(t).ids) for s, t in corpora[d].items()}
           for d in DOMAINS}
    for d in DOMAINS:
        print(f"  {d}: train {len(ids[d]['train']):,} tokens, eval {len(ids[d]['eval']):,}")
    seed = LlamaForCausalLM.from_pretrained(MODELS / "seed", dtype=torch.float32)
    seed.eval()
    trained = {"seed": seed}

    print("6. full branches")
    for i, d in enumerate(DOMAINS):
        branch = LlamaForCausalLM(llama_config())
        branch.load_state_dict(seed.state_dict())
        for p in branch.parameters():
            p.requires_grad_(True)
        others = [ids[o]["train"] for o in DOMAINS if o != d]
        streams = [ids[d]["train"]] * BRANCH_OWN_SHARE + others
        train(branch, streams, BRANCH_STEPS, BRANCH_LR, 1 + i, f"full/{d}")
        save(branch, tok, f"full/{d}")
        trained[d] = branch
    check_full_branches()

    print("perplexity on eval.txt")
    table = {m: {d: round(perplexity(model, ids[d]["eval"]), 4) for d in DOMAINS}
             for m, model in trained.items()}
    committed = json.loads((MODELS / "perplexity.json").read_text())["seed"]
    assert all(abs(table["seed"][d] - committed[d]) <= 1e-3 * committed[d] for d in DOMAINS), \
        f"the seed's perplexity {table['seed']} is not the committed {committed}"
    (MODELS / "full" / "perplexity.json").write_text(json.dumps(table, indent=2) + "\n")
    print(f"  {'model':<6}" + "".join(f"{d:>10}" for d in DOMAINS))
    for m, row in table.items():
        print(f"  {m:<6}" + "".join(f"{row[d]:>10.3f}" for d in DOMAINS))
    full = MODELS / "full"
    size = sum(f.stat().st_size for f in full.rglob("*") if f.is_file())
    print(f"examples/models/full: {size / 2**20:.2f} MiB; {time.time() - t0:.0f} s in all")


def main():
    t0 = time.time()
    torch.set_num_threads(2)
    torch.manual_seed(0)
    hf_logging.disable_progress_bar()

    print("1. corpora")
    corpora = build_corpora()

    print("2. tokenizer")
    tok = train_tokenizer(corpora)
    ids = {d: {s: torch.tensor(tok.encode(t).ids) for s, t in corpora[d].items()}
           for d in DOMAINS}
    for d in DOMAINS:
        print(f"  {d}: train {len(ids[d]['train']):,} tokens, eval {len(ids[d]['eval']):,}")

    print("3. seed model")
    seed = LlamaForCausalLM(llama_config())
    print(f"  {sum(p.numel() for p in seed.parameters()):,} parameters")
    train(seed, [ids[d]["train"] for d in DOMAINS], SEED_STEPS, SEED_LR, 0, "seed")
    save(seed, tok, "seed")
    trained = {"seed": seed}

    print("4. branches")
    for i, d in enumerate(DOMAINS):
        branch = LlamaForCausalLM(llama_config())
        branch.load_state_dict(seed.state_dict())
        for name, p in branch.named_parameters():
            p.requires_grad_(trainable(name))
        others = [ids[o]["train"] for o in DOMAINS if o != d]
        streams = [ids[d]["train"]] * BRANCH_OWN_SHARE + others
        train(branch, streams, BRANCH_STEPS, BRANCH_LR, 1 + i, d)
        save(branch, tok, d)
        trained[d] = branch
    check_shared_weights()
    hf_tok = AutoTokenizer.from_pretrained(MODELS / "seed")
    sample = corpora["code"]["eval"][:400]
    assert hf_tok(sample)["input_ids"] == tok.encode(sample).ids

    print("5. perplexity on eval.txt")
    table = {m: {d: round(perplexity(model, ids[d]["eval"]), 4) for d in DOMAINS}
             for m, model in trained.items()}
    (MODELS / "perplexity.json").write_text(json.dumps(table, indent=2) + "\n")
    print(f"  {'model':<6}" + "".join(f"{d:>10}" for d in DOMAINS))
    for m, row in table.items():
        print(f"  {m:<6}" + "".join(f"{row[d]:>10.3f}" for d in DOMAINS))
    size = sum(f.stat().st_size for f in MODELS.rglob("*") if f.is_file())
    print(f"examples/models: {size / 2**20:.2f} MiB; {time.time() - t0:.0f} s in all")


if __name__ == "__main__":
    modes = {"full-branches": full_branches}
    if len(sys.argv) == 1:
        main()
    elif len(sys.argv) == 2 and sys.argv[1] in modes:
        modes[sys.argv[1]]()
    else:
        sys.exit(f"usage: {sys.argv[0]} [{' | '.join(modes)}]")

#!/usr/bin/env python3
"""Golden gradients and AdamW steps for training, from the tiny llama and mixtral fixtures.

Why: upmix's training code (next-token cross-entropy, a Switch-style load-balancing
loss, the router z-loss and AdamW) is checked against these files: gradients within
1e-4, AdamW parameters within 1e-6. Every definition below is therefore exact.

Inputs: tests/golden/models/llama (LlamaForCausalLM, float32, 2 layers, hidden 64,
vocab 256) and tests/golden/models/mixtral (MixtralForCausalLM stored in bfloat16,
4 experts, top-2, 2 layers), written by scripts/make_fixtures.py. Both are loaded by
transformers in float32 (the bfloat16 mixtral values become their exact float32
values) with the default attention implementation (sdpa), in eval() mode (there is no
dropout either way) with autograd on. CPU, one thread, deterministic algorithms.

Batch: tokens = numpy.random.default_rng(0).integers(0, 256, size=(2, 16)) as int64,
the same for both models, run as one [2, 16] batch (no attention mask, no padding,
positions 0..15 in each row).

Model forward, as transformers computes it (for mixtral): every MoE layer's router
gives logits z = h @ W_gate^T, [T, E] over all T = 2 * 16 = 32 token positions (row
t = b * 16 + s); routing is softmax(z) over all E experts in float32, top-k of those
probabilities, the k probabilities renormalised to sum 1, the output the weighted sum
of the chosen experts' SwiGLU MLPs, w2(silu(w1 x) * w3 x). The router logits the model
returns (output_router_logits=True) are z, before the softmax. transformers runs the
experts with its default experts implementation (recorded in train.json, "grouped_mm" in
5.23); its plain per-expert loop ("eager") gives gradients within ~1e-8 of these.

Losses (natural log throughout; everything float32):

* ce = mean over all 2 * 15 positions (b, s), s < 15, of the cross-entropy of
  logits[b, s] against tokens[b, s + 1] (torch.nn.functional.cross_entropy, mean).
* For each MoE layer l, with its router logits z [T, E], T = 32, E = 4, k = 2:
  p = softmax(z, -1); P_i = mean over t of p[t, i]; the top-k indices of each row by
  torch.topk(z, k) (the same experts as the model's top-k of p; asserted);
  f_i = (number of (t, slot) pairs whose top-k index is i) / (T * k), a constant
  (no gradient); lb_l = E * sum_i f_i * P_i; z_l = mean over t of logsumexp(z[t])^2.
* load_balance = mean over layers of lb_l; z_loss = mean over layers of z_l.
* llama: loss = ce. mixtral: loss = ce + 0.01 * load_balance + 0.001 * z_loss.
  (transformers' own load_balancing_loss_func / aux_loss is not used.)

AdamW: torch.optim.AdamW(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01),
every other argument default (amsgrad False; on CPU torch picks its single-tensor
implementation), no gradient clipping, one parameter group. Starting from the fixture
weights, each of 3 steps is: zero_grad, forward on the batch, loss.backward(), step.
torch's update for step t (t = 1, 2, 3), per element, with m_0 = v_0 = 0:
    p <- p * (1 - lr * weight_decay)
    m <- lerp(m, g, 1 - beta1)              (m + (1 - beta1) * (g - m))
    v <- v * beta2 + (1 - beta2) * g * g
    p <- p - (lr / (1 - beta1^t)) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)
(the bias corrections in float64, the tensor arithmetic in float32).

Tensor names: the names of the fixture checkpoint (model.safetensors). For llama they
are model.named_parameters()'s. transformers loads mixtral's per-expert tensors fused
(model.layers.L.mlp.experts.gate_up_proj [E, 2I, H], .down_proj [E, H, I], router
model.layers.L.mlp.gate.weight); the outputs split them back to the checkpoint names:
block_sparse_moe.experts.e.w1.weight = gate_up_proj[e, :I], w3 = gate_up_proj[e, I:],
w2 = down_proj[e], block_sparse_moe.gate.weight = mlp.gate.weight (the loaded values are
asserted equal to the checkpoint's). AdamW is elementwise, so the split does not change it.

Written to tests/golden/train/ (float32 safetensors, one tensor per checkpoint name):

* llama_grads.safetensors, mixtral_grads.safetensors: d loss / d parameter for every
  parameter (all require grad), one backward from the fixture weights. An expert that
  no token chose in a layer gets an all-zero gradient (its slices are listed in
  train.json as "unrouted_experts").
* llama_adamw3.safetensors, mixtral_adamw3.safetensors: every parameter after the 3
  AdamW steps with all parameters trainable.
* mixtral_adamw3_router_only.safetensors: the same 3 steps (fresh fixture weights)
  with only the routers (block_sparse_moe.gate.weight of each layer) trainable
  (requires_grad False on everything else, only the routers given to AdamW), the loss
  still the full loss above. Holds every parameter, so the frozen ones can be checked
  to be unchanged (asserted here bit-exact).
* train.json: the versions, the batch, and per model: ce, load_balance, z_loss and
  loss at the fixture weights; for each AdamW run ("full", and for mixtral also
  "router_only") the four losses at the forward of each step (before its update) and
  after the last step; the hyperparameters; the tensor names; the router names; the
  smallest gap between the k-th and (k+1)-th router logit of any token in any forward
  of that model ("min_topk_gap", asserted > MIN_TOPK_GAP, so float rounding elsewhere
  cannot change which experts a token is sent to).

Usage: scripts/setup-fixture-env.sh && .venv-fixtures/bin/python scripts/make_train_goldens.py

It is deterministic (same bytes on every run with the pinned environment).
"""

import json
import platform
import sys
from pathlib import Path

import numpy as np
import safetensors
import torch
import torch.nn.functional as F
import transformers
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

from make_fixtures import to_json  # scripts/ is the import path of a script run there

ROOT = Path(__file__).resolve().parent.parent
MODELS = ROOT / "tests" / "golden" / "models"
OUT = ROOT / "tests" / "golden" / "train"

SEED = 0
BATCH, SEQ, VOCAB = 2, 16, 256
STEPS = 3
ADAMW = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
LB_COEF = 0.01
Z_COEF = 0.001
MIN_TOPK_GAP = 1e-4
ROUTER_SUFFIX = "block_sparse_moe.gate.weight"


def batch_tokens():
    """The [2, 16] int64 token batch."""
    rng = np.random.default_rng(SEED)
    return rng.integers(0, VOCAB, size=(BATCH, SEQ)).astype(np.int64)


def load(name):
    """A fixture in float32, default (sdpa) attention, eval mode, autograd on."""
    model = AutoModelForCausalLM.from_pretrained(MODELS / name, dtype=torch.float32)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def checkpoint_tensors(name):
    """The fixture's tensors as stored, cast to float32, by checkpoint name."""
    with safe_open(MODELS / name / "model.safetensors", "pt") as f:
        return {k: f.get_tensor(k).to(torch.float32) for k in f.keys()}


def to_checkpoint_names(named, intermediate):
    """{transformers name: tensor} -> {checkpoint name: float32 tensor} (unfuses experts)."""
    out = {}
    for name, t in named.items():
        t = t.detach().to(torch.float32)
        if name.endswith(".mlp.gate.weight"):
            out[name.replace(".mlp.gate.weight", "." + ROUTER_SUFFIX)] = t.clone()
        elif name.endswith(".mlp.experts.gate_up_proj"):
            prefix = name[: -len("mlp.experts.gate_up_proj")] + "block_sparse_moe.experts"
            for e in range(t.shape[0]):
                out[f"{prefix}.{e}.w1.weight"] = t[e, :intermediate].contiguous().clone()
                out[f"{prefix}.{e}.w3.weight"] = t[e, intermediate:].contiguous().clone()
        elif name.endswith(".mlp.experts.down_proj"):
            prefix = name[: -len("mlp.experts.down_proj")] + "block_sparse_moe.experts"
            for e in range(t.shape[0]):
                out[f"{prefix}.{e}.w2.weight"] = t[e].contiguous().clone()
        else:
            assert "experts" not in name and ".mlp.gate." not in name, name
            out[name] = t.clone()
    return out


def forward_losses(model, tokens, moe):
    """(loss, ce, load_balance, z_loss, min top-k gap, top-k counts per layer)."""
    out = model(input_ids=tokens, output_router_logits=moe, use_cache=False)
    logits = out.logits
    ce = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))
    if not moe:
        return ce, ce, None, None, None, None
    k = model.config.num_experts_per_tok
    num_experts = model.config.num_local_experts
    lbs, zs, gaps, counts = [], [], [], []
    assert len(out.router_logits) == model.config.num_hidden_layers
    for z in out.router_logits:
        assert z.shape == (BATCH * SEQ, num_experts) and z.dtype == torch.float32, z.shape
        p = torch.softmax(z, dim=-1)
        top = torch.topk(z, k, dim=-1).indices
        # the model routes by top-k of the softmax probabilities: same experts
        top_p = torch.topk(p, k, dim=-1).indices
        assert torch.equal(top.sort(-1).values, top_p.sort(-1).values)
        with torch.no_grad():
            count = torch.bincount(top.reshape(-1), minlength=num_experts)
            f = count.to(torch.float32) / (z.shape[0] * k)
            sorted_z = torch.sort(z, dim=-1, descending=True).values
            gaps.append(float((sorted_z[:, k - 1] - sorted_z[:, k]).min()))
            counts.append(count.tolist())
        big_p = p.mean(dim=0)
        lbs.append(num_experts * (f * big_p).sum())
        zs.append((torch.logsumexp(z, dim=-1) ** 2).mean())
    load_balance = torch.stack(lbs).mean()
    z_loss = torch.stack(zs).mean()
    loss = ce + LB_COEF * load_balance + Z_COEF * z_loss
    return loss, ce, load_balance, z_loss, min(gaps), counts


def values(loss, ce, lb, z):
    """The four losses as Python floats (None where not defined)."""
    as_float = lambda t: None if t is None else float(t.detach().item())  # noqa: E731
    return dict(loss=as_float(loss), ce=as_float(ce), load_balance=as_float(lb),
                z_loss=as_float(z))


def save(path, tensors):
    """float32 safetensors, every tensor contiguous."""
    tensors = {k: v.detach().to(torch.float32).contiguous() for k, v in sorted(tensors.items())}
    save_file(tensors, str(path), metadata={"format": "pt"})


def run_adamw(name, tokens, moe, router_only, gaps):
    """3 AdamW steps from fresh fixture weights; (params by model name, per-step losses)."""
    model = load(name)
    if router_only:
        for pname, p in model.named_parameters():
            p.requires_grad_(pname.endswith(".mlp.gate.weight"))
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, **ADAMW)
    steps = []
    for _ in range(STEPS):
        opt.zero_grad()
        loss, ce, lb, z, gap, _ = forward_losses(model, tokens, moe)
        loss.backward()
        opt.step()
        steps.append(values(loss, ce, lb, z))
        if gap is not None:
            gaps.append(gap)
    with torch.no_grad():
        loss, ce, lb, z, gap, _ = forward_losses(model, tokens, moe)
    if gap is not None:
        gaps.append(gap)
    return dict(model.named_parameters()), steps, values(loss, ce, lb, z)


def make(name, tokens, moe, report):
    """Every output of one model; its train.json entry into report[name]."""
    stored = checkpoint_tensors(name)

    # 1. gradients at the fixture weights
    model = load(name)
    intermediate = model.config.intermediate_size
    hf_names = [n for n, _ in model.named_parameters()]
    print(f"{name}: transformers parameters:")
    for n, p in model.named_parameters():
        print(f"  {n} {list(p.shape)}")
    initial = to_checkpoint_names(dict(model.named_parameters()), intermediate)
    assert sorted(initial) == sorted(stored), (sorted(initial), sorted(stored))
    for k, v in stored.items():
        assert torch.equal(initial[k], v), f"{k}: loaded values differ from the checkpoint"
    model.zero_grad()
    loss, ce, lb, z, gap, counts = forward_losses(model, tokens, moe)
    loss.backward()
    gaps = [] if gap is None else [gap]
    grads = {}
    for n, p in model.named_parameters():
        assert p.grad is not None, f"no gradient for {n}"
        assert torch.isfinite(p.grad).all(), n
        grads[n] = p.grad
    grads = to_checkpoint_names(grads, intermediate)
    save(OUT / f"{name}_grads.safetensors", grads)
    unrouted = sorted(k for k, g in grads.items() if "experts" in k and not torch.any(g != 0))
    initial_values = values(loss, ce, lb, z)
    print(f"{name}: initial {initial_values}")

    # 2. full AdamW
    params, steps, final = run_adamw(name, tokens, moe, False, gaps)
    save(OUT / f"{name}_adamw3.safetensors", to_checkpoint_names(params, intermediate))
    print(f"{name}: adamw full steps {steps} after {final}")
    runs = {"full": dict(steps=steps, after=final)}

    router_names = []
    if moe:
        # 3. router-only AdamW
        router_names = sorted(k for k in stored if k.endswith(ROUTER_SUFFIX))
        assert len(router_names) == model.config.num_hidden_layers, router_names
        params, r_steps, r_final = run_adamw(name, tokens, moe, True, gaps)
        params = to_checkpoint_names(params, intermediate)
        for k, v in params.items():
            if k in router_names:
                assert not torch.equal(v, stored[k]), f"router {k} did not change"
            else:
                assert torch.equal(v, stored[k]), f"frozen {k} changed"
        save(OUT / f"{name}_adamw3_router_only.safetensors", params)
        print(f"{name}: adamw router-only steps {r_steps} after {r_final}")
        runs["router_only"] = dict(steps=r_steps, after=r_final)
        assert min(gaps) > MIN_TOPK_GAP, f"near-tie in routing: {min(gaps)}"

    entry = dict(initial_values)
    entry.update(
        loss_formula="ce" if not moe else f"ce + {LB_COEF} * load_balance + {Z_COEF} * z_loss",
        adamw=runs,
        hyperparameters=dict(optimizer="torch.optim.AdamW", steps=STEPS, lr=ADAMW["lr"],
                             betas=list(ADAMW["betas"]), eps=ADAMW["eps"],
                             weight_decay=ADAMW["weight_decay"], amsgrad=False,
                             gradient_clipping=None,
                             load_balance_coef=LB_COEF if moe else None,
                             z_loss_coef=Z_COEF if moe else None),
        parameter_names=sorted(stored),
        transformers_parameter_names=hf_names,
        router_names=router_names,
        attn_implementation=model.config._attn_implementation,
    )
    if moe:
        entry.update(
            num_experts=model.config.num_local_experts,
            top_k=model.config.num_experts_per_tok,
            experts_implementation=model.config._experts_implementation,
            topk_counts_initial=counts,
            unrouted_experts=unrouted,
            min_topk_gap=min(gaps),
        )
    report[name] = entry


def setup():
    """One thread and deterministic algorithms; returns the versions that make the goldens."""
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    versions = dict(python=platform.python_version(), torch=torch.__version__,
                    transformers=transformers.__version__, numpy=np.__version__,
                    safetensors=safetensors.__version__)
    print("versions:", versions)
    return versions


def main():
    versions = setup()
    OUT.mkdir(parents=True, exist_ok=True)
    tokens_np = batch_tokens()
    tokens = torch.from_numpy(tokens_np)
    report = dict(versions=versions, seed=SEED, tokens=tokens_np.tolist())
    make("llama", tokens, False, report)
    make("mixtral", tokens, True, report)
    text = to_json(report) + "\n"
    (OUT / "train.json").write_text(text, encoding="utf-8")
    for path in sorted(OUT.iterdir()):
        print(f"{path.relative_to(ROOT)}: {path.stat().st_size} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())

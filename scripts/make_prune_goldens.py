#!/usr/bin/env python3
"""Generate the pruning goldens under tests/golden/prune/ from the tiny llama checkpoint.

Input: tests/golden/models/llama (model.safetensors, config.json, tokenizer.json), written
by scripts/make_fixtures.py.

Pruned weights: in every decoder layer, the seven linear weights
self_attn.{q,k,v,o}_proj.weight and mlp.{gate,up,down}_proj.weight. A weight is
[out, in]: a row is one output feature, a column one input feature. Everything is float32.

Rules (k = floor(s * n), with s * n computed in float64; every sort below is a *stable*
ascending sort, torch.sort(..., stable=True), so equal values keep column order and the
lower index is zeroed first; a zeroed entry is +0.0, set by assignment as Wanda's reference
code does, never weight * mask, which would leave -0.0 for negative weights):

1. Magnitude per row, sparsity s: in each row of n entries, zero the first k entries of
   the stable ascending sort of |w| along the row.
2. Magnitude per tensor, sparsity s: flatten the tensor row-major (numel entries), zero
   the first k = floor(s * numel) entries of the stable ascending sort of |w|.
3. N:M 2:4 on magnitude: in each row, for every group of 4 consecutive columns
   (4g .. 4g+3), zero the 2 entries that come first in the stable ascending sort of |w|
   within the group.
4. Wanda, sparsity s: score S_ij = |W_ij| * ||X_j||_2, computed in float32 as
   torch.abs(W) * norm[None, :]. ||X_j||_2 is the L2 norm of input column j of that
   nn.Linear over every calibration token position (see below). In each row, zero the
   first k of the stable ascending sort of the score (rule 1 applied to S).
5. Wanda 2:4: rule 3 applied to the Wanda score.

Calibration: CALIBRATION_TEXT (ordinary English prose, written to calibration.txt as
UTF-8 without a trailing newline) is tokenized as a whole with the model's tokenizer.json
by tokenizers' encode(text, add_special_tokens=True), i.e. with the tokenizer's own
special-token rule (golden.json records whether that added anything). The ids are split
into consecutive non-overlapping windows of WINDOW tokens; the last window may be shorter
and is dropped when shorter than 2 tokens. Each window is run as its own batch-1 sequence
(no padding, no attention mask, positions from 0) through the model, loaded by
transformers in float32 with eager attention. Forward pre-hooks on every targeted
nn.Linear collect its input vectors; the sum of x_j^2 over all positions of all windows
is accumulated in float64 per input column j, and norm_j = sqrt(sum_j) cast to float32.

Written to tests/golden/prune/:

* calibration.txt                    the calibration text.
* magnitude_row_0.5.safetensors      rule 1, s = 0.5.
* magnitude_tensor_0.3.safetensors   rule 2, s = 0.3.
* magnitude_2of4.safetensors         rule 3.
* wanda_0.5.safetensors              rule 4, s = 0.5.
* wanda_2of4.safetensors             rule 5.
  Each holds every pruned weight (float32, same shape) under its Hugging Face name,
  e.g. model.layers.0.self_attn.q_proj.weight.
* wanda_norms.safetensors            float32 ||X_j||_2 [in] per pruned weight, keyed by
                                     the weight's Hugging Face name.
* golden.json                        the calibration ids per window, the window length,
  whether the tokenizer added special tokens, and per method its file, sparsity (or
  n/m), the number of zeros of every pruned weight and, for the Wanda methods, how close
  the threshold is to a tie: per weight and row, the smallest relative gap
  (hi - lo) / hi between the largest zeroed score lo (the k-th in ascending order) and
  the smallest kept score hi (the (k+1)-th); for 2:4, the 2nd and 3rd score of each group
  of 4, smallest over the groups of the row (0 when hi is 0). Also the smallest gap per
  weight and per method, and the torch, transformers and tokenizers versions.

The script asserts that kept entries are the original values, that each row of the
per-row outputs has exactly k zeros (when the original row had none), that the per-tensor
output has exactly k zeros (likewise) and that every group of 4 of the 2:4 outputs has at
least 2 zeros.

How to run (from the repository root):

    scripts/setup-fixture-env.sh && .venv-fixtures/bin/python scripts/make_prune_goldens.py

It is deterministic: CPU, one thread, float32 compute, no randomness.
"""

import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import tokenizers  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from tokenizers import Tokenizer  # noqa: E402

from make_fixtures import GOLDEN, MODELS, load_model, write_json  # noqa: E402

MODEL_DIR = MODELS / "llama"
OUT = GOLDEN / "prune"

WINDOW = 64
MIN_WINDOW = 2
ATTN_PROJ = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_PROJ = ("gate_proj", "up_proj", "down_proj")
N_OF_M = (2, 4)
ROW_SPARSITY = 0.5
TENSOR_SPARSITY = 0.3
WANDA_SPARSITY = 0.5

CALIBRATION_TEXT = (
    "On the morning of the market, the square filled slowly. The baker arrived first, as he "
    "always did, and set out long loaves on a table covered with a faded blue cloth. Next to "
    "him a woman from the hills unpacked jars of honey and small wheels of goat cheese, each "
    "wrapped in a leaf and tied with string. By eight o'clock the smell of bread and coffee "
    "had drawn a small crowd, and the first arguments about the price of tomatoes had begun.\n"
    "\n"
    "Most of the people who came were regulars. They knew which stall sold the sweetest "
    "plums and which farmer would add an extra handful of beans if you asked about his "
    "daughter. Children ran between the tables while their parents compared apples, and an "
    "old man with a violin played the same three songs he had played for twenty years. Nobody "
    "minded. The songs had become part of the place, like the fountain in the middle of the "
    "square or the pigeons that waited patiently for crumbs.\n"
    "\n"
    "Around noon the light changed. Clouds moved in from the west, and a cool wind lifted the "
    "corners of the awnings. A few traders began to pack up early, stacking empty crates into "
    "the backs of their vans, but others stayed, hoping for one last customer. The woman with "
    "the honey offered tastes on small wooden spoons, and a young couple, who had only meant "
    "to look, left with three jars and a promise to come back next week.\n"
    "\n"
    "When the rain finally came it was gentle at first, then heavy enough to send everyone "
    "under the arches of the town hall. People stood shoulder to shoulder, holding their "
    "bags against their chests, and talked about the weather, the harvest and the new road "
    "that was supposed to be finished before winter. Some said it would bring more visitors "
    "and more trade. Others worried that the big shops in the city would be only a short "
    "drive away, and that the market would slowly empty.\n"
    "\n"
    "By the time the sky cleared, the square was almost bare. Puddles reflected the church "
    "tower and the last few stalls. The baker counted his coins, folded the blue cloth and "
    "carried the unsold loaves to the shelter at the end of the street, as he did every "
    "week. Then he locked his van, looked once around the quiet square, and drove home."
)


def pruned_names(num_layers):
    """Hugging Face names of the pruned weights, layer by layer, attention then MLP."""
    names = []
    for layer in range(num_layers):
        names += [f"model.layers.{layer}.self_attn.{p}.weight" for p in ATTN_PROJ]
        names += [f"model.layers.{layer}.mlp.{p}.weight" for p in MLP_PROJ]
    return names


def count(sparsity, n):
    """k = floor(sparsity * n), the number of entries to zero out of n."""
    return math.floor(sparsity * n)


def zero_lowest_per_row(weight, score, sparsity):
    """Zero, in each row, the k = floor(s * n) entries with the lowest score (stable order)."""
    k = count(sparsity, score.shape[1])
    order = torch.sort(score, dim=1, stable=True).indices
    mask = torch.ones_like(weight, dtype=torch.bool)
    mask.scatter_(1, order[:, :k], False)
    return weight.masked_fill(~mask, 0.0), mask


def zero_lowest_per_tensor(weight, score, sparsity):
    """Zero the k = floor(s * numel) entries of the whole tensor with the lowest score."""
    k = count(sparsity, score.numel())
    order = torch.sort(score.reshape(-1), stable=True).indices
    mask = torch.ones(weight.numel(), dtype=torch.bool)
    mask[order[:k]] = False
    mask = mask.reshape(weight.shape)
    return weight.masked_fill(~mask, 0.0), mask


def zero_n_of_m(weight, score):
    """Zero, in each group of M consecutive columns of a row, the N lowest scores (stable)."""
    n, m = N_OF_M
    rows, cols = score.shape
    assert cols % m == 0, (cols, m)
    grouped = score.reshape(rows, cols // m, m)
    order = torch.sort(grouped, dim=2, stable=True).indices
    mask = torch.ones(grouped.shape, dtype=torch.bool)
    mask.scatter_(2, order[:, :, :n], False)
    mask = mask.reshape(rows, cols)
    return weight.masked_fill(~mask, 0.0), mask


def relative_gap(lo, hi):
    """(hi - lo) / hi in float64 (hi >= lo >= 0), 0 where hi is 0."""
    lo, hi = lo.to(torch.float64), hi.to(torch.float64)
    safe = torch.where(hi > 0, hi, torch.ones_like(hi))
    return torch.where(hi > 0, (hi - lo) / safe, torch.zeros_like(hi))


def row_gaps(score, sparsity):
    """Per row: relative gap between the k-th and (k+1)-th score in ascending order."""
    k = count(sparsity, score.shape[1])
    assert 0 < k < score.shape[1], k
    ordered = torch.sort(score, dim=1, stable=True).values
    return relative_gap(ordered[:, k - 1], ordered[:, k])


def row_gaps_n_of_m(score):
    """Per row: smallest relative gap between the N-th and (N+1)-th score of its groups."""
    n, m = N_OF_M
    rows, cols = score.shape
    ordered = torch.sort(score.reshape(rows, cols // m, m), dim=2, stable=True).values
    return relative_gap(ordered[:, :, n - 1], ordered[:, :, n]).min(dim=1).values


def calibration_windows(tokenizer):
    """Ids of CALIBRATION_TEXT in WINDOW-token windows, and whether specials were added."""
    ids = tokenizer.encode(CALIBRATION_TEXT, add_special_tokens=True).ids
    plain = tokenizer.encode(CALIBRATION_TEXT, add_special_tokens=False).ids
    windows = [ids[i:i + WINDOW] for i in range(0, len(ids), WINDOW)]
    if windows and len(windows[-1]) < MIN_WINDOW:
        windows.pop()
    return windows, ids != plain


@torch.no_grad()
def input_norms(model, names, windows):
    """||X_j||_2 (float32 [in]) of the input of each named linear over all windows."""
    modules = dict(model.named_modules())
    sums, handles = {}, []
    for name in names:
        linear = modules[name.removesuffix(".weight")]
        assert isinstance(linear, torch.nn.Linear), name
        sums[name] = torch.zeros(linear.in_features, dtype=torch.float64)

        def hook(module, args, name=name):
            x = args[0].reshape(-1, module.in_features).to(torch.float64)
            sums[name] += (x * x).sum(dim=0)

        handles.append(linear.register_forward_pre_hook(hook))
    try:
        for window in windows:
            model(torch.tensor([window]))
    finally:
        for handle in handles:
            handle.remove()
    return {name: torch.sqrt(total).to(torch.float32) for name, total in sums.items()}


def zeros_of(tensors):
    """Number of zero entries of every tensor."""
    return {name: int((t == 0).sum()) for name, t in tensors.items()}


def check_kept(original, pruned, mask):
    """Kept entries are unchanged and zeroed ones are 0."""
    assert torch.equal(pruned[mask], original[mask])
    assert bool((pruned[~mask] == 0).all())


def check_per_row(original, pruned, sparsity):
    """Each row has at least k zeros, exactly k where the original row had none."""
    k = count(sparsity, original.shape[1])
    zeros = (pruned == 0).sum(dim=1)
    had_none = (original == 0).sum(dim=1) == 0
    assert bool((zeros >= k).all())
    assert bool((zeros[had_none] == k).all()), (zeros, k)


def check_n_of_m(pruned):
    """Every group of M consecutive columns of a row has at least N zeros."""
    n, m = N_OF_M
    rows, cols = pruned.shape
    zeros = (pruned.reshape(rows, cols // m, m) == 0).sum(dim=2)
    assert bool((zeros >= n).all())


def f64(x):
    """A float64 value as a plain JSON float."""
    return float(x)


def main():
    """Compute every golden and write tests/golden/prune/."""
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)

    tokenizer = Tokenizer.from_file(str(MODEL_DIR / "tokenizer.json"))
    windows, specials_added = calibration_windows(tokenizer)
    model = load_model(MODEL_DIR)
    originals = load_file(str(MODEL_DIR / "model.safetensors"))
    names = pruned_names(model.config.num_hidden_layers)
    weights = {name: originals[name].to(torch.float32).contiguous() for name in names}
    for name, w in weights.items():
        assert torch.equal(w, model.state_dict()[name]), name

    norms = input_norms(model, names, windows)
    magnitude_row, magnitude_tensor, magnitude_nm = {}, {}, {}
    wanda_row, wanda_nm = {}, {}
    gaps_row, gaps_nm = {}, {}
    for name, w in weights.items():
        magnitude = torch.abs(w)
        score = torch.abs(w) * norms[name][None, :]
        assert score.dtype == torch.float32 and norms[name].shape == (w.shape[1],)

        pruned, mask = zero_lowest_per_row(w, magnitude, ROW_SPARSITY)
        check_kept(w, pruned, mask)
        check_per_row(w, pruned, ROW_SPARSITY)
        magnitude_row[name] = pruned

        pruned, mask = zero_lowest_per_tensor(w, magnitude, TENSOR_SPARSITY)
        check_kept(w, pruned, mask)
        k = count(TENSOR_SPARSITY, w.numel())
        assert int((pruned == 0).sum()) == k + int((w[mask] == 0).sum())
        magnitude_tensor[name] = pruned

        pruned, mask = zero_n_of_m(w, magnitude)
        check_kept(w, pruned, mask)
        check_n_of_m(pruned)
        magnitude_nm[name] = pruned

        pruned, mask = zero_lowest_per_row(w, score, WANDA_SPARSITY)
        check_kept(w, pruned, mask)
        check_per_row(w, pruned, WANDA_SPARSITY)
        wanda_row[name] = pruned
        gaps_row[name] = row_gaps(score, WANDA_SPARSITY)

        pruned, mask = zero_n_of_m(w, score)
        check_kept(w, pruned, mask)
        check_n_of_m(pruned)
        wanda_nm[name] = pruned
        gaps_nm[name] = row_gaps_n_of_m(score)

    n, m = N_OF_M
    outputs = {
        "magnitude_row": (f"magnitude_row_{ROW_SPARSITY}.safetensors", magnitude_row,
                          {"scope": "row", "sparsity": ROW_SPARSITY}, None),
        "magnitude_tensor": (f"magnitude_tensor_{TENSOR_SPARSITY}.safetensors", magnitude_tensor,
                             {"scope": "tensor", "sparsity": TENSOR_SPARSITY}, None),
        "magnitude_2of4": ("magnitude_2of4.safetensors", magnitude_nm,
                           {"n": n, "m": m}, None),
        "wanda": (f"wanda_{WANDA_SPARSITY}.safetensors", wanda_row,
                  {"scope": "row", "sparsity": WANDA_SPARSITY}, gaps_row),
        "wanda_2of4": ("wanda_2of4.safetensors", wanda_nm, {"n": n, "m": m}, gaps_nm),
    }

    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "calibration.txt").write_text(CALIBRATION_TEXT, encoding="utf-8")
    methods = {}
    for method, (file, tensors, params, row_gap) in outputs.items():
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(OUT / file))
        entry = {"file": file, **params, "zeros": zeros_of(tensors)}
        if row_gap is not None:
            entry["min_rel_gap"] = f64(min(float(g.min()) for g in row_gap.values()))
            entry["weight_min_rel_gap"] = {k: f64(g.min()) for k, g in row_gap.items()}
            entry["row_min_rel_gap"] = {k: [f64(x) for x in g.tolist()] for k, g in row_gap.items()}
        methods[method] = entry
    save_file({k: v.contiguous() for k, v in norms.items()}, str(OUT / "wanda_norms.safetensors"))

    tokens = sum(len(w) for w in windows)
    write_json(OUT / "golden.json", {
        "model": "tests/golden/models/llama",
        "weights": names,
        "shapes": {k: list(v.shape) for k, v in weights.items()},
        "calibration": {
            "text_file": "calibration.txt",
            "window": WINDOW,
            "special_tokens_added": specials_added,
            "tokens": tokens,
            "windows": windows,
        },
        "sparsities": {"magnitude_row": ROW_SPARSITY, "magnitude_tensor": TENSOR_SPARSITY,
                       "wanda": WANDA_SPARSITY},
        "norms_file": "wanda_norms.safetensors",
        "methods": methods,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "tokenizers": tokenizers.__version__},
    })

    # The files read back as written.
    for method, (file, tensors, _, _) in outputs.items():
        back = load_file(str(OUT / file))
        assert sorted(back) == sorted(tensors), file
        for k, v in tensors.items():
            assert back[k].dtype == torch.float32 and torch.equal(back[k], v), (file, k)
    back = load_file(str(OUT / "wanda_norms.safetensors"))
    assert all(torch.equal(back[k], v) for k, v in norms.items())
    assert np.isfinite(np.array([float(g.min()) for g in gaps_row.values()])).all()

    print(f"wrote {OUT}: {len(windows)} windows, {tokens} tokens, "
          f"special tokens added: {specials_added}")
    for method, entry in methods.items():
        total = sum(entry["zeros"].values())
        numel = sum(w.numel() for w in weights.values())
        gap = f", min relative gap {entry['min_rel_gap']:.3e}" if "min_rel_gap" in entry else ""
        print(f"  {method}: {total}/{numel} zeros{gap}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Generate the quantization goldens under tests/golden/quant/ with gguf-py and torch.

Reference implementations (pinned in scripts/fixtures-requirements.txt: gguf==0.19.0,
i.e. gguf-py, torch==2.15.0, numpy==2.4.6, safetensors==0.8.0; the script checks that the
installed versions are the pinned ones):

* Q8_0, Q4_0, Q4_1: gguf.quants.quantize(array, gguf.GGMLQuantizationType.X), the numpy
  port of ggml's quantize_row_*_ref, and gguf.quants.dequantize(bytes, X). numpy does
  every step in float32 and never fuses a multiply and an add, so the goldens are the
  non-FMA results (see "FMA" below).
* int8 per output channel (weight only), in float32 with torch:
      amax  = w.abs().amax(dim=1)                 # [rows]
      scale = amax / 127                          # 0 where amax == 0
      q     = round(w / scale[:, None]).clamp(-127, 127).to(int8)   # 0 where amax == 0
  torch.round rounds half to even (q8_0's roundf rounds half away from zero).

Input tensors (float32, 2-D, every row a whole number of 32-value blocks; rows are
quantized independently, blocks run along the row):

* normal     [32, 256]  torch.Generator seeded 0, randn * 0.05 (32 rows, not 64, so that
                        the whole directory stays under 1 MB: 1.05 MB with 64).
* ties       [8, 64]    blocks whose x * id (Q8_0) or x * id + 8.5 (Q4_0) or
                        (x - min) * id + 0.5 (Q4_1) land exactly on a rounding boundary,
                        plus rows where w / scale is an exact .5 for int8 (half to even),
                        plus "near ties" with an inexact id (see ties_tensor()).
* zeros      [2, 64]    all +0.0 and all -0.0 blocks (an all-zero row: int8 scale 0), a
                        block with one nonzero value, a constant block (Q4_1 max == min).
* signs      [4, 64]    largest magnitude negative / positive, +m and -m both present
                        (the first wins Q4_0's argmax, as in ggml's strict `amax <`),
                        all-negative and all-positive blocks.
* range      [4, 64]    huge values (scales still finite in f16: Q8_0 d = amax/127,
                        Q4_0 |d| = amax/8, Q4_1 d = (max-min)/15 and m = min all < 65504),
                        tiny values (f16-subnormal scales, and scales that flush to 0 in
                        f16 while the quants, computed with the f32 scale, do not).
* smollm2_q  [64, 576]  rows 0..63 of model.layers.0.self_attn.q_proj.weight from the
                        float32 SmolLM2-135M-Instruct checkpoint in the model cache
                        (scripts/fetch-models.sh; ${UPMIX_MODEL_CACHE:-~/.cache/upmix}/
                        SmolLM2-135M-Instruct-f32/model.safetensors). That checkpoint is
                        the dequantized Q4_1 GGUF, so its blocks are Q4_1 grid values.

Written to tests/golden/quant/:

* input.safetensors          the input tensors above (F32).
* q8_0.safetensors, q4_0.safetensors, q4_1.safetensors
      NAME          U8 [rows, cols / 32 * block_bytes]: the bytes of quantize(NAME, X)
                    (Q8_0 34 bytes a block: f16 d, 32 x i8; Q4_0 18: f16 d, 16 bytes of
                    nibbles, value j in the low nibble of byte j, value j + 16 in its high
                    nibble; Q4_1 20: f16 d, f16 m, 16 bytes of nibbles).
      NAME.dequant  F32 [rows, cols]: dequantize(those bytes, X).
* int8_channel.safetensors
      NAME.q        I8 [rows, cols], NAME.scale F32 [rows].
* README.md                  what these files are, how to regenerate them, the versions.

How to run (from the repository root; needs the model cache, scripts/fetch-models.sh):

    scripts/setup-fixture-env.sh && .venv-fixtures/bin/python scripts/make_quant_goldens.py

Deterministic: CPU, one thread, float32, seeded generators, no other randomness.

FMA: gguf-py's Q4_0 computes trunc(x * id + 8.5) and Q4_1 trunc((x - min) * id + 0.5)
with a rounded product followed by a rounded add. ggml's C reference (ggml-quants.c,
quantize_row_q4_0_ref / _q4_1_ref) writes them as two statements, `x0 = x*id;` (resp.
`(x - min)*id`) then `(int8_t)(x0 + 8.5f)` (resp. `+ 0.5f`); GCC in its default GNU C
mode (-ffp-contract=fast; ggml builds with -std=gnu11) contracts that into one fmaf when
the target has FMA (aarch64; x86 only with -mfma/-march=..., which ggml passes to its CPU
backend but not to ggml-base, where ggml-quants.c lives). The results differ only for
near-ties: the "near tie" rows 5 and 6 of `ties` hold some (the script prints how many);
the other inputs have none. Q8_0 (roundf of a product) has no add to fuse.
"""

import importlib.metadata
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import gguf  # noqa: E402
import gguf.quants  # noqa: E402
import numpy as np  # noqa: E402
import safetensors  # noqa: E402
import torch  # noqa: E402
from safetensors import safe_open  # noqa: E402
from safetensors.numpy import load_file as np_load_file  # noqa: E402
from safetensors.numpy import save_file as np_save_file  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from make_fixtures import GOLDEN, REPO_ROOT, upmix_model_cache  # noqa: E402

OUT = GOLDEN / "quant"
REQUIREMENTS = REPO_ROOT / "scripts" / "fixtures-requirements.txt"
PINNED = ("gguf", "torch", "numpy", "safetensors")

BLOCK = 32
SMOLLM2_DIR = "SmolLM2-135M-Instruct-f32"
SMOLLM2_TENSOR = "model.layers.0.self_attn.q_proj.weight"
SMOLLM2_ROWS = 64
NORMAL_ROWS = 32  # 64 rows would put the directory over 1 MB (1,053,808 bytes)

QTYPES = {
    "q8_0": gguf.GGMLQuantizationType.Q8_0,
    "q4_0": gguf.GGMLQuantizationType.Q4_0,
    "q4_1": gguf.GGMLQuantizationType.Q4_1,
}
BLOCK_BYTES = {"q8_0": 34, "q4_0": 18, "q4_1": 20}
F16_MAX = 65504.0


def f32(values):
    """A float32 tensor from a list of Python floats (each rounded once to float32)."""
    return torch.tensor(values, dtype=torch.float32)


def block(values):
    """A 32-value block; asserts the length."""
    t = f32(values)
    assert t.shape == (BLOCK,), t.shape
    return t


def row(*blocks):
    """Concatenate blocks into one row."""
    return torch.cat(blocks)


def filler(gen, n, lo, hi):
    """n float32 values uniform in [lo, hi) from gen (deterministic)."""
    return (torch.rand(n, generator=gen, dtype=torch.float32) * (hi - lo) + lo).tolist()


def half_integers(lo, hi):
    """k + 0.5 for integers k with lo <= k + 0.5 <= hi, ascending."""
    return [k + 0.5 for k in range(int(np.floor(lo - 0.5)), int(np.ceil(hi))) if lo <= k + 0.5 <= hi]


def q4_1_trunc(t, inv, fused):
    """trunc(t * inv + 0.5) in float32, product and add rounded separately or fused.

    t and inv are float32, so t * inv is exact in float64 and, for the near-tie values
    used here (t * inv >= 0.5), so is + 0.5: one rounding to float32 is the fma.
    """
    if fused:
        return np.trunc(np.float32(np.float64(t) * np.float64(inv) + 0.5))
    return np.trunc(np.float32(np.float32(t * inv) + np.float32(0.5)))


def q4_1_near_ties(lo, hi):
    """15 float32 values near lo + (k + 0.5) * d, FMA-sensitive where possible (row 6)."""
    lo, hi = np.float32(lo), np.float32(hi)
    d = np.float32((hi - lo) / np.float32(15))
    inv = np.float32(np.float32(1) / d)
    values = []
    for k in range(15):
        center = np.float32(lo + np.float32(d * np.float32(k + 0.5)))
        chosen = center
        for step in sorted(range(-8, 9), key=abs):
            x = center
            for _ in range(abs(step)):
                x = np.nextafter(x, np.float32(np.inf if step > 0 else -np.inf), dtype=np.float32)
            t = np.float32(x - lo)
            if lo < x < hi and q4_1_trunc(t, inv, False) != q4_1_trunc(t, inv, True):
                chosen = x
                break
        values.append(float(chosen))
    return values


def ties_tensor():
    """[8, 64]: exact rounding boundaries for each format (two blocks a row)."""
    rows = []
    # Row 0. Block a: Q8_0 with amax 127 -> d = 1, id = 1, so x * id = x and every
    # half-integer is an exact tie (roundf: away from zero, 126.5 -> 127, -0.5 -> -1).
    # Block b: amax 63.5 -> d = 0.5, id = 2, odd multiples of 0.25 become .5 ties.
    # int8 per row: row amax 127 -> scale 1, so block a's half-integers are exact
    # half-to-even ties (0.5 -> 0, 1.5 -> 2, 2.5 -> 2, 126.5 -> 126).
    a = [127.0, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 126.5, -126.5, 3.5, -3.5, 4.5, -4.5,
         10.5, -10.5, 63.5, -63.5, 100.5, -100.5, 0.0, 1.0, -1.0, 2.0, -2.0, 5.0, -5.0,
         64.0, -64.0, 126.0, -126.0, 11.5, -11.5]
    b = [63.5] + [s * 0.25 * (2 * j + 1) for j in (0, 1, 2, 3, 4, 9, 40, 126) for s in (1, -1)]
    b += [-63.25, 63.25, 0.0, 0.5, -0.5, 1.0, -1.0, 31.75, -31.75, 7.0, 17.0, -17.0, 62.0, -62.0, 0.125]
    rows.append(row(block(a), block(b)))
    # Row 1. Both blocks amax 63.5 (block a: the negative -63.5) -> Q8_0 d = 0.5, id = 2,
    # and the row's int8 scale is 63.5 / 127 = 0.5: for w = +-(0.25 + 0.5 j), w * 2 and
    # w / 0.5 are both j + 0.5 exactly, so Q8_0 (away from zero) and int8 (half to even)
    # tie on the same entries and disagree on every even j.
    a = [-63.5] + [s * (0.25 + 0.5 * j) for j in range(15) for s in (1, -1)] + [63.0]
    b = [63.5] + [s * (0.25 + 0.5 * j) for j in (20, 30, 40, 50, 60, 70, 80, 90, 100, 110, 120, 125, 126, 15, 3)
                  for s in (1, -1)] + [-0.0]
    rows.append(row(block(a), block(b)))
    # Row 2. Q4_0 with the largest magnitude -8 -> d = -8 / -8 = 1, id = 1: for a
    # half-integer x, x * id + 8.5 is an exact integer (trunc keeps it: ties round up);
    # 7.5 -> 16 is clamped to 15. Block b: -4 -> d = 0.5, id = 2, odd multiples of 0.25.
    a = [-8.0] + half_integers(-7.5, 7.5) + [float(k) for k in range(-7, 8)]
    b = [-4.0] + [x / 2 for x in half_integers(-7.5, 7.5)] + [k / 2 for k in range(-7, 8)]
    rows.append(row(block(a), block(b)))
    # Row 3. Q4_1 block a: min 0, max 15 -> d = 1, id = 1, m = 0: (x - 0) * 1 + 0.5 for
    # x = k + 0.5 is the exact integer k + 1 (ties round up). Block b: min -8, max 7 ->
    # d = 1, m = -8; x = k + 0.5 - 8 gives x - min = k + 0.5 exactly. Block b is also a
    # Q4_0 tie block (largest magnitude -8 -> d = 1; x + 8.5 = k + 1).
    a = [0.0, 15.0] + half_integers(0.5, 14.5) + [float(k) for k in range(1, 15)] + [7.25]
    b = [-8.0, 7.0] + [x - 8.0 for x in half_integers(0.5, 14.5)] + [float(k) for k in range(-7, 7)] + [0.25]
    rows.append(row(block(a), block(b)))
    # Row 4. Q4_1 with d = 0.5 (id = 2): block a min 0, max 7.5; block b min -1.5, max 6.
    # Odd multiples of 0.25 (relative to min) give (x - min) * 2 = k + 0.5 exactly.
    a = [0.0, 7.5] + [0.25 * (2 * k + 1) for k in range(15)] + [0.5 * k for k in range(1, 15)] + [3.3]
    b = [-1.5, 6.0] + [-1.5 + 0.25 * (2 * k + 1) for k in range(15)] + [-1.5 + 0.5 * k for k in range(1, 15)] + [0.1]
    rows.append(row(block(a), block(b)))
    # Row 5. Near ties, inexact id (where FMA and non-FMA may disagree). Block a: Q8_0 with
    # amax 1 -> d = 1/127 (rounded), id = 1/d (rounded); x = f32((j + 0.5) / 127), so
    # x * id is j + 0.5 give or take an ulp. Block b: Q4_0 with largest magnitude -12 ->
    # d = 1.5, id = f32(2/3); x = 1.5 * (j + 0.5) is exact, x * id is j + 0.5 +- rounding.
    a = [1.0] + [(j + 0.5) / 127 for j in range(-16, 15)]
    b = [-12.0] + [1.5 * (j + 0.5) for j in range(-8, 8)] + [1.5 * (j + 0.5) for j in range(-7, 8)]
    rows.append(row(block(a), block(b)))
    # Row 6. Near ties for Q4_1, FMA-sensitive where possible: block a min 0, max 1.1 and
    # block b min -3, max 3 (d = f32((max - min) / 15), id = f32(1 / d)). For each k in
    # 0..14 the entry is the float32 x nearest to min + (k + 0.5) * d, within 8 ulps,
    # for which trunc(fl(fl(x - min) * id) + 0.5) (gguf-py, the golden) differs from
    # trunc(fma(fl(x - min), id, 0.5)); min + (k + 0.5) * d itself where none does. Such
    # x are rare for Q4_1 (adding 0.5 to a product >= 0 never cancels; only one k of
    # block a has one); Q4_0's x * id + 8.5 cancels for negative products (row 5 b).
    a = [0.0, 1.1] + q4_1_near_ties(0.0, 1.1) + [1.1 * k / 15 for k in range(1, 15)] + [0.5]
    b = [-3.0, 3.0] + q4_1_near_ties(-3.0, 3.0) + [-3.0 + 0.4 * k for k in range(1, 15)] + [0.0]
    rows.append(row(block(a), block(b)))
    # Row 7. amax 254 in both blocks -> Q8_0 d = 2, id = 0.5 and int8 scale = 2: odd
    # integers are exact .5 ties for both (roundf away from zero, torch.round to even).
    a = [254.0] + [float(s * (2 * j + 1)) for j in (0, 1, 2, 3, 4, 5, 10, 50, 100, 125, 126) for s in (1, -1)]
    a += [0.0, 2.0, -2.0, 4.0, -4.0, 252.0, -252.0, 100.0, -100.0]
    b = [-254.0] + [float(s * (2 * j + 1)) for j in (6, 7, 8, 9, 20, 30, 60, 62, 63, 64, 120) for s in (1, -1)]
    b += [0.0, 6.0, -6.0, 8.0, -8.0, 250.0, -250.0, 1.0, -3.0]
    rows.append(row(block(a), block(b)))
    return torch.stack(rows)


def zeros_tensor():
    """[2, 64]: zero, single-nonzero and constant blocks; row 0 is all zero."""
    # Row 0: block a all +0.0, block b all -0.0 (int8: amax 0 -> scale 0, q 0; Q4_1 keeps
    # min = -0.0 as the f16 m).
    # Row 1: block a one nonzero value (-0.37 at index 13); block b the constant 0.7
    # (Q4_1: max == min -> d = 0, id = 0, every q = trunc(0.5) = 0, m = f16(0.7)).
    single = [0.0] * BLOCK
    single[13] = -0.37
    return torch.stack([
        row(block([0.0] * BLOCK), block([-0.0] * BLOCK)),
        row(block(single), block([0.7] * BLOCK)),
    ])


def signs_tensor(gen):
    """[4, 64]: sign of the largest magnitude, and +m / -m both present."""
    def with_at(fill, placed):
        values = list(fill)
        for index, value in placed.items():
            values[index] = value
        return block(values)

    fill = lambda: filler(gen, BLOCK, -2.9, 2.9)  # noqa: E731 (|filler| < every m below)
    return torch.stack([
        # Largest magnitude negative (-3 at 5: Q4_0 d = 0.375 > 0) / positive (+3 at 20:
        # Q4_0 d = -0.375 < 0).
        row(with_at(fill(), {5: -3.0}), with_at(fill(), {20: 3.0})),
        # +m before -m (+3 at 3, -3 at 10: Q4_0 takes +3, d < 0) / -m before +m
        # (-3 at 3, +3 at 10: Q4_0 takes -3, d > 0).
        row(with_at(fill(), {3: 3.0, 10: -3.0}), with_at(fill(), {3: -3.0, 10: 3.0})),
        # All negative (Q4_1 max < 0) / all positive (Q4_1 min > 0).
        row(block(filler(gen, BLOCK, -2.0, -0.5)), block(filler(gen, BLOCK, 0.25, 1.75))),
        # -m at 16 and +m at 31, both in the high nibbles (Q4_0 takes -m) / every entry
        # +-1, alternating from -1 (Q4_0: max -1, d = 0.125; +1 -> 16.5 clamps to 15).
        row(with_at(fill(), {16: -3.0, 31: 3.0}), block([(-1.0) ** (j + 1) for j in range(BLOCK)])),
    ])


def range_tensor(gen):
    """[4, 64]: huge and tiny magnitudes (f16 scales stay finite)."""
    def scaled(lo, hi, placed):
        values = filler(gen, BLOCK, lo, hi)
        for index, value in placed.items():
            values[index] = value
        return block(values)

    return torch.stack([
        # Huge: block a in [-6e4, 6e4] with amax 6e4 (Q8_0 d ~ 472, Q4_0 d = -7500,
        # Q4_1 d = 8000, m = -6e4); block b in [-6e4, 4.5e5] (Q4_0 d = -56250, Q4_1
        # d = 34000, m = -6e4; both just below the f16 max 65504 after rounding).
        row(scaled(-5.9e4, 5.9e4, {7: 6.0e4, 8: -6.0e4}), scaled(-5.9e4, 4.4e5, {0: 4.5e5, 1: -6.0e4})),
        # Tiny: amax 1e-6 (Q8_0 d = 7.9e-9 flushes to 0 in f16, Q4_0 |d| = 1.25e-7 is
        # f16-subnormal) / amax 1e-4 (Q8_0 d = 7.9e-7, f16-subnormal).
        row(scaled(-1e-6, 1e-6, {30: -1e-6}), scaled(-1e-4, 1e-4, {2: 1e-4})),
        # amax 3e-3 (Q8_0 d = 2.4e-5, f16-subnormal; Q4_0 d normal) / amax 1e-9 (every
        # f16 scale flushes to 0 while the f32 id is ~1e11: quants nonzero, dequant 0).
        row(scaled(-3e-3, 3e-3, {12: 3e-3}), scaled(-1e-9, 1e-9, {4: -1e-9})),
        # Mixed: one 3e4 among values in [-1, 1] (most quants round to the zero point) /
        # alternating 1e-5 and +-100.
        row(scaled(-1.0, 1.0, {9: 3.0e4}),
            block([(100.0 if j % 4 == 1 else -100.0) if j % 2 else 1e-5 for j in range(BLOCK)])),
    ])


def smollm2_rows():
    """Rows 0..SMOLLM2_ROWS-1 of layer 0's q_proj from the cached float32 SmolLM2."""
    path = upmix_model_cache() / SMOLLM2_DIR / "model.safetensors"
    if not path.is_file():
        sys.exit(f"make_quant_goldens: {path} is missing; run scripts/fetch-models.sh")
    with safe_open(str(path), framework="pt") as f:
        full = f.get_slice(SMOLLM2_TENSOR)
        assert full.get_dtype() == "F32" and full.get_shape() == [576, 576], full.get_shape()
        return full[:SMOLLM2_ROWS].contiguous()


def inputs():
    """Every input tensor, by name, float32."""
    gen = torch.Generator().manual_seed(0)
    normal = torch.randn(NORMAL_ROWS, 256, generator=gen, dtype=torch.float32) * 0.05
    fill_gen = torch.Generator().manual_seed(1)
    tensors = {
        "normal": normal,
        "ties": ties_tensor(),
        "zeros": zeros_tensor(),
        "signs": signs_tensor(fill_gen),
        "range": range_tensor(fill_gen),
        "smollm2_q": smollm2_rows(),
    }
    for name, t in tensors.items():
        assert t.dtype == torch.float32 and t.dim() == 2 and t.shape[1] % BLOCK == 0, name
        assert bool(torch.isfinite(t).all()), name
        tensors[name] = t.contiguous()
    return tensors


def fma_sensitive(x, key):
    """How many q of x differ between gguf-py's rounding and an FMA-contracted C build.

    Q4_0: trunc(fl(fl(x * id) + 8.5)) vs trunc(fma(x, id, 8.5)); Q4_1: the same with
    t = fl(x - min) and 0.5. The fma is emulated in float64 (the product of two float32
    is exact there, and so is the add wherever the result is near an integer).
    """
    b = x.reshape(-1, BLOCK).astype(np.float32)
    if key == "q4_0":
        pick = np.take_along_axis(b, np.abs(b).argmax(axis=-1)[:, None], axis=-1)
        d, t, add = (pick / np.float32(-8)).astype(np.float32), b, 8.5
    else:
        lo, hi = b.min(axis=-1, keepdims=True), b.max(axis=-1, keepdims=True)
        d, t, add = ((hi - lo) / np.float32(15)).astype(np.float32), (b - lo).astype(np.float32), 0.5
    with np.errstate(divide="ignore"):
        inv = np.where(d == 0, np.float32(0), np.float32(1) / d).astype(np.float32)
    separate = np.trunc((t * inv).astype(np.float32) + np.float32(add)).clip(0, 15)
    fused = np.trunc((t.astype(np.float64) * inv.astype(np.float64) + add).astype(np.float32)).clip(0, 15)
    return int((separate != fused).sum())


def int8_channel(w):
    """Weight-only int8 per output channel: (q int8 [rows, cols], scale f32 [rows])."""
    amax = w.abs().amax(dim=1)
    zero = amax == 0
    scale = torch.where(zero, torch.zeros_like(amax), amax / 127)
    safe = torch.where(zero, torch.ones_like(scale), scale)
    q = torch.round(w / safe[:, None]).clamp(-127, 127)
    q = torch.where(zero[:, None], torch.zeros_like(q), q).to(torch.int8)
    assert scale.dtype == torch.float32
    return q, scale


def f16_scales(raw, key):
    """The f16 d (and m) fields of every block, as float32, [rows, blocks(, 2)]."""
    rows, nbytes = raw.shape
    blocks = raw.reshape(rows, nbytes // BLOCK_BYTES[key], BLOCK_BYTES[key])
    width = 4 if key == "q4_1" else 2
    return blocks[..., :width].copy().view(np.float16).astype(np.float32)


def pinned_versions():
    """{package: version} pinned in scripts/fixtures-requirements.txt, checked installed."""
    pins = {}
    for line in REQUIREMENTS.read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        if "==" in line:
            name, version = line.split("==", 1)
            pins[name.strip()] = version.strip()
    versions = {}
    for name in PINNED:
        installed = importlib.metadata.version(name).split("+", 1)[0]
        assert installed == pins[name], f"{name}: installed {installed}, pinned {pins[name]}"
        versions[name] = pins[name]
    return versions


def readme(tensors, versions):
    """README.md for tests/golden/quant."""
    shapes = "\n".join(f"| `{n}` | {list(t.shape)} |" for n, t in tensors.items())
    pins = ", ".join(f"{n}=={v}" for n, v in versions.items())
    return f"""# Quantization goldens

Generated by `scripts/make_quant_goldens.py` (its docstring has the details of every
input block). Regenerate from the repository root with

    scripts/setup-fixture-env.sh && .venv-fixtures/bin/python scripts/make_quant_goldens.py

It needs the SmolLM2 model cache (`scripts/fetch-models.sh`). Pinned versions (from
`scripts/fixtures-requirements.txt`):

    {pins}

Deterministic (CPU, one thread, float32, seeded generators).

## Files

* `input.safetensors`: the F32 inputs, 2-D, every row a whole number of 32-value blocks.

  | tensor | shape |
  |---|---|
{chr(10).join('  ' + line for line in shapes.splitlines())}

  `normal` is `torch.randn` (generator seeded 0) * 0.05; `ties` puts values exactly on
  the Q8_0 / Q4_0 / Q4_1 / int8 rounding boundaries (and near them with inexact
  scales); `zeros`, `signs` and `range` are edge cases (zero and constant blocks, the
  sign of the largest magnitude and which of +m / -m wins, huge values and
  f16-subnormal or flushed-to-zero scales); `smollm2_q` is rows 0..63 of
  `model.layers.0.self_attn.q_proj.weight` of the float32 SmolLM2-135M-Instruct
  checkpoint (itself the dequantized Q4_1 GGUF).
* `q8_0.safetensors`, `q4_0.safetensors`, `q4_1.safetensors`: per input NAME,
  `NAME` (U8 `[rows, cols / 32 * B]`, B = 34 / 18 / 20 bytes a block) holds the bytes of
  `gguf.quants.quantize(x, GGMLQuantizationType.Q8_0 / Q4_0 / Q4_1)`, and `NAME.dequant`
  (F32, the input's shape) holds `gguf.quants.dequantize` of those bytes.
* `int8_channel.safetensors`: weight-only int8 per output row, torch float32:
  `scale = w.abs().amax(1) / 127`, `q = round(w / scale[:, None]).clamp(-127, 127)` with
  round half to even; rows with amax 0 get scale 0 and q 0. `NAME.q` (I8, the input's
  shape) and `NAME.scale` (F32 `[rows]`).

The quantized goldens are gguf-py's numpy results: every product and add rounded
separately (no fused multiply-add).
"""


def main():
    """Compute the goldens and write tests/golden/quant/."""
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    versions = pinned_versions()
    tensors = inputs()

    quantized = {key: {} for key in QTYPES}
    for name, t in tensors.items():
        x = t.numpy()
        rows, cols = x.shape
        for key, qtype in QTYPES.items():
            with np.errstate(over="raise", invalid="raise"):
                raw = gguf.quants.quantize(x, qtype)
            raw = np.ascontiguousarray(raw.astype(np.uint8, copy=False))
            assert raw.shape == (rows, cols // BLOCK * BLOCK_BYTES[key]), (name, key, raw.shape)
            assert np.isfinite(f16_scales(raw, key)).all(), (name, key)
            deq = np.ascontiguousarray(gguf.quants.dequantize(raw, qtype).astype(np.float32, copy=False))
            assert deq.shape == x.shape and np.isfinite(deq).all(), (name, key)
            quantized[key][name] = raw
            quantized[key][f"{name}.dequant"] = deq

    int8 = {}
    for name, t in tensors.items():
        q, scale = int8_channel(t)
        int8[f"{name}.q"] = q.contiguous()
        int8[f"{name}.scale"] = scale.contiguous()

    OUT.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(OUT / "input.safetensors"))
    for key, out in quantized.items():
        np_save_file(out, str(OUT / f"{key}.safetensors"))
    save_file(int8, str(OUT / "int8_channel.safetensors"))
    # Keep the section scripts/make_llama_cpp_quant_goldens.py appends (its own files).
    path = OUT / "README.md"
    kept = ""
    if path.exists():
        old = path.read_text(encoding="utf-8")
        marker = "## llama.cpp quantizer goldens"
        if marker in old:
            kept = "\n" + old[old.index(marker):]
    path.write_text(readme(tensors, versions) + kept, encoding="utf-8")

    # The files read back as written.
    back = load_file(str(OUT / "input.safetensors"))
    assert sorted(back) == sorted(tensors)
    assert all(torch.equal(back[k], v) for k, v in tensors.items())
    for key, out in quantized.items():
        back = np_load_file(str(OUT / f"{key}.safetensors"))
        assert sorted(back) == sorted(out), key
        assert all(back[k].dtype == v.dtype and np.array_equal(back[k], v) for k, v in out.items()), key
    back = load_file(str(OUT / "int8_channel.safetensors"))
    assert sorted(back) == sorted(int8)
    assert all(back[k].dtype == v.dtype and torch.equal(back[k], v) for k, v in int8.items())

    # Sanity of the tie rows: the ties are where the formats' rounding rules differ.
    ties_q = int8["ties.q"]
    assert ties_q[0, 1:4].tolist() == [0, 2, 2], ties_q[0, :8]          # half to even
    q8 = quantized["q8_0"]["ties"].reshape(8, 2, 34)[0, 0, 2:].view(np.int8)
    assert q8[1:4].tolist() == [1, 2, 3] and q8[7] == 127, q8           # half away from zero
    assert float(int8["zeros.scale"][0]) == 0.0 and not bool(int8["zeros.q"][0].any())

    sensitive = {name: {key: fma_sensitive(t.numpy(), key) for key in ("q4_0", "q4_1")}
                 for name, t in tensors.items()}
    assert all(n > 0 for n in sensitive["ties"].values()), sensitive["ties"]

    total = 0
    print(f"wrote {OUT} (gguf {versions['gguf']}, torch {versions['torch']}, "
          f"numpy {versions['numpy']}, safetensors {versions['safetensors']})")
    for path in sorted(OUT.iterdir()):
        size = path.stat().st_size
        total += size
        print(f"  {path.name}: {size} bytes")
    print(f"  total: {total} bytes")
    print("quants an FMA-contracted C build would round differently (Q4_0, Q4_1): "
          + ", ".join(f"{n} {v['q4_0']}/{v['q4_1']}" for n, v in sensitive.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())

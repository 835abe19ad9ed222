#!/usr/bin/env python3
"""Quantize upmix's tiny f32 GGUF with llama.cpp's C quantizer; keep the bytes as goldens.

What it does (from the repository root):

1. `target/release/upmix run tests/golden/gguf_out/tiny_f32.ron --overwrite` writes
   tests/golden/gguf_out/tiny_f32.gguf (the tiny Llama fixture, every tensor F32); the
   file is moved at once into a temporary directory (no .gguf is left in tests/golden).
   Its SHA-256 must be the "sha256" of tests/golden/gguf_out/tiny_f32.json (the Rust
   test checks that upmix still writes those bytes), or the script stops.
2. For each of Q8_0, Q4_0, Q4_1, llama.cpp quantizes that file through
   llama-cpp-python's binding of llama_model_quantize:
       params = llama_model_quantize_default_params()
       params.ftype = LLAMA_FTYPE_MOSTLY_Q8_0 / Q4_0 / Q4_1   (7 / 2 / 3)
       params.pure = True; params.nthread = 1; params.allow_requantize = False
   `pure` turns off llama.cpp's per-tensor type choices (its mixes, and Q6_K for
   output.weight), so every 2-D tensor, token_embd.weight and output.weight included,
   gets the requested type; the 1-D norms stay F32. The script checks this with
   gguf.GGUFReader. Without an imatrix, llama.cpp's ggml_quantize_chunk calls
   quantize_row_q8_0_ref / q4_0_ref / q4_1_ref of ggml-quants.c (in libggml-base).
3. Writes tests/golden/quant/llama_cpp_q8_0.safetensors, llama_cpp_q4_0.safetensors,
   llama_cpp_q4_1.safetensors: per quantized 2-D tensor, keyed by its GGUF name (e.g.
   "blk.0.attn_q.weight"), the bytes of the file as U8 [rows, bytes_per_row] (rows =
   ne[1], bytes_per_row = ne[0] / 32 * 34 / 18 / 20). attn_q / attn_k rows are in the
   GGUF (llama-permuted) order, as upmix writes them. No safetensors metadata (safetensors
   writes it in a random order); the README section records the source's SHA-256.
4. Compares those bytes, block by block, with gguf.quants.quantize of the same f32
   tensors (GGUFReader data, row-major [ne[1], ne[0]]) and prints, per type, how many
   blocks differ; for each differing block the tensor, row, block, both byte strings
   and the 32 float inputs. The script does not fail on a difference: the goldens are
   llama.cpp's bytes. Expected 0: ggml-base is built without -mfma (see the FMA note
   in scripts/make_quant_goldens.py), so its products and adds round separately, as
   numpy's do.
5. Rewrites its own section ("## llama.cpp quantizer goldens") at the end of
   tests/golden/quant/README.md (scripts/make_quant_goldens.py keeps it when it rewrites
   that README).

How to run (the release upmix must be built: cargo build --release --bin upmix):

    scripts/setup-fixture-env.sh && .venv-fixtures/bin/python scripts/make_llama_cpp_quant_goldens.py

Pinned versions (scripts/fixtures-requirements.txt; the script checks the installed
ones): llama-cpp-python==0.3.36 (built from source by scripts/setup-fixture-env.sh),
gguf==0.19.0, numpy==2.4.6, safetensors==0.8.0. Deterministic: one quantize thread, no
randomness.
"""

import ctypes
import hashlib
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import gguf  # noqa: E402
import gguf.quants  # noqa: E402
import llama_cpp  # noqa: E402
import numpy as np  # noqa: E402
from safetensors.numpy import load_file as np_load_file  # noqa: E402
from safetensors.numpy import save_file as np_save_file  # noqa: E402

from make_fixtures import GOLDEN, REPO_ROOT  # noqa: E402

OUT = GOLDEN / "quant"
GGUF_OUT = GOLDEN / "gguf_out"
SOURCE = "tiny_f32"
REQUIREMENTS = REPO_ROOT / "scripts" / "fixtures-requirements.txt"
PINNED = ("llama-cpp-python", "gguf", "numpy", "safetensors")
SECTION = "## llama.cpp quantizer goldens"

BLOCK = 32
QTYPES = {  # key: (llama ftype, GGML type, bytes a block)
    "q8_0": (llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0, gguf.GGMLQuantizationType.Q8_0, 34),
    "q4_0": (llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0, gguf.GGMLQuantizationType.Q4_0, 18),
    "q4_1": (llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_1, gguf.GGMLQuantizationType.Q4_1, 20),
}
assert [v[0] for v in QTYPES.values()] == [7, 2, 3]

LOG = []


@llama_cpp.llama_log_callback
def _log(level, text, user_data):
    """Collect llama.cpp's log (printed only when a quantization fails)."""
    LOG.append(text.decode("utf-8", "replace") if text else "")


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
    assert llama_cpp.__version__ == versions["llama-cpp-python"], llama_cpp.__version__
    return versions


def sha256(path):
    """Hex SHA-256 of a file."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_f32_gguf(work):
    """Run upmix on tiny_f32.ron and move the GGUF it writes into work; return its path."""
    target = Path(os.environ.get("CARGO_TARGET_DIR", REPO_ROOT / "target"))
    upmix = target / "release" / "upmix"
    if not upmix.is_file():
        sys.exit(f"make_llama_cpp_quant_goldens: {upmix} is missing; cargo build --release --bin upmix")
    written = GGUF_OUT / f"{SOURCE}.gguf"
    moved = work / written.name
    try:
        subprocess.run([str(upmix), "run", str(GGUF_OUT / f"{SOURCE}.ron"), "--overwrite"],
                       cwd=REPO_ROOT, check=True, stdout=subprocess.DEVNULL)
        shutil.move(str(written), str(moved))
    finally:
        if written.exists():
            written.unlink()
    return moved


def quantize(src, dst, ftype):
    """llama_model_quantize(src, dst) with ftype, pure, one thread; fails on a nonzero rc."""
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.pure = True
    params.nthread = 1
    params.allow_requantize = False
    LOG.clear()
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if rc != 0:
        sys.stderr.write("".join(LOG))
        sys.exit(f"make_llama_cpp_quant_goldens: llama_model_quantize(ftype {ftype}) returned {rc}")


def rows_of(tensor):
    """The tensor's data as a row-major 2-D array [ne[1] * ..., row] (values or bytes)."""
    ne = [int(n) for n in tensor.shape]
    return np.ascontiguousarray(tensor.data).reshape(int(np.prod(ne[1:])), -1)


def compare(name, x, got, qtype, block_bytes):
    """Differing blocks between llama.cpp's bytes and gguf-py's quantize(x); prints each."""
    want = np.ascontiguousarray(gguf.quants.quantize(x, qtype).astype(np.uint8, copy=False))
    assert want.shape == got.shape, (name, want.shape, got.shape)
    rows = x.shape[0]
    g = got.reshape(rows, -1, block_bytes)
    w = want.reshape(rows, -1, block_bytes)
    diff = np.argwhere((g != w).any(axis=-1))
    for r, b in diff:
        print(f"    {name} row {r} block {b}:\n"
              f"      llama.cpp {g[r, b].tobytes().hex()}\n"
              f"      gguf-py   {w[r, b].tobytes().hex()}\n"
              f"      x = {[float(v) for v in x[r, b * BLOCK:(b + 1) * BLOCK]]}")
    return len(diff), g.shape[0] * g.shape[1]


def readme_section(source_sha, versions):
    """The README.md section describing the llama.cpp goldens."""
    return f"""{SECTION}

Generated by `scripts/make_llama_cpp_quant_goldens.py` (`scripts/make_quant_goldens.py`
keeps this section when it rewrites the README):

    scripts/setup-fixture-env.sh && .venv-fixtures/bin/python scripts/make_llama_cpp_quant_goldens.py

It needs the release upmix (`cargo build --release --bin upmix`). Pinned versions
(from `scripts/fixtures-requirements.txt`):

    llama-cpp-python=={versions['llama-cpp-python']} (built from source), gguf=={versions['gguf']}, numpy=={versions['numpy']}, safetensors=={versions['safetensors']}

* `llama_cpp_q8_0.safetensors`, `llama_cpp_q4_0.safetensors`,
  `llama_cpp_q4_1.safetensors`: upmix writes `tests/golden/gguf_out/{SOURCE}.gguf`
  (every tensor F32; SHA-256 `{source_sha}`,
  the `sha256` of `tests/golden/gguf_out/{SOURCE}.json`), and llama.cpp's C quantizer
  (`llama_model_quantize`, ftype MOSTLY_Q8_0 / Q4_0 / Q4_1, `pure`, one thread, i.e.
  ggml's `quantize_row_*_ref`) quantizes it. Each file holds, per 2-D tensor of the GGUF
  keyed by its GGUF name (`token_embd.weight`, `blk.N.attn_q.weight`, ...,
  `output.weight`), the tensor's bytes as U8 `[rows, cols / 32 * B]` (B = 34 / 18 / 20),
  rows in the GGUF's order (attn_q / attn_k llama-permuted, as upmix writes them). The
  script also compares the bytes with `gguf.quants.quantize` of the f32 tensors and
  prints how many blocks differ.
"""


def update_readme(section):
    """Replace (or append) this script's section at the end of tests/golden/quant/README.md."""
    path = OUT / "README.md"
    text = path.read_text(encoding="utf-8")
    if SECTION in text:
        text = text[:text.index(SECTION)]
    path.write_text(text.rstrip("\n") + "\n\n" + section, encoding="utf-8")


def main():
    """Quantize with llama.cpp, write the goldens, compare with gguf-py."""
    versions = pinned_versions()
    llama_cpp.llama_log_set(_log, ctypes.c_void_p(0))
    expected_sha = json.loads((GGUF_OUT / f"{SOURCE}.json").read_text(encoding="utf-8"))["sha256"]
    summary = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        src = write_f32_gguf(work)
        source_sha = sha256(src)
        if source_sha != expected_sha:
            sys.exit(f"make_llama_cpp_quant_goldens: upmix wrote {source_sha}, "
                     f"tests/golden/gguf_out/{SOURCE}.json has {expected_sha}")
        f32 = {t.name: t for t in gguf.GGUFReader(src).tensors}
        assert all(t.tensor_type == gguf.GGMLQuantizationType.F32 for t in f32.values())
        matrices = [n for n, t in f32.items() if len(t.shape) == 2]

        for key, (ftype, qtype, block_bytes) in QTYPES.items():
            dst = work / f"{SOURCE}.{key}.gguf"
            quantize(src, dst, ftype)
            tensors = {t.name: t for t in gguf.GGUFReader(dst).tensors}
            assert sorted(tensors) == sorted(f32), key
            expected = {n: qtype if n in matrices else gguf.GGMLQuantizationType.F32 for n in f32}
            wrong = {n: t.tensor_type.name for n, t in tensors.items() if t.tensor_type != expected[n]}
            out, differing, blocks = {}, 0, 0
            print(f"{key}: llama_model_quantize -> {dst.stat().st_size} bytes, sha256 {sha256(dst)}")
            if wrong:
                print(f"  NOT the requested type: {wrong}")
            for name in matrices:
                t = tensors[name]
                assert [int(n) for n in t.shape] == [int(n) for n in f32[name].shape], name
                if t.tensor_type != qtype:
                    continue
                got = rows_of(t).astype(np.uint8, copy=False)
                x = rows_of(f32[name]).astype(np.float32, copy=False)
                assert got.shape == (x.shape[0], x.shape[1] // BLOCK * block_bytes), (name, got.shape)
                out[name] = np.ascontiguousarray(got)
                d, n = compare(name, x, got, qtype, block_bytes)
                differing += d
                blocks += n
            path = OUT / f"llama_cpp_{key}.safetensors"
            np_save_file(out, str(path))  # no metadata: its order is not deterministic
            back = np_load_file(str(path))
            assert sorted(back) == sorted(out) and all(
                back[k].dtype == np.uint8 and np.array_equal(back[k], v) for k, v in out.items()), key
            summary.append((key, path, len(out), len(matrices), not wrong, differing, blocks))

    update_readme(readme_section(source_sha, versions))
    print(f"source {SOURCE}.gguf sha256 {source_sha} (matches {SOURCE}.json)")
    for key, path, n, total, ok, differing, blocks in summary:
        print(f"  {path.name}: {path.stat().st_size} bytes, {n}/{total} 2-D tensors "
              f"{'all ' + key.upper() if ok else 'NOT all ' + key.upper()}; "
              f"blocks differing from gguf-py: {differing}/{blocks}")
    print(f"  README.md: {(OUT / 'README.md').stat().st_size} bytes")
    return 0 if all(s[4] for s in summary) else 1


if __name__ == "__main__":
    sys.exit(main())

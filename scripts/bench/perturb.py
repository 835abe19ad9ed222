"""Writes a seeded perturbation of a float32 safetensors checkpoint directory.

Every tensor gets Gaussian noise of `scale` times its own standard deviation, so the
result is a distinct model of the same architecture (a stand-in for a fine-tuned branch
in the upcycling benchmark). Non-weight files (config, tokenizer) are copied.

Usage: python perturb.py SRC_DIR DST_DIR SEED [SCALE]
Needs numpy and safetensors (the gguf venv from scripts/fetch-models.sh has both).
"""

import shutil
import sys
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file, save_file


def main() -> None:
    src, dst, seed = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
    scale = float(sys.argv[4]) if len(sys.argv) > 4 else 0.01
    rng = np.random.default_rng(seed)
    tmp = dst.with_name(dst.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for f in sorted(src.iterdir()):
        if f.suffix == ".safetensors":
            tensors = load_file(f)
            out = {}
            for name in sorted(tensors):
                t = tensors[name].astype(np.float32)
                noise = rng.standard_normal(t.shape, dtype=np.float32)
                out[name] = t + noise * np.float32(scale * float(t.std()))
            save_file(out, tmp / f.name, metadata={"format": "pt"})
        elif f.is_file():
            shutil.copy(f, tmp / f.name)
    shutil.rmtree(dst, ignore_errors=True)
    tmp.rename(dst)


if __name__ == "__main__":
    main()

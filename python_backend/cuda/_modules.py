"""Load the ``.cu`` sources of this folder as ``cupy.RawModule`` objects, once per process."""
from __future__ import annotations

import functools
from pathlib import Path

import cupy as cp

SOURCE_DIR = Path(__file__).resolve().parent


@functools.lru_cache(maxsize=None)
def module(name: str, options: tuple[str, ...] = ()) -> cp.RawModule:
    """``<name>.cu`` compiled with NVRTC; cached per (name, options), so per process, never per call.

    CuPy compiles lazily on the first kernel lookup and also caches the binary on disk.
    """
    path = SOURCE_DIR / f"{name}.cu"
    if not path.is_file():
        raise FileNotFoundError(f"no CUDA source {path}")
    # Inline the shared header rather than pass -I: CuPy's on-disk cache is keyed by the source
    # text, so an edit of common.cuh must change it.
    code = path.read_text().replace('#include "common.cuh"', (SOURCE_DIR / "common.cuh").read_text())
    return cp.RawModule(code=code, options=("--std=c++17",) + tuple(options))


@functools.lru_cache(maxsize=None)
def kernel(module_name: str, function: str, options: tuple[str, ...] = ()) -> cp.RawKernel:
    return module(module_name, options).get_function(function)


# IoU, clipping and rescaling must round each fp32 step like NumPy: no fused multiply-add.
EXACT = ("--fmad=false",)

THREADS = 256


def blocks(n: int, threads: int = THREADS) -> int:
    return max(1, -(-int(n) // threads))

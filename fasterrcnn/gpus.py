"""The GPUs a server started from here sees, through ``nvidia-smi`` (no CUDA library needed).

Triton numbers GPUs by CUDA ordinal.  CUDA orders them fastest first unless
``CUDA_DEVICE_ORDER=PCI_BUS_ID``, while nvidia-smi orders them by PCI bus; the launcher
(:mod:`fasterrcnn.server`) and the Docker image set ``CUDA_DEVICE_ORDER=PCI_BUS_ID`` so that a
GPU id means the same GPU to Triton, to ``--gpus`` and to nvidia-smi.
"""
from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass


class GpuError(RuntimeError):
    """nvidia-smi is missing or failed; the message says what to do."""


@dataclass(frozen=True)
class Gpu:
    index: int
    name: str


def list_gpus() -> list[Gpu]:
    """Every GPU nvidia-smi lists, in its order; [] where nvidia-smi is absent (a CPU machine).

    Raises :class:`GpuError` when nvidia-smi is there but fails (a driver problem)."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return []
    try:
        proc = subprocess.run([smi, "--query-gpu=index,name", "--format=csv,noheader"], capture_output=True,
                              text=True, timeout=60)
    except subprocess.TimeoutExpired:
        raise GpuError("nvidia-smi did not answer within 60 s") from None
    if proc.returncode != 0:
        raise GpuError(f"nvidia-smi failed ({proc.returncode}): {(proc.stdout + proc.stderr).strip()[-300:]}")
    gpus = []
    for line in filter(None, (ln.strip() for ln in proc.stdout.splitlines())):
        index, _, name = line.partition(",")
        gpus.append(Gpu(int(index), name.strip()))
    return gpus


def visible_gpu_ids() -> list[int]:
    """CUDA ids (0..n-1) of the GPUs a process started here sees: as many as CUDA_VISIBLE_DEVICES
    names where it is set (CUDA stops at the first invalid entry such as -1), else as many as
    nvidia-smi lists."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        count = 0
        for entry in (e.strip() for e in visible.split(",")):
            if not entry or entry.startswith("-"):
                break
            count += 1
        return list(range(count))
    return list(range(len(list_gpus())))

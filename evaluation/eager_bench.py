"""torchvision's fasterrcnn_resnet50_fpn run eagerly on its own, no server: "torchvision's best",
the figure the served ensemble's throughput goals are ratios of.

Only ``model(images)`` is timed, up to ``torch.cuda.synchronize()``: the images are already on the
device as float tensors (torchvision's own transform resizes and normalizes them inside the call),
so neither decoding nor the upload counts against torchvision.  Precisions, with the same TF32
setting as the ensemble's:

- ``fp32``: TF32 off for matmuls and cuDNN convolutions (the ensemble's fp32 turns it off too);
- ``tf32``: fp32 weights with TF32 on for both;
- ``fp16``: ``torch.autocast`` float16 around the call (torchvision's usual mixed precision), TF32 off.

Each precision and batch size is timed with cuDNN's autotuner off and on (every input has the same
size, where autotuning pays), and under each of ``memory_caps`` (the caching allocator's cap in
GiB, or none: under a cap cuDNN passes over plans whose workspace does not fit, which in fp32
changes which plans run; the served steps run under caps, so torchvision gets them too); the goals
take the best row.  On a GPU each (precision, autotuner, cap) runs in a process of its own: cuDNN
keeps the plan it chose for a shape for the rest of the process, so a variant run after another
would reuse the other's plans.
"""
from __future__ import annotations

import multiprocessing
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import numpy as np

PRECISIONS = ("fp32", "tf32", "fp16")


@contextmanager
def torch_flags(tf32: bool, cudnn_benchmark: bool):
    """TF32 (matmuls and cuDNN) and cuDNN's autotuner set for the block, restored after it."""
    import torch

    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = tf32
    torch.backends.cudnn.benchmark = cudnn_benchmark
    try:
        yield
    finally:
        (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
         torch.backends.cudnn.benchmark) = saved


def batch_tensors(images: list[np.ndarray], batch: int, device) -> list:
    """``batch`` images (``images`` cycled) as ``[3, H, W]`` float tensors in [0, 1] on ``device``."""
    import torch

    return [torch.from_numpy(np.array(images[i % len(images)], copy=True)).to(device).permute(2, 0, 1).float() / 255
            for i in range(batch)]


def median_ms(fn, device, warmup: int, repeat: int) -> float:
    """Median wall-clock ms of ``fn()`` up to the device's synchronize, after ``warmup`` calls."""
    import torch

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def eager_rows(weights: Path, images: list[np.ndarray], precisions=("fp32", "fp16"), batches=(8, 16),
               device: str = "cuda", warmup: int = 3, repeat: int = 10, memory_caps=(None,)) -> list[dict]:
    """One row per precision, cuDNN autotuner setting, memory cap and batch size: ``precision``,
    ``batch``, ``cudnn_benchmark``, ``memory_cap_gib`` (None: no cap), ``ms_per_call``,
    ``ms_per_image``, ``images_per_s``.  ``weights``: a state_dict
    (``exporters.loading.checkpoint_model``); ``images``: decoded ``[H, W, 3]`` uint8.  On a CPU
    device the autotuner and cap rows are left out (cuDNN is a GPU library), fp16 runs in fp32 and
    everything runs in this process."""
    for p in precisions:
        if p not in PRECISIONS:
            raise ValueError(f"eager precision must be one of {PRECISIONS}, got {p!r}")
    if device == "cpu":
        return _variant_rows(weights, images, "fp32", precisions, False, None, batches, device, warmup, repeat)
    rows = []
    for precision in precisions:
        for cudnn_benchmark in (False, True):
            for cap in memory_caps:
                with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
                    rows += pool.submit(_variant_rows, weights, images, precision, (precision,), cudnn_benchmark, cap,
                                        batches, device, warmup, repeat).result()
    return rows


def _variant_rows(weights, images, precision, labels, cudnn_benchmark, cap_gib, batches, device, warmup,
                  repeat) -> list[dict]:
    """The rows of one variant, computed in ``precision`` and labelled with each of ``labels``."""
    import torch

    from exporters.loading import checkpoint_model

    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:  # the allocator's cap takes an indexed device
        dev = torch.device("cuda", torch.cuda.current_device())
    if cap_gib is not None:
        total = torch.cuda.get_device_properties(dev).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, cap_gib * 2**30 / total), dev)
    model = checkpoint_model(weights).to(dev).eval()
    rows = []
    try:
        fp16 = precision == "fp16" and dev.type == "cuda"
        with torch_flags(precision == "tf32", cudnn_benchmark):
            for batch in batches:
                xs = batch_tensors(images, batch, dev)

                def call():
                    with torch.no_grad(), torch.autocast(dev.type, dtype=torch.float16, enabled=fp16):
                        model(xs)

                ms = median_ms(call, dev, warmup, repeat)
                rows += [{"model": "torchvision_eager", "precision": label, "batch": batch,
                          "cudnn_benchmark": cudnn_benchmark, "memory_cap_gib": cap_gib, "ms_per_call": round(ms, 3),
                          "ms_per_image": round(ms / batch, 3), "images_per_s": round(1e3 * batch / ms, 3)}
                         for label in labels]
    finally:
        del model
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    return rows

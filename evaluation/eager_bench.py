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
size, where autotuning pays); the goals take the best row.
"""
from __future__ import annotations

import statistics
import time
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
               device: str = "cuda", warmup: int = 3, repeat: int = 10) -> list[dict]:
    """One row per precision, batch size and cuDNN autotuner setting: ``precision``, ``batch``,
    ``cudnn_benchmark``, ``ms_per_call``, ``ms_per_image``, ``images_per_s``.  ``weights``: a
    state_dict (``exporters.loading.checkpoint_model``); ``images``: decoded ``[H, W, 3]`` uint8.
    On a CPU device the autotuner rows are left out (cuDNN is a GPU library) and fp16 runs in fp32."""
    import torch

    from exporters.loading import checkpoint_model

    for p in precisions:
        if p not in PRECISIONS:
            raise ValueError(f"eager precision must be one of {PRECISIONS}, got {p!r}")
    dev = torch.device(device)
    model = checkpoint_model(weights).to(dev).eval()
    rows = []
    try:
        for precision in precisions:
            fp16 = precision == "fp16" and dev.type == "cuda"
            for cudnn_benchmark in ((False, True) if dev.type == "cuda" else (False,)):
                with torch_flags(precision == "tf32", cudnn_benchmark):
                    for batch in batches:
                        xs = batch_tensors(images, batch, dev)

                        def call():
                            with torch.no_grad(), torch.autocast(dev.type, dtype=torch.float16, enabled=fp16):
                                model(xs)

                        ms = median_ms(call, dev, warmup, repeat)
                        rows.append({"model": "torchvision_eager", "precision": precision, "batch": batch,
                                     "cudnn_benchmark": cudnn_benchmark, "ms_per_call": round(ms, 3),
                                     "ms_per_image": round(ms / batch, 3), "images_per_s": round(1e3 * batch / ms, 3)})
    finally:
        del model
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    return rows

"""GPU timers and the card's own ceilings (fp16 matmul rate, copy bandwidth), measured where the
benchmark runs so that no figure of another card is assumed.

Every timer runs ``fn`` ``warmup`` times, then ``repeat`` times, and returns the median in ms.
"""
from __future__ import annotations

import statistics


def cuda_event_ms(fn, warmup: int = 3, repeat: int = 10) -> float:
    """GPU time of ``fn`` between two torch CUDA events on the current stream."""
    import torch

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeat):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def cupy_event_ms(fn, inputs: list, warmup: int, repeat: int) -> float:
    """GPU time of ``fn(inputs[i % len(inputs)])`` between two CuPy events: each run takes the next
    input set, so that no run reuses the previous run's inputs from the cache."""
    import cupy as cp

    for i in range(warmup):
        fn(inputs[i % len(inputs)])
    cp.cuda.Device().synchronize()
    times = []
    for i in range(repeat):
        start, end = cp.cuda.Event(), cp.cuda.Event()
        start.record()
        fn(inputs[i % len(inputs)])
        end.record()
        end.synchronize()
        times.append(cp.cuda.get_elapsed_time(start, end))
    return statistics.median(times)


def fp16_matmul_tflops(n: int = 8192) -> float:
    """fp16 matmul rate of the current CUDA device, ``n`` x ``n`` x ``n`` (2 n^3 FLOP per call), TFLOP/s."""
    import torch

    a = torch.randn(n, n, device="cuda", dtype=torch.float16)
    b = torch.randn(n, n, device="cuda", dtype=torch.float16)
    ms = cuda_event_ms(lambda: a @ b, warmup=3, repeat=10)
    return 2 * n ** 3 / (ms * 1e-3) / 1e12


def copy_gbps(nbytes: int = 1 << 30) -> float:
    """On-GPU copy bandwidth of the current CuPy device: bytes read plus bytes written per second by
    a device-to-device copy of ``nbytes``, GB/s."""
    import cupy as cp

    src = cp.zeros(nbytes, cp.uint8)
    dst = cp.empty_like(src)
    ms = cupy_event_ms(lambda _: cp.copyto(dst, src), [None], warmup=3, repeat=10)
    return 2 * nbytes / (ms * 1e-3) / 1e9


def model_gflop(model, image_size: tuple[int, int]) -> float:
    """FLOPs of ``model([image])`` (a torchvision detection model, eval mode) on one random image of
    ``image_size`` (height, width) on the model's device, by torch's flop counter, in GFLOP."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    device = next(model.parameters()).device
    x = torch.rand(3, *image_size, device=device)
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model.eval()([x])
    return counter.get_total_flops() / 1e9

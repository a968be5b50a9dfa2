"""CUDA kernel time of one call, grouped by kind of kernel (torch.profiler), to see where a
network's GPU time goes."""
from __future__ import annotations

# (group, substrings of CUDA kernel names), first match wins; the rest is "other"
KERNEL_GROUPS = (
    ("upsample / max pool", ("upsample", "max_pool")),
    ("convolution (cuDNN / implicit GEMM)", ("conv", "xmma", "implicit", "cudnn", "sm90_", "sm80_", "gemm", "nhwc")),
    ("layout transforms (NCHW <-> NHWC)", ("transpose", "nchwToNhwc", "nhwcToNchw", "permute")),
    ("top-k / sort", ("topk", "sort", "radix", "gatherTopK", "bitonic")),
    ("indexing (gather / scatter)", ("index", "scatter", "gather")),
    ("element-wise (masks, ReLU, add, casts, copies)", ("elementwise", "vectorized", "unrolled", "copy")),
)


def kernel_group(name: str) -> str:
    """The :data:`KERNEL_GROUPS` group of a CUDA kernel's name."""
    return next((g for g, keys in KERNEL_GROUPS if any(k.lower() in name.lower() for k in keys)), "other")


def kernels_by_group(fn, top: int = 15) -> list[tuple[str, float, int]]:
    """Run ``fn`` once under torch.profiler: [(group, ms, kernels)] by descending time, then the
    ``top`` kernels by name, indented, as [("  name", ms, launches)]."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    groups: dict[str, list[float]] = {}
    by_name: dict[str, list[float]] = {}
    for e in prof.events():
        if e.device_type != torch.autograd.DeviceType.CUDA:
            continue
        ms = e.time_range.elapsed_us() / 1e3
        groups.setdefault(kernel_group(e.name), []).append(ms)
        by_name.setdefault(e.name, []).append(ms)
    rows = sorted(((g, sum(v), len(v)) for g, v in groups.items()), key=lambda r: -r[1])
    names = sorted(((n, sum(v), len(v)) for n, v in by_name.items()), key=lambda r: -r[1])[:top]
    return rows + [("  " + n[:110], ms, c) for n, ms, c in names]

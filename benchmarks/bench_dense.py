"""Time the dense networks alone on the GPU, outside Triton: where does the rpn's time go?

Compares, at batch 1 and 8 on the 800x1344 canvas (seeded random weights, 91 classes):
  * torchvision's own backbone + FPN + RPN head (no extent masks, no top-k), eager;
  * our RpnNetwork eager (extent masks + anchors + top-k), fp32;
  * the exported TorchScript traces (fp32, fp16) as the Triton torch runner runs them
    (python_backend/torch_runtime.py): as traced, channels last, channels last + CUDA graphs;
  * the header trace at 1000 RoIs per image;
and first, the fp16 rpn's CUDA kernel time at batch 8 grouped by kind (torch.profiler), as the
runner serves it (channels last, torch.jit.optimize_for_inference) but without CUDA graphs.
Median of CUDA-event timings after warm-up.  Reports ms per image and the share of the dense
floor: 355 GFLOP per image at the measured 760 TFLOP/s fp16 (ENVIRONMENT.md) = 0.47 ms.

    python benchmarks/bench_dense.py [--profile-only]      # about 3 minutes on an H100 (1 with --profile-only)
"""
from __future__ import annotations

import dataclasses
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

FLOOR_MS = 355e9 / 760e12 * 1e3


def _variants():
    from python_backend.torch_runtime import RuntimeOptions

    return [RuntimeOptions(), RuntimeOptions(channels_last=True), RuntimeOptions(channels_last=True, cuda_graphs=True)]


def _describe(options) -> str:
    if not options.channels_last and not options.cuda_graphs:
        return "as traced (NCHW)"
    return " + ".join(n for n, on in (("channels last", options.channels_last), ("CUDA graphs", options.cuda_graphs)) if on)


def time_ms(fn, warmup=3, repeat=10) -> float:
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


KERNEL_GROUPS = (  # (group, substrings of CUDA kernel names), first match wins
    ("upsample / max pool", ("upsample", "max_pool")),
    ("convolution (cuDNN / implicit GEMM)", ("conv", "xmma", "implicit", "cudnn", "sm90_", "sm80_", "gemm", "nhwc")),
    ("layout transforms (NCHW <-> NHWC)", ("transpose", "nchwToNhwc", "nhwcToNchw", "permute")),
    ("top-k / sort", ("topk", "sort", "radix", "gatherTopK", "bitonic")),
    ("indexing (gather / scatter)", ("index", "scatter", "gather")),
    ("element-wise (masks, ReLU, add, casts, copies)", ("elementwise", "vectorized", "unrolled", "copy")),
)


def profile_rpn(path: str, dims, batch: int, options, x, sizes) -> list[tuple[str, float, int]]:
    """CUDA kernel time of one rpn call (eager, so that kernels are visible), grouped by kind:
    [(group, ms, kernels)], plus the call's wall time as ("wall (CUDA events)", ms, 0)."""
    from torch.profiler import ProfilerActivity, profile

    from python_backend.torch_runtime import TorchNetwork

    net = TorchNetwork(path, torch.device("cuda"), dims, batch, dataclasses.replace(options, cuda_graphs=False))
    net.warm_up()
    wall = time_ms(lambda: net([x, sizes]))
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        net([x, sizes])
        torch.cuda.synchronize()
    groups: dict[str, list[float]] = {}
    names: dict[str, list[float]] = {}
    for e in prof.events():
        if e.device_type != torch.autograd.DeviceType.CUDA:
            continue
        name = e.name
        group = next((g for g, keys in KERNEL_GROUPS if any(k.lower() in name.lower() for k in keys)), "other")
        groups.setdefault(group, []).append(e.time_range.elapsed_us() / 1e3)
        names.setdefault(name, []).append(e.time_range.elapsed_us() / 1e3)
    rows = sorted(((g, sum(v), len(v)) for g, v in groups.items()), key=lambda r: -r[1])
    top = sorted(((n, sum(v), len(v)) for n, v in names.items()), key=lambda r: -r[1])[:15]
    return rows + [("wall (CUDA events)", wall, 0)] + [("  " + n[:110], ms, c) for n, ms, c in top]


def print_profile(rows, batch: int) -> None:
    print(f"rpn trace fp16 as served (channels last, optimize_for_inference; without CUDA graphs, so that "
          f"kernels show), batch {batch}: CUDA kernel time by kind (torch.profiler)")
    print("| kernels | count | ms per call | ms per image |")
    print("| --- | ---: | ---: | ---: |")
    for group, ms, n in rows:
        print(f"| {group} | {n or ''} | {ms:.2f} | {ms / batch:.2f} |")
    print(flush=True)


def main(argv=None) -> int:
    import argparse

    from exporters import torch_export
    from exporters.loading import random_model, settings_from_model
    from exporters.split import RpnNetwork
    from python_backend import names
    from python_backend.torch_runtime import RuntimeOptions, TorchNetwork

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile-only", action="store_true", help="only the fp16 rpn's kernel profile (about 1 minute)")
    args = ap.parse_args(argv)
    variants = _variants()

    torch.backends.cudnn.benchmark = True
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    dev = torch.device("cuda")
    model = random_model(num_classes=91, seed=0)
    settings = settings_from_model(model)
    tmp = Path(tempfile.mkdtemp(prefix="bench_dense_"))
    precisions = ("fp16",) if args.profile_only else ("fp32", "fp16")
    paths = {p: torch_export.export_torch(model, settings, tmp / p, device="gpu", precision=p) for p in precisions}
    h, w = settings.canvas
    print(f"device: {torch.cuda.get_device_name()}; torch {torch.__version__}; dense floor {FLOOR_MS:.2f} ms/image\n")

    # where the fp16 rpn's time goes: kernels by kind at batch 8, as served but without graphs
    batch = 8
    x = torch.randn(batch, 3, h, w, device=dev)
    sizes = torch.tensor([[h, 1066.0]] * batch, device=dev)
    with torch.no_grad():
        served = RuntimeOptions(channels_last=True, optimize_for_inference=True)
        print_profile(profile_rpn(str(paths["fp16"][names.RPN]), [[3, h, w], [2]], batch, served, x, sizes), batch)
    if args.profile_only:
        return 0

    print("| network | batch | ms per call | ms per image | floor / ms per image |")
    print("| --- | ---: | ---: | ---: | ---: |", flush=True)

    def row(name: str, batch: int, ms: float) -> None:
        print(f"| {name} | {batch} | {ms:.2f} | {ms / batch:.2f} | {FLOOR_MS / (ms / batch):.0%} |", flush=True)

    with torch.no_grad():
        for batch in (1, 8):
            x = torch.randn(batch, 3, h, w, device=dev)
            sizes = torch.tensor([[h, 1066.0]] * batch, device=dev)

            backbone = model.backbone.to(dev).eval()
            head = model.rpn.head.to(dev).eval()
            row("torchvision backbone+FPN+RPN head, eager fp32", batch, time_ms(lambda: head(list(backbone(x).values()))))
            rpn = RpnNetwork(model, settings).to(dev).eval()
            row("RpnNetwork eager fp32 (masks, anchors, top-k; batch norms folded)", batch, time_ms(lambda: rpn(x, sizes)))
            for precision in ("fp32", "fp16"):
                rpn_path = str(paths[precision][names.RPN])
                for options in variants:
                    net = TorchNetwork(rpn_path, dev, [[3, h, w], [2]], batch, options)
                    net.warm_up()
                    row(f"rpn trace {precision}, {_describe(options)}", batch, time_ms(lambda: net([x, sizes])))
                    net = None
                htraced = torch.jit.load(str(paths[precision][names.HEADER]), map_location=dev)
                feats = torch.randn(batch * 1000, 7, 7, 256, device=dev)
                rois = torch.tensor([[10.0, 10.0, 200.0, 300.0]], device=dev).repeat(batch * 1000, 1)
                with torch.jit.optimized_execution(False):
                    row(f"header trace {precision}, 1000 RoIs/image", batch, time_ms(lambda: htraced(feats, rois)))
            backbone = head = rpn = None  # free before the next batch size
            torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())

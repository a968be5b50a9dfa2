"""Time the dense networks alone on the GPU, outside Triton: where does the rpn's time go?

Compares, at batch 1 and 8 on the 800x1088 canvas (where preprocess puts a 4:3 photo such as 480x640;
seeded random weights, 91 classes):
  * torchvision's own backbone + FPN + RPN head (no extent masks, no top-k), eager;
  * our RpnNetwork eager (extent masks + anchors + top-k), fp32;
  * the exported TorchScript traces (fp32, fp16) as the Triton torch runner runs them
    (python_backend/torch_runtime.py): as traced, channels last, channels last + CUDA graphs;
  * the header trace at 1000 RoIs per image;
and first, the fp16 rpn's CUDA kernel time at batch 8 grouped by kind (torch.profiler), as the
runner serves it (channels last, torch.jit.optimize_for_inference) but without CUDA graphs.
Median of CUDA-event timings after warm-up.  Reports ms per image and the share of the dense
floor: torchvision's FLOPs for one 800x1066 image (torch's flop counter) at this card's fp16
matmul rate, both measured first (evaluation/timing.py).

    python -m benchmarks.bench_dense [--profile-only | --compile]
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
from pathlib import Path

import torch

from evaluation.profiling import kernels_by_group
from evaluation.timing import cuda_event_ms, fp16_matmul_tflops, model_gflop

CANVAS = (800, 1088)  # the default canvas of a 4:3 photo (python_backend/settings.py default_canvases)


def _variants():
    from python_backend.torch_runtime import RuntimeOptions

    return [RuntimeOptions(), RuntimeOptions(channels_last=True), RuntimeOptions(channels_last=True, cuda_graphs=True)]


def _describe(options) -> str:
    if not options.channels_last and not options.cuda_graphs:
        return "as traced (NCHW)"
    parts = (("channels last", options.channels_last), ("CUDA graphs", options.cuda_graphs))
    return " + ".join(n for n, on in parts if on)


def profile_rpn(path: str, dims, batch: int, options, x, sizes) -> list[tuple[str, float, int]]:
    """CUDA kernel time of one rpn call (without CUDA graphs, so that kernels are visible), grouped
    by kind, plus the call's wall time as ("wall (CUDA events)", ms, 0)."""
    from python_backend.torch_runtime import TorchNetwork

    net = TorchNetwork(path, torch.device("cuda"), dims, batch, dataclasses.replace(options, cuda_graphs=False))
    net.warm_up()
    wall = cuda_event_ms(lambda: net([x, sizes]))
    rows = kernels_by_group(lambda: net([x, sizes]))
    groups = [r for r in rows if not r[0].startswith("  ")]
    return groups + [("wall (CUDA events)", wall, 0)] + rows[len(groups):]


def print_profile(rows, batch: int) -> None:
    print(f"rpn trace fp16 as served (channels last, optimize_for_inference; without CUDA graphs, so that "
          f"kernels show), batch {batch}: CUDA kernel time by kind (torch.profiler)")
    print("| kernels | count | ms per call | ms per image |")
    print("| --- | ---: | ---: | ---: |")
    for group, ms, n in rows:
        print(f"| {group} | {n or ''} | {ms:.2f} | {ms / batch:.2f} |")
    print(flush=True)


def compare_compiled(model, settings, traces, x, sizes, floor_ms: float) -> int:
    """The fp16 rpn at ``x``'s batch: eager (channels last); as served, each with its CUDA graphs: the
    trace with extent masks and the trace without (``unmasked``, what a batch that fills its canvas
    runs); then torch.compile (inductor: element-wise chains such as the extent masks and the bias
    adds cuDNN leaves apart fused into generated kernels), each with the wall time of its preparation
    (compile included).  A variant that fails prints its error and the others still run.
    ``traces``: the fp16 export (:func:`~exporters.torch_export.export_torch`, masked and unmasked)."""
    import time

    from exporters.repository import canvas_key
    from exporters.torch_export import rpn_module
    from python_backend.torch_runtime import RuntimeOptions, TorchNetwork

    batch, _, h, w = x.shape
    dev = x.device
    print("\n| fp16 rpn | batch | preparation s | ms per image | floor / ms per image |")
    print("| --- | ---: | ---: | ---: | ---: |", flush=True)
    eager = rpn_module(model, settings, "fp16").to(dev).eval().to(memory_format=torch.channels_last)
    xs = x.contiguous(memory_format=torch.channels_last)
    graphs = RuntimeOptions(channels_last=True, cuda_graphs=True, optimize_for_inference=True)

    def served(unmasked: bool):
        net = TorchNetwork(str(traces[canvas_key(h, w, unmasked=unmasked)]), dev, [[3, h, w], [2]], batch, graphs)
        net.warm_up()
        return lambda: net([x, sizes])

    def compiled(mode: str):
        torch._dynamo.reset()  # no graph compiled under another mode is reused
        fn = torch.compile(eager, mode=mode)
        return lambda: fn(xs, sizes)

    variants = {"eager (channels last)": lambda: (lambda: eager(xs, sizes)),
                "served trace, extent masks (CUDA graphs)": lambda: served(False),
                "served trace, no masks (CUDA graphs; batches that fill their canvas)": lambda: served(True),
                "torch.compile mode=default, extent masks": lambda: compiled("default"),
                # last: autotuning every convolution and matmul may outlast the call
                "torch.compile mode=max-autotune-no-cudagraphs": lambda: compiled("max-autotune-no-cudagraphs")}
    for name, make in variants.items():
        try:
            start = time.perf_counter()
            with torch.no_grad():
                call = make()
                call()  # compiles where it compiles
                torch.cuda.synchronize()
                prepared = time.perf_counter() - start
                ms = cuda_event_ms(call) / batch
            print(f"| {name} | {batch} | {prepared:.0f} | {ms:.2f} | {floor_ms / ms:.0%} |", flush=True)
        except Exception as e:  # noqa: BLE001 - report and go on to the next variant
            print(f"| {name} | {batch} | failed: {type(e).__name__}: {str(e)[:200]} | | |", flush=True)
    return 0


def main(argv=None) -> int:
    from exporters import torch_export
    from exporters.loading import random_model, settings_from_model
    from exporters.repository import canvas_key
    from exporters.split import RpnNetwork
    from python_backend import names
    from python_backend.torch_runtime import RuntimeOptions, TorchNetwork

    ap = argparse.ArgumentParser(prog="python -m benchmarks.bench_dense", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile-only", action="store_true", help="only the fp16 rpn's kernel profile")
    ap.add_argument("--compile", action="store_true",
                    help="after the profile, only the fp16 rpn at batch 8: eager, the served traces (with and "
                         "without extent masks) and torch.compile, each with its preparation time")
    args = ap.parse_args(argv)
    variants = _variants()

    torch.backends.cudnn.benchmark = True
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    dev = torch.device("cuda")
    model = random_model(num_classes=91, seed=0)
    settings = settings_from_model(model, canvases=(CANVAS,))
    tmp = Path(tempfile.mkdtemp(prefix="bench_dense_"))
    precisions = ("fp16",) if args.profile_only or args.compile else ("fp32", "fp16")
    paths = {p: torch_export.export_torch(model, settings, tmp / p, device="gpu", precision=p) for p in precisions}
    h, w = CANVAS
    gflop, tflops = model_gflop(model.to(dev), (h, 1066)), fp16_matmul_tflops()
    floor_ms = gflop / tflops  # GFLOP / (TFLOP/s) = ms
    print(f"device: {torch.cuda.get_device_name()}; torch {torch.__version__}; torchvision {gflop:.0f} GFLOP per "
          f"{h}x1066 image, fp16 matmul {tflops:.0f} TFLOP/s: dense floor {floor_ms:.2f} ms/image\n")

    # where the fp16 rpn's time goes: kernels by kind at batch 8, as served but without graphs
    batch = 8
    x = torch.randn(batch, 3, h, w, device=dev)
    sizes = torch.tensor([[h, 1066.0]] * batch, device=dev)
    with torch.no_grad():
        served = RuntimeOptions(channels_last=True, optimize_for_inference=True)
        print_profile(profile_rpn(str(paths["fp16"][canvas_key(h, w)]), [[3, h, w], [2]], batch, served, x, sizes), batch)
    if args.profile_only:
        return 0
    if args.compile:
        return compare_compiled(model, settings, paths["fp16"], x, sizes, floor_ms)

    print("| network | batch | ms per call | ms per image | floor / ms per image |")
    print("| --- | ---: | ---: | ---: | ---: |", flush=True)

    def row(name: str, batch: int, ms: float) -> None:
        print(f"| {name} | {batch} | {ms:.2f} | {ms / batch:.2f} | {floor_ms / (ms / batch):.0%} |", flush=True)

    with torch.no_grad():
        for batch in (1, 8):
            x = torch.randn(batch, 3, h, w, device=dev)
            sizes = torch.tensor([[h, 1066.0]] * batch, device=dev)

            backbone = model.backbone.to(dev).eval()
            head = model.rpn.head.to(dev).eval()
            row("torchvision backbone+FPN+RPN head, eager fp32", batch,
                cuda_event_ms(lambda: head(list(backbone(x).values()))))
            rpn = RpnNetwork(model, settings).to(dev).eval()
            row("RpnNetwork eager fp32 (masks, anchors, top-k; batch norms folded)", batch,
                cuda_event_ms(lambda: rpn(x, sizes)))
            for precision in ("fp32", "fp16"):
                rpn_path = str(paths[precision][canvas_key(h, w)])
                for options in variants:
                    net = TorchNetwork(rpn_path, dev, [[3, h, w], [2]], batch, options)
                    net.warm_up()
                    row(f"rpn trace {precision}, {_describe(options)}", batch, cuda_event_ms(lambda: net([x, sizes])))
                    net = None
                htraced = torch.jit.load(str(paths[precision][names.HEADER]), map_location=dev)
                feats = torch.randn(batch * 1000, 7, 7, 256, device=dev)
                rois = torch.tensor([[10.0, 10.0, 200.0, 300.0]], device=dev).repeat(batch * 1000, 1)
                with torch.jit.optimized_execution(False):
                    row(f"header trace {precision}, 1000 RoIs/image", batch,
                        cuda_event_ms(lambda: htraced(feats, rois)))
            backbone = head = rpn = None  # free before the next batch size
            torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())

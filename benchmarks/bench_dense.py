"""Time the dense networks alone on the GPU, outside Triton: where does the rpn's time go?

Compares, at batch 1 and 8 on the 800x1344 canvas (seeded random weights, 91 classes):
  * torchvision's own backbone + FPN + RPN head (no extent masks, no top-k), eager;
  * our RpnNetwork eager (extent masks + anchors + top-k), fp32;
  * the exported TorchScript traces (fp32, fp16) as the Triton torch runner runs them
    (python_backend/torch_runtime.py): as traced, channels last, channels last + CUDA graphs;
  * the header trace at 1000 RoIs per image.
Median of CUDA-event timings after warm-up.  Reports ms per image and the share of the dense
floor: 355 GFLOP per image at the measured 760 TFLOP/s fp16 (ENVIRONMENT.md) = 0.47 ms.

    python benchmarks/bench_dense.py
"""
from __future__ import annotations

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


def main() -> int:
    from exporters import torch_export
    from exporters.loading import random_model, settings_from_model
    from exporters.split import RpnNetwork
    from python_backend import names
    from python_backend.torch_runtime import TorchNetwork

    variants = _variants()

    torch.backends.cudnn.benchmark = True
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    dev = torch.device("cuda")
    model = random_model(num_classes=91, seed=0)
    settings = settings_from_model(model)
    tmp = Path(tempfile.mkdtemp(prefix="bench_dense_"))
    paths = {p: torch_export.export_torch(model, settings, tmp / p, device="gpu", precision=p) for p in ("fp32", "fp16")}
    h, w = settings.canvas
    rows = []
    with torch.no_grad():
        for batch in (1, 8):
            x = torch.randn(batch, 3, h, w, device=dev)
            sizes = torch.tensor([[h, 1066.0]] * batch, device=dev)

            backbone = model.backbone.to(dev).eval()
            head = model.rpn.head.to(dev).eval()
            rows.append(("torchvision backbone+FPN+RPN head, eager fp32", batch,
                         time_ms(lambda: head(list(backbone(x).values())))))
            rpn = RpnNetwork(model, settings).to(dev).eval()
            rows.append(("RpnNetwork eager fp32 (masks, anchors, top-k)", batch, time_ms(lambda: rpn(x, sizes))))
            for precision in ("fp32", "fp16"):
                rpn_path = str(paths[precision][names.RPN])
                for options in variants:
                    net = TorchNetwork(rpn_path, dev, [[3, h, w], [2]], batch, options)
                    net.warm_up()
                    rows.append((f"rpn trace {precision}, {_describe(options)}", batch,
                                 time_ms(lambda: net([x, sizes]))))
                    net = None
                htraced = torch.jit.load(str(paths[precision][names.HEADER]), map_location=dev)
                feats = torch.randn(batch * 1000, 7, 7, 256, device=dev)
                rois = torch.tensor([[10.0, 10.0, 200.0, 300.0]], device=dev).repeat(batch * 1000, 1)
                with torch.jit.optimized_execution(False):
                    rows.append((f"header trace {precision}, 1000 RoIs/image", batch,
                                 time_ms(lambda: htraced(feats, rois))))
            backbone = head = rpn = None  # free before the next batch size
            torch.cuda.empty_cache()
    print(f"device: {torch.cuda.get_device_name()}; torch {torch.__version__}; dense floor {FLOOR_MS:.2f} ms/image")
    print("| network | batch | ms per call | ms per image | floor / ms per image |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for name, batch, ms in rows:
        print(f"| {name} | {batch} | {ms:.2f} | {ms / batch:.2f} | {FLOOR_MS / (ms / batch):.0%} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

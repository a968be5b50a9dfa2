"""Time the served rpn on the full canvas against its canvas bucket, outside Triton.

The rpn as the Triton torch runner serves it (python_backend/torch_runtime.py: fp16 with channels
last, the fused convolutions and CUDA graphs; fp32 with graphs), seeded random weights, the
800x1344 canvas, images of 800x1066 (a 480x640 photo resized), batch 1, 4 and 8:
  * ``TorchNetwork`` on the full canvas;
  * ``CanvasBuckets`` (which picks the 800x1088 bucket for these images): the host read of the
    image sizes, the bucket's graph and the padding of its outputs back to the canvas's shapes.
Wall-clock milliseconds per call (the host read synchronizes, so CUDA events alone would hide
it), median after warm-up.

    python -m benchmarks.bench_buckets [--precisions fp16 fp32]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

from evaluation.timing import wall_ms


def main(argv=None) -> int:
    from exporters import torch_export
    from exporters.repository import bucket_key
    from exporters.loading import random_model, settings_from_model
    from python_backend import names
    from python_backend.settings import default_buckets
    from python_backend.torch_runtime import CanvasBuckets, RuntimeOptions

    ap = argparse.ArgumentParser(prog="python -m benchmarks.bench_buckets", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--precisions", nargs="+", choices=("fp16", "fp32"), default=["fp16", "fp32"])
    args = ap.parse_args(argv)
    torch.backends.cudnn.benchmark = True
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    dev = torch.device("cuda")
    model = random_model(num_classes=91, seed=0)
    settings = settings_from_model(model)
    buckets = default_buckets(settings)
    h, w = settings.canvas
    print(f"device: {torch.cuda.get_device_name()}; torch {torch.__version__}; canvas {h}x{w}; buckets {buckets}")
    print("| precision | batch | full canvas ms | bucket ms | bucket / full |")
    print("| --- | ---: | ---: | ---: | ---: |", flush=True)
    for precision in args.precisions:
        tmp = Path(tempfile.mkdtemp(prefix=f"bench_buckets_{precision}_"))
        paths = torch_export.export_torch(model, settings, tmp, device="gpu", precision=precision, buckets=buckets)
        fp16 = precision == "fp16"
        options = RuntimeOptions(channels_last=fp16, cuda_graphs=True, optimize_for_inference=fp16)
        bucketed = CanvasBuckets.load(paths[names.RPN], {b: paths[bucket_key(*b)] for b in buckets}, dev, 8, options,
                                      settings)
        full = bucketed.full
        bucketed.warm_up()
        for batch in (1, 4, 8):
            x = torch.randn(batch, 3, h, w, device=dev)
            x[:, :, :, 1066:] = 0
            sizes = torch.tensor([[800.0, 1066.0]] * batch, device=dev)
            assert bucketed.select(sizes)[0] == (800, 1088)
            t_full = wall_ms(lambda: full([x, sizes]))
            t_bucket = wall_ms(lambda: bucketed([x, sizes]))
            print(f"| {precision} | {batch} | {t_full:.2f} | {t_bucket:.2f} | {t_bucket / t_full:.2f} |", flush=True)
        full = bucketed = None  # free this precision's graphs before the next
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Launch-shape sweep of the ROIAlign kernel at B = 8 x 1000 RoIs (the 0.5 ms target), for
profiling with Nsight Compute:

    python -m benchmarks.profile_roi_align                     # sweep, prints a table
    ncu --kernel-name multilevel_roi_align --launch-skip 3 --launch-count 1 \\
        --section SpeedOfLight --section MemoryWorkloadAnalysis --section Occupancy \\
        python -m benchmarks.profile_roi_align --once          # one default launch, profiled
"""
from __future__ import annotations

import argparse
import sys

import numpy as np

from evaluation.kernels import CANVAS, STRIDES, image_sizes, make_rois
from evaluation.timing import cupy_event_ms


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.profile_roi_align", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--once", action="store_true", help="a few default launches only (for ncu)")
    args = p.parse_args(argv)
    import cupy as cp

    from python_backend.cuda import roi_align as ra

    rng = np.random.default_rng(0)
    b = args.batch
    sizes_host = image_sizes(b)
    feats = [cp.random.standard_normal((b, CANVAS[0] // s, CANVAS[1] // s, 256), dtype=cp.float32) for s in STRIDES]
    inputs = [make_rois(cp, rng, sizes_host, 1000) for _ in range(4)]
    num = cp.asarray([b * 1000], cp.int32)
    sizes = cp.asarray(sizes_host)

    def run(i):
        rois, img = i
        return ra.multilevel_roi_align(feats, rois, img, sizes, STRIDES, 7, 2, num_rois=num)

    if args.once:
        for i in range(5):
            run(inputs[i % 4])
        cp.cuda.Device().synchronize()
        return 0
    ref = run(inputs[0])
    print("| channel threads | bin threads | min blocks/SM | ms (median) | max abs diff vs default |")
    print("| ---: | ---: | ---: | ---: | ---: |")
    default = (ra.CHANNEL_THREADS, ra.BIN_THREADS, ra.MIN_BLOCKS)
    shapes = [(32, 4, m) for m in (1, 6, 8, 12, 16)] + [(64, 2, m) for m in (1, 8, 12)] + \
             [(32, 2, m) for m in (1, 16, 24)] + [(64, 4, m) for m in (1, 4, 6)]
    for ch, bins, minb in shapes:
        ra.CHANNEL_THREADS, ra.BIN_THREADS, ra.MIN_BLOCKS = ch, bins, minb
        try:
            diff = float(cp.abs(run(inputs[0]) - ref).max())
            ms = cupy_event_ms(run, inputs, 5, 30)
            print(f"| {ch} | {bins} | {minb} | {ms:.3f} | {diff:.1e} |", flush=True)
        except Exception as e:  # a shape the kernel's launch bounds refuse
            print(f"| {ch} | {bins} | {minb} | failed: {type(e).__name__} | |", flush=True)
    ra.CHANNEL_THREADS, ra.BIN_THREADS, ra.MIN_BLOCKS = default
    return 0


if __name__ == "__main__":
    sys.exit(main())

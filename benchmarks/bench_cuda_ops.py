"""Time the CuPy kernels of ``python_backend.cuda`` against torchvision on the same GPU.

Ops, at B images of 4390 proposals (5 levels) and 1000 RoIs each, 256 channels, canvas 800x1344:
  * proposal NMS: ours = ``python_backend.cuda.ops.filter_proposals`` (whole batch, no host sync);
    torchvision = what ``RegionProposalNetwork.filter_proposals`` does per image
    (remove_small_boxes, score threshold, ``batched_nms`` per level, top 1000);
  * ROIAlign: ours = ``multilevel_roi_align`` (one launch, channels-last maps and output);
    torchvision = ``MultiScaleRoIAlign`` on NCHW copies of the same maps;
  * roi step: ours = ``get_backend("gpu").roi_step``; torchvision = the two above;
  * preprocess, B host uint8 480x640 images: ours = ``python_backend.cuda.image.preprocess_batch``
    (upload, then one launch per image onto the 800x1344 canvas); torchvision =
    ``GeneralizedRCNNTransform`` on the uploaded images (it pads the batch to a multiple of 32 only).

Each figure is the median of CUDA-event timings after a warm-up; every timed run takes the next
of several input sets drawn beforehand, so no run reuses the previous run's inputs.  GB/s counts
the bytes each op must move at least (inputs read once and outputs written once; for ROIAlign
the RoIs and the pooled output, not the gathered feature reads), against this card's on-GPU copy
bandwidth, measured first (evaluation/timing.py ``copy_gbps``).

    python -m benchmarks.bench_cuda_ops [--batches 1 8 32] [--repeat 50]
"""
from __future__ import annotations

import argparse
import platform
import sys

import numpy as np

from evaluation.kernels import CANVAS, LEVEL_TOPK, STRIDES, gather_bytes, image_sizes, make_proposals, make_rois
from evaluation.timing import copy_gbps, cupy_event_ms


def versions(cp, torch, torchvision) -> str:
    props = cp.cuda.runtime.getDeviceProperties(cp.cuda.Device().id)
    name = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
    rt = cp.cuda.runtime.runtimeGetVersion()
    drv = cp.cuda.runtime.driverGetVersion()
    return (f"device: {name}; CUDA runtime {rt // 1000}.{rt % 1000 // 10}, "
            f"driver API {drv // 1000}.{drv % 1000 // 10}\n"
            f"python {platform.python_version()}, numpy {np.__version__}, cupy {cp.__version__}, "
            f"torch {torch.__version__}, torchvision {torchvision.__version__}")


def run(batches, rois_per_image: int, channels: int, warmup: int, repeat: int, input_sets: int) -> list[tuple]:
    import cupy as cp
    import torch
    import torchvision
    from torchvision.ops import MultiScaleRoIAlign, batched_nms, remove_small_boxes

    from torchvision.models.detection.transform import GeneralizedRCNNTransform

    from python_backend.backends import get_backend
    from python_backend.cuda.image import preprocess_batch as gpu_preprocess
    from python_backend.cuda.proposals import filter_proposals
    from python_backend.cuda.roi_align import multilevel_roi_align
    from python_backend.settings import DetectorSettings

    print(versions(cp, torch, torchvision), flush=True)
    settings = DetectorSettings(num_classes=91)
    gpu = get_backend("gpu")
    pool = MultiScaleRoIAlign(["p2", "p3", "p4", "p5"], 7, 2)
    rng = np.random.default_rng(0)
    rows = []
    for batch in batches:
        props = [make_proposals(cp, rng, batch) for _ in range(input_sets)]
        sizes_host = image_sizes(batch)
        feats = [[cp.random.standard_normal((batch, CANVAS[0] // s, CANVAS[1] // s, channels), dtype=cp.float32)
                  for s in STRIDES] for _ in range(2)]  # channels last, as the rpn emits them
        feats_nchw = [[cp.ascontiguousarray(f.transpose(0, 3, 1, 2)) for f in fs] for fs in feats]
        rois = [make_rois(cp, rng, sizes_host, rois_per_image) for _ in range(input_sets)]
        num_rois = cp.asarray([batch * rois_per_image], cp.int32)
        sizes = cp.asarray(sizes_host)
        image_shapes = [tuple(int(v) for v in s) for s in sizes_host]

        def ours_nms(i):
            p, _ = props[i]
            filter_proposals(p, settings.rpn_min_size, settings.rpn_score_thresh, settings.rpn_nms_thresh,
                             settings.rpn_post_nms_top_n)

        def tv_filter(p):
            out = []
            for one in torch.from_dlpack(p):
                boxes, scores, levels = one[:, :4], one[:, 4], one[:, 5].long()
                keep = remove_small_boxes(boxes, settings.rpn_min_size)
                boxes, scores, levels = boxes[keep], scores[keep], levels[keep]
                keep = torch.where(scores >= settings.rpn_score_thresh)[0]
                boxes, scores, levels = boxes[keep], scores[keep], levels[keep]
                keep = batched_nms(boxes, scores, levels, settings.rpn_nms_thresh)[:settings.rpn_post_nms_top_n]
                out.append(boxes[keep])
            return out

        def tv_nms(i):
            tv_filter(props[i][0])

        def ours_align(i):
            r, img = rois[i]
            multilevel_roi_align(feats[i % 2], r, img, sizes, STRIDES, 7, 2, num_rois=num_rois)

        def tv_maps(i):
            return {f"p{k + 2}": torch.from_dlpack(f) for k, f in enumerate(feats_nchw[i % 2])}

        def tv_align(i):
            r, img = rois[i]
            rt, it = torch.from_dlpack(r), torch.from_dlpack(img)
            pool(tv_maps(i), [rt[it == b] for b in range(batch)], image_shapes)

        def ours_step(i):
            gpu.roi_step(props[i][0], feats[i % 2], sizes, settings)

        def tv_step(i):
            pool(tv_maps(i), tv_filter(props[i][0]), image_shapes)

        photos = [[rng.integers(0, 256, (480, 640, 3), dtype=np.uint8) for _ in range(batch)]
                  for _ in range(input_sets)]
        transform = GeneralizedRCNNTransform(settings.min_size, settings.max_size, list(settings.image_mean),
                                             list(settings.image_std))

        def ours_pre(i):
            gpu_preprocess(photos[i], settings)

        def tv_pre(i):
            transform([torch.from_numpy(p).cuda().permute(2, 0, 1).float() / 255 for p in photos[i]])

        k = sum(LEVEL_TOPK)
        r = batch * rois_per_image
        nms_bytes = batch * k * 6 * 4 + r * 4 * 4
        align_bytes = r * 4 * 4 + r * channels * 49 * 4
        pre_bytes = batch * (480 * 640 * 3 + 3 * CANVAS[0] * CANVAS[1] * 4)
        window_bytes = gather_bytes(cp.asnumpy(rois[0][0]), channels) + align_bytes
        for op, ours, theirs, nbytes in (("proposal NMS", ours_nms, tv_nms, nms_bytes),
                                          ("ROIAlign", ours_align, tv_align, align_bytes),
                                          ("roi step (NMS + ROIAlign)", ours_step, tv_step, nms_bytes + align_bytes),
                                          ("preprocess (480x640 uint8)", ours_pre, tv_pre, pre_bytes)):
            t_ours = cupy_event_ms(ours, list(range(input_sets)), warmup, repeat)
            t_tv = cupy_event_ms(theirs, list(range(input_sets)), warmup, max(5, repeat // 5))
            gbps = nbytes / (t_ours * 1e-3) / 1e9
            gather = window_bytes / (t_ours * 1e-3) / 1e9 if op == "ROIAlign" else None
            rows.append((op, batch, t_ours, t_tv, t_tv / t_ours, gbps, gather))
            print(f"{op:28s} B={batch:3d}  ours {t_ours:8.3f} ms  torchvision {t_tv:8.3f} ms  "
                  f"x{t_tv / t_ours:6.1f}  {gbps:7.1f} GB/s", flush=True)
        props = feats = feats_nchw = rois = None  # free this batch size before the next one
        cp.get_default_memory_pool().free_all_blocks()
        torch.cuda.empty_cache()
    return rows


def table(rows, copy: float) -> str:
    """The result table; ``copy``: the card's copy bandwidth in GB/s, the bandwidth column's 100%."""
    lines = [f"| op | B | ours ms | torchvision ms | speedup | GB/s (min bytes) | % of {copy:.0f} GB/s (copy) "
             "| GB/s (RoI windows) |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for op, batch, t_ours, t_tv, speedup, gbps, gather in rows:
        g = f"{gather:.0f}" if gather is not None else ""
        lines.append(f"| {op} | {batch} | {t_ours:.3f} | {t_tv:.3f} | {speedup:.1f}x | {gbps:.0f} | "
                     f"{100 * gbps / copy:.0f}% | {g} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_cuda_ops", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--rois", type=int, default=1000, help="RoIs per image for ROIAlign")
    parser.add_argument("--channels", type=int, default=256)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeat", type=int, default=30)
    parser.add_argument("--input-sets", type=int, default=4)
    args = parser.parse_args(argv)
    try:
        copy = copy_gbps()
        print(f"on-GPU copy bandwidth (read + write): {copy:.0f} GB/s", flush=True)
        rows = run(args.batches, args.rois, args.channels, args.warmup, args.repeat, args.input_sets)
    except ImportError as e:
        print(f"cannot benchmark: {e} (needs CuPy, torch and torchvision with CUDA)", file=sys.stderr)
        return 2
    print()
    print(table(rows, copy))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Time the CuPy kernels of ``python_backend.cuda`` against torchvision on the same GPU.

Ops, at B images of 4390 proposals (5 levels) and 1000 RoIs each, 256 channels, canvas 800x1344:
  * proposal NMS: ours = ``filter_proposals_batched`` (whole batch, no host sync);
    torchvision = what ``RegionProposalNetwork.filter_proposals`` does per image
    (remove_small_boxes, score threshold, ``batched_nms`` per level, top 1000);
  * ROIAlign: ours = ``multilevel_roi_align`` (one launch, channels-last maps and output);
    torchvision = ``MultiScaleRoIAlign`` on NCHW copies of the same maps;
  * roi step: ours = ``python_backend.cuda.steps.roi_step``; torchvision = the two above;
  * preprocess, B host uint8 480x640 images: ours = ``python_backend.cuda.image.preprocess_batch``
    (upload, then one launch per image onto the 800x1344 canvas); torchvision =
    ``GeneralizedRCNNTransform`` on the uploaded images (it pads the batch to a multiple of 32 only).

Each figure is the median of CUDA-event timings after a warm-up; every timed run takes the next
of several input sets drawn beforehand, so no run reuses the previous run's inputs.  GB/s counts
the bytes each op must move at least (inputs read once and outputs written once; for ROIAlign
the RoIs and the pooled output, not the gathered feature reads), against the ~2840 GB/s copy
bandwidth measured on the H100.

    python benchmarks/bench_cuda_ops.py [--batches 1 8 32] [--repeat 50]
"""
from __future__ import annotations

import argparse
import platform
import statistics
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

COPY_GBPS = 2840.0
LEVEL_TOPK = (1000, 1000, 1000, 1000, 390)
CANVAS = (800, 1344)
STRIDES = (4, 8, 16, 32)
SIZES = [(800, 1066), (800, 1333), (600, 800), (800, 1200), (512, 700), (800, 1344), (333, 640), (700, 1000)]


def versions(cp, torch, torchvision) -> str:
    props = cp.cuda.runtime.getDeviceProperties(cp.cuda.Device().id)
    name = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
    rt = cp.cuda.runtime.runtimeGetVersion()
    drv = cp.cuda.runtime.driverGetVersion()
    return (f"device: {name}; CUDA runtime {rt // 1000}.{rt % 1000 // 10}, driver API {drv // 1000}.{drv % 1000 // 10}\n"
            f"python {platform.python_version()}, numpy {np.__version__}, cupy {cp.__version__}, "
            f"torch {torch.__version__}, torchvision {torchvision.__version__}")


def make_proposals(cp, rng, batch: int):
    """[B, 4390, 6] rows like the rpn's: clustered boxes clipped to the image, by descending score."""
    out = np.zeros((batch, sum(LEVEL_TOPK), 6), np.float32)
    sizes = np.array([SIZES[i % len(SIZES)] for i in range(batch)], np.float32)
    for b, (h, w) in enumerate(sizes):
        centers = rng.uniform([0, 0], [w, h], size=(25, 2))
        row = 0
        for level, k in enumerate(LEVEL_TOPK):
            side = 16.0 * 2 ** level
            c = centers[rng.integers(0, 25, k)] + rng.normal(0, side / 2, size=(k, 2))
            wh = side * rng.uniform(0.5, 2.0, size=(k, 2))
            boxes = np.concatenate([c - wh / 2, c + wh / 2], axis=1)
            boxes[:, 0::2] = np.clip(boxes[:, 0::2], 0, w)
            boxes[:, 1::2] = np.clip(boxes[:, 1::2], 0, h)
            out[b, row:row + k, :4] = boxes
            out[b, row:row + k, 4] = -np.sort(-rng.random(k))
            out[b, row:row + k, 5] = level
            row += k
    return cp.asarray(out), cp.asarray(sizes)


def make_rois(cp, rng, sizes: np.ndarray, per_image: int):
    """RoIs of every FPN level: sides log-uniform in [16, 640] pixels inside each image."""
    rois, img = [], []
    for b, (h, w) in enumerate(sizes):
        side = np.exp(rng.uniform(np.log(16), np.log(640), size=(per_image, 2)))
        xy = rng.uniform(0, 1, size=(per_image, 2)) * np.maximum(np.array([w, h]) - side, 1)
        rois.append(np.concatenate([xy, xy + side], axis=1))
        img.append(np.full(per_image, b, np.int32))
    return cp.asarray(np.concatenate(rois).astype(np.float32)), cp.asarray(np.concatenate(img))


def gather_bytes(rois: np.ndarray, channels: int) -> int:
    """Bytes ROIAlign must gather: for each RoI, every map cell its bilinear taps touch (the RoI's
    window on its FPN level, one cell of margin), x channels x 4 bytes.  RoIs are counted apart,
    so overlap between RoIs (which L2 may serve) is not subtracted: an upper bound of the unique
    bytes, and what the kernel moves through L1."""
    from python_backend.reference.roi_align import map_levels

    stride = np.asarray(STRIDES, np.float32)[map_levels(rois)]
    lo = np.floor(rois[:, :2] / stride[:, None])
    hi = np.floor(rois[:, 2:] / stride[:, None]) + 1
    cells = np.prod(np.maximum(hi - lo + 1, 1), axis=1)
    return int(cells.sum()) * channels * 4


def time_ms(cp, fn, inputs, warmup: int, repeat: int) -> float:
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


def run(batches, rois_per_image: int, channels: int, warmup: int, repeat: int, input_sets: int) -> list[tuple]:
    import cupy as cp
    import torch
    import torchvision
    from torchvision.ops import MultiScaleRoIAlign, batched_nms, remove_small_boxes

    from torchvision.models.detection.transform import GeneralizedRCNNTransform

    from python_backend.cuda import steps as gpu_steps
    from python_backend.cuda.image import preprocess_batch as gpu_preprocess
    from python_backend.cuda.proposals import filter_proposals_batched
    from python_backend.cuda.roi_align import multilevel_roi_align
    from python_backend.settings import DetectorSettings

    print(versions(cp, torch, torchvision), flush=True)
    settings = DetectorSettings(num_classes=91)
    pool = MultiScaleRoIAlign(["p2", "p3", "p4", "p5"], 7, 2)
    rng = np.random.default_rng(0)
    rows = []
    for batch in batches:
        props = [make_proposals(cp, rng, batch) for _ in range(input_sets)]
        sizes_host = np.array([SIZES[i % len(SIZES)] for i in range(batch)], np.float32)
        feats = [[cp.random.standard_normal((batch, CANVAS[0] // s, CANVAS[1] // s, channels), dtype=cp.float32)
                  for s in STRIDES] for _ in range(2)]  # channels last, as the rpn emits them
        feats_nchw = [[cp.ascontiguousarray(f.transpose(0, 3, 1, 2)) for f in fs] for fs in feats]
        rois = [make_rois(cp, rng, sizes_host, rois_per_image) for _ in range(input_sets)]
        num_rois = cp.asarray([batch * rois_per_image], cp.int32)
        sizes = cp.asarray(sizes_host)
        image_shapes = [tuple(int(v) for v in s) for s in sizes_host]

        def ours_nms(i):
            p, _ = props[i]
            filter_proposals_batched(p, settings.rpn_min_size, settings.rpn_score_thresh, settings.rpn_nms_thresh,
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
            multilevel_roi_align(feats[i % 2], r, img, num_rois, sizes, STRIDES, 7, 2)

        def tv_maps(i):
            return {f"p{k + 2}": torch.from_dlpack(f) for k, f in enumerate(feats_nchw[i % 2])}

        def tv_align(i):
            r, img = rois[i]
            rt, it = torch.from_dlpack(r), torch.from_dlpack(img)
            pool(tv_maps(i), [rt[it == b] for b in range(batch)], image_shapes)

        def ours_step(i):
            gpu_steps.roi_step(props[i][0], feats[i % 2], sizes, settings)

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
            t_ours = time_ms(cp, ours, list(range(input_sets)), warmup, repeat)
            t_tv = time_ms(cp, theirs, list(range(input_sets)), warmup, max(5, repeat // 5))
            gbps = nbytes / (t_ours * 1e-3) / 1e9
            gather = window_bytes / (t_ours * 1e-3) / 1e9 if op == "ROIAlign" else None
            rows.append((op, batch, t_ours, t_tv, t_tv / t_ours, gbps, gather))
            print(f"{op:28s} B={batch:3d}  ours {t_ours:8.3f} ms  torchvision {t_tv:8.3f} ms  "
                  f"x{t_tv / t_ours:6.1f}  {gbps:7.1f} GB/s", flush=True)
        props = feats = feats_nchw = rois = None  # free this batch size before the next one
        cp.get_default_memory_pool().free_all_blocks()
        torch.cuda.empty_cache()
    return rows


def table(rows) -> str:
    lines = ["| op | B | ours ms | torchvision ms | speedup | GB/s (min bytes) | % of 2840 GB/s | GB/s (RoI windows) |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for op, batch, t_ours, t_tv, speedup, gbps, gather in rows:
        g = f"{gather:.0f}" if gather is not None else ""
        lines.append(f"| {op} | {batch} | {t_ours:.3f} | {t_tv:.3f} | {speedup:.1f}x | {gbps:.0f} | "
                     f"{100 * gbps / COPY_GBPS:.0f}% | {g} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--rois", type=int, default=1000, help="RoIs per image for ROIAlign")
    parser.add_argument("--channels", type=int, default=256)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeat", type=int, default=30)
    parser.add_argument("--input-sets", type=int, default=4)
    args = parser.parse_args(argv)
    try:
        rows = run(args.batches, args.rois, args.channels, args.warmup, args.repeat, args.input_sets)
    except ImportError as e:
        print(f"cannot benchmark: {e} (needs CuPy, torch and torchvision with CUDA)", file=sys.stderr)
        return 2
    print()
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Train fasterrcnn_resnet50_fpn from scratch, briefly, on generated shapes: a confident checkpoint, no download.

    python benchmarks/train_synthetic.py --out /tmp/fasterrcnn_bench/synthetic.pt          # ~90 s on one H100
    python benchmarks/perf.py --weights /tmp/fasterrcnn_bench/synthetic.pt

Why: the GPU benchmark (benchmarks/perf.py) checks the fp16 ensemble against torchvision fp32 (>= 97%
of detections matched at IoU >= 0.9, same label).  With seeded random weights
(exporters/loading.py ``random_model``) the class scores are near-ties, so fp16 rounding reorders
them and changes labels, and even torchvision's own autocast fails that check: it measures the weights,
not the pipeline.  A trained detector gives separated scores, but COCO weights cannot be downloaded on
these machines (no internet, no model hub).  So this script makes a checkpoint here, reproducibly
from a seed: procedurally drawn images (a textured background, 1-6 filled shapes of ``K`` classes,
each class with its own colour family), fasterrcnn_resnet50_fpn with random init
(``weights=None, weights_backbone=None``: trainable BatchNorm in the backbone), ``K + 1`` classes.

The saved file is ``model.state_dict()``; it loads into
``fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=K + 1)`` with default
transform settings (800/1333, what the benchmark serves), and through
``exporters.loading.checkpoint_model(path)``, which reads the number of classes from it.  Training
resizes to ``--min-size`` (512 by default) for speed; the transform keeps no weights, so nothing of
that setting is saved.

Defaults (one H100, AMP): batch 8, SGD lr 0.02 (momentum 0.9, weight decay 1e-4), linear warm-up over
100 steps, flat, then a cosine tail over the last 30% of the budget to 5% of lr.  The budget is
``--steps`` or ``--seconds`` (wall clock), whichever runs out first; the schedule follows whichever is
further along, so a run cut by the clock still ends at the low learning rate.  Gradients are clipped
at norm 10: from scratch, the early RPN box-regression gradients are large.

After training, a self-check on held-out generated images (eval mode, default 800/1333 transform)
prints the mean top score, the recall at IoU >= 0.5 (same label, score >= 0.5), how many detections
sit near the 0.05 score threshold, and on CUDA how many of the fp32 detections fp16 autocast keeps
(IoU >= 0.9, same label), the benchmark's criterion.  It is informational.

Measured on one H100 80GB (torch 2.11, torchvision 0.26, defaults): 669 steps in the 90 s budget
(the first ~20 s are CUDA start and cuDNN autotuning, then ~90 images/s), 106 s for the whole script;
loss 2.5 -> 0.07.  Held-out scenes at 800/1333: mean top score 1.000, 24/24 objects found, fp16 autocast
keeps 28/28 detections.  On the benchmark's photographs the detector is unsure, as a shape detector
should be (skimage astronaut/coffee/chelsea/rocket: top scores 0.99/0.99/0.41/0.67, fp16 autocast keeps
96%/97%/90%/92% of the fp32 detections), and ``textured_600x800`` gives no detection at all.  So score
the fp16 check on generated scenes, e.g. ``make_scene(0, HELD_OUT + i, size=(480, 640)).image``
(kept 18/18 there), not on those photographs.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
for _path in (ROOT, ROOT / "tests"):  # tests/parity.py: the project's match criterion
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

# Shape classes, label = index + 1 (0 is torchvision's background).  Each has a colour family
# (base RGB, jittered per object) so that colour alone separates the classes: a brief training run
# then gives confident scores, which is all the fp16 check needs.
SHAPES = ("rectangle", "ellipse", "triangle")
BASE_COLOURS = ((220, 50, 40), (40, 190, 60), (50, 80, 230))
COLOUR_JITTER = 25
# (height, width) of generated images: landscape and square, like the benchmark's photographs.
IMAGE_SIZES = ((384, 512), (352, 480), (416, 416), (320, 512))
MIN_OBJECTS, MAX_OBJECTS = 1, 6
MIN_SIDE, MAX_SIDE = 24, 180  # object box sides in pixels, before the transform's resize
HELD_OUT = 1 << 30  # self-check images use indices from here; training uses 0, 1, 2, ...


@dataclass
class Scene:
    """One generated image and its targets.

    image: ``[H, W, 3]`` uint8 RGB.  boxes: ``[N, 4]`` float32 (x1, y1, x2, y2) in pixels, the
    edges of the drawn pixels (a shape covering columns 10..19 has x1 = 10, x2 = 20).  labels: ``[N]``
    int64 in 1..K.  instances: ``[H, W]`` uint8, 0 for background and i + 1 where object i was drawn
    (objects do not overlap, so none hides another).
    """

    image: np.ndarray
    boxes: np.ndarray
    labels: np.ndarray
    instances: np.ndarray


def _background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Smooth colour blobs (a few random colours upsampled bilinearly) plus fine grain: ``[H, W, 3]`` int16."""
    from PIL import Image

    cells = rng.integers(0, 256, size=(int(rng.integers(2, 7)), int(rng.integers(2, 7)), 3), dtype=np.uint8)
    # muted: the background's colours stay away from the saturated class colours
    cells = (cells.astype(np.int16) // 2 + 64).astype(np.uint8)
    smooth = np.asarray(Image.fromarray(cells).resize((width, height), Image.BILINEAR), dtype=np.int16)
    stripes = rng.uniform(0, 12) * np.sin(np.arange(width) * rng.uniform(0.02, 0.3) + rng.uniform(0, 6.3))
    return smooth + stripes.astype(np.int16)[None, :, None]


def _place(rng: np.random.Generator, height: int, width: int, taken: list[tuple[int, int, int, int]]):
    """An object box (x0, y0, x1, y1), pixel-inclusive, that stays 2 px clear of the others; None if
    20 tries find no room."""
    for _ in range(20):
        bw = int(rng.integers(MIN_SIDE, min(MAX_SIDE, width - 2) + 1))
        aspect = rng.uniform(0.5, 2.0)
        bh = int(np.clip(round(bw / aspect), MIN_SIDE, min(MAX_SIDE, height - 2)))
        x0 = int(rng.integers(0, width - bw + 1))
        y0 = int(rng.integers(0, height - bh + 1))
        x1, y1 = x0 + bw - 1, y0 + bh - 1
        if all(x0 > b[2] + 2 or x1 < b[0] - 2 or y0 > b[3] + 2 or y1 < b[1] - 2 for b in taken):
            return x0, y0, x1, y1
    return None


def make_scene(seed: int, index: int, num_classes: int = len(SHAPES),
               size: tuple[int, int] | None = None) -> Scene:
    """The scene number ``index`` of the stream ``seed``: the same arguments give the same pixels.

    ``num_classes`` (K, 1..len(SHAPES)) shape classes are used; ``size`` (height, width) overrides
    the size picked from ``IMAGE_SIZES``.
    """
    from PIL import Image, ImageDraw

    if not 1 <= num_classes <= len(SHAPES):
        raise ValueError(f"num_classes must be in 1..{len(SHAPES)} (shapes {SHAPES}), got {num_classes}")
    if index < 0:
        raise ValueError(f"index must be >= 0, got {index}")
    rng = np.random.default_rng([seed, index])
    height, width = size if size is not None else IMAGE_SIZES[int(rng.integers(len(IMAGE_SIZES)))]
    if min(height, width) < MIN_SIDE + 2:
        raise ValueError(f"image size {height}x{width} is too small for objects of {MIN_SIDE} px")
    canvas = Image.fromarray(np.zeros((height, width, 3), np.uint8))
    mask = Image.new("L", (width, height), 0)
    draw, draw_mask = ImageDraw.Draw(canvas), ImageDraw.Draw(mask)
    taken, labels = [], []
    for _ in range(int(rng.integers(MIN_OBJECTS, MAX_OBJECTS + 1))):
        box = _place(rng, height, width, taken)
        if box is None:
            continue
        label = int(rng.integers(1, num_classes + 1))
        colour = tuple(int(c) for c in np.clip(np.asarray(BASE_COLOURS[label - 1])
                                                + rng.integers(-COLOUR_JITTER, COLOUR_JITTER + 1, 3), 0, 255))
        x0, y0, x1, y1 = box
        shape = SHAPES[label - 1]
        apex = int(rng.integers(x0, x1 + 1))  # triangles: apex on the top edge, base on the bottom edge
        for d, fill in ((draw, colour), (draw_mask, len(taken) + 1)):  # the image and the instance map
            if shape == "rectangle":
                d.rectangle(box, fill=fill)
            elif shape == "ellipse":
                d.ellipse(box, fill=fill)
            else:
                d.polygon([(x0, y1), (x1, y1), (apex, y0)], fill=fill)
        taken.append(box)
        labels.append(label)
    instances = np.asarray(mask)
    background = _background(rng, height, width)
    pixels = np.where(instances[..., None] > 0, np.asarray(canvas, dtype=np.int16), background)
    # grain over everything, objects included, so that no region is flat
    pixels = pixels + rng.integers(-12, 13, size=pixels.shape, dtype=np.int16)
    image = np.clip(pixels, 0, 255).astype(np.uint8)
    boxes = np.array([(x0, y0, x1 + 1, y1 + 1) for x0, y0, x1, y1 in taken], np.float32).reshape(-1, 4)
    return Scene(image, boxes, np.array(labels, np.int64), instances)


class SyntheticScenes:
    """Map-style dataset: item ``i`` is ``make_scene(seed, i)`` as (image ``[H, W, 3]`` uint8 tensor,
    target dict of ``boxes`` float32 ``[N, 4]`` and ``labels`` int64 ``[N]``).  Deterministic per index,
    so the order and content don't depend on the number of DataLoader workers."""

    def __init__(self, length: int, seed: int = 0, num_classes: int = len(SHAPES), offset: int = 0):
        self.length, self.seed, self.num_classes, self.offset = length, seed, num_classes, offset

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int):
        import torch

        s = make_scene(self.seed, self.offset + i, self.num_classes)
        return torch.from_numpy(s.image), {"boxes": torch.from_numpy(s.boxes), "labels": torch.from_numpy(s.labels)}


def collate(batch):
    """Lists, as torchvision detection models take them (images of different sizes)."""
    return tuple(zip(*batch))


def build_model(num_classes: int = len(SHAPES), min_size: int | None = None, max_size: int | None = None):
    """fasterrcnn_resnet50_fpn, random init everywhere (no download), ``num_classes + 1`` outputs.

    ``weights_backbone=None`` makes torchvision use trainable ``nn.BatchNorm2d`` and all 5 backbone
    stages trainable.  ``min_size``/``max_size``: transform settings for training only (None keeps
    torchvision's 800/1333); they are not part of the state_dict.
    """
    from torchvision.models.detection import fasterrcnn_resnet50_fpn

    kwargs = {k: v for k, v in (("min_size", min_size), ("max_size", max_size)) if v is not None}
    return fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=num_classes + 1, **kwargs)


@dataclass
class TrainConfig:
    steps: int = 3000
    seconds: float = 90.0
    batch_size: int = 8
    lr: float = 0.02
    optimizer: str = "sgd"  # or "adamw" (lr ~1e-4 then)
    warmup_steps: int = 100
    tail: float = 0.3  # fraction of the budget over which lr decays (cosine) to final_lr_factor
    final_lr_factor: float = 0.05
    clip_norm: float = 10.0
    min_size: int = 512
    max_size: int = 853  # 512 * 1333 / 800: torchvision's ratio of the two
    num_classes: int = len(SHAPES)
    seed: int = 0
    device: str = "auto"
    workers: int = -1  # -1: min(8, CPUs - 1)
    log_every: int = 20
    cudnn_benchmark: bool = True


def lr_factor(step: int, progress: float, cfg: TrainConfig) -> float:
    """Multiplier of ``cfg.lr`` at ``step`` when ``progress`` (0..1) of the budget is spent: linear
    warm-up from 0.001 over ``warmup_steps``, flat, then a cosine tail to ``final_lr_factor``."""
    warm = 1.0
    if step < cfg.warmup_steps:
        warm = 0.001 + (1 - 0.001) * step / cfg.warmup_steps
    start = 1.0 - cfg.tail
    if progress <= start or cfg.tail <= 0:
        decay = 1.0
    else:
        t = min(1.0, (progress - start) / cfg.tail)
        decay = cfg.final_lr_factor + (1 - cfg.final_lr_factor) * 0.5 * (1 + math.cos(math.pi * t))
    return warm * decay


def resolve_device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device {name!r} asked for, but torch sees no CUDA device")
    if name != "cpu" and not name.startswith("cuda"):
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda[:N]', got {name!r}")
    return name


def _batches(cfg: TrainConfig, device: str) -> Iterator:
    import os

    import torch

    dataset = SyntheticScenes(cfg.steps * cfg.batch_size, cfg.seed, cfg.num_classes)
    workers = cfg.workers if cfg.workers >= 0 else max(0, min(8, (os.cpu_count() or 1) - 1))
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=cfg.batch_size, shuffle=False, num_workers=workers, collate_fn=collate,
        pin_memory=device.startswith("cuda"), prefetch_factor=4 if workers else None,
        persistent_workers=False)
    return iter(loader)


def _to_device(images, targets, device: str):
    xs = [im.to(device, non_blocking=True).permute(2, 0, 1).float().div_(255) for im in images]
    ts = [{k: v.to(device, non_blocking=True) for k, v in t.items()} for t in targets]
    return xs, ts


def train(cfg: TrainConfig, log=print):
    """Train and return the model (eval mode, on ``cfg.device``).  Stops after ``cfg.steps`` steps or
    ``cfg.seconds`` of wall clock (counted from the call, model building included), whichever first.

    Raises FloatingPointError if the loss is not finite for 10 steps in a row (AMP skips single ones).
    """
    import torch

    if cfg.steps < 1 or cfg.batch_size < 1:
        raise ValueError(f"steps and batch_size must be >= 1, got {cfg.steps} and {cfg.batch_size}")
    if cfg.optimizer not in ("sgd", "adamw"):
        raise ValueError(f"optimizer must be 'sgd' or 'adamw', got {cfg.optimizer!r}")
    t0 = time.monotonic()
    device = resolve_device(cfg.device)
    cuda = device.startswith("cuda")
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    if cuda:
        torch.cuda.manual_seed_all(cfg.seed)
        torch.backends.cudnn.benchmark = cfg.cudnn_benchmark
    model = build_model(cfg.num_classes, cfg.min_size, cfg.max_size).to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "sgd":
        opt = torch.optim.SGD(params, lr=cfg.lr, momentum=0.9, weight_decay=1e-4)
    else:
        opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=1e-4)
    scaler = torch.amp.GradScaler("cuda", enabled=cuda)
    log(f"training fasterrcnn_resnet50_fpn ({cfg.num_classes} + 1 classes) on {device}: batch {cfg.batch_size}, "
        f"{cfg.optimizer} lr {cfg.lr}, min/max size {cfg.min_size}/{cfg.max_size}, "
        f"budget {cfg.steps} steps or {cfg.seconds:.0f} s{', AMP fp16' if cuda else ''}; "
        f"model ready after {time.monotonic() - t0:.1f} s")
    batches = _batches(cfg, device)
    bad_in_a_row, step, sums, n_sum = 0, 0, {}, 0
    t_last = time.monotonic()
    for step in range(cfg.steps):
        elapsed = time.monotonic() - t0
        if elapsed >= cfg.seconds:
            log(f"wall-clock budget of {cfg.seconds:.0f} s reached after {step} steps")
            break
        progress = max(step / cfg.steps, elapsed / cfg.seconds)
        for g in opt.param_groups:
            g["lr"] = cfg.lr * lr_factor(step, progress, cfg)
        images, targets = _to_device(*next(batches), device)
        with torch.autocast("cuda", dtype=torch.float16, enabled=cuda):
            losses = model(images, targets)
        loss = sum(losses.values())
        if not torch.isfinite(loss):
            bad_in_a_row += 1
            if bad_in_a_row >= 10:
                raise FloatingPointError(f"loss not finite for 10 steps in a row (step {step}): "
                                         f"{ {k: float(v) for k, v in losses.items()} }")
            opt.zero_grad(set_to_none=True)
            continue
        bad_in_a_row = 0
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(params, cfg.clip_norm)
        scaler.step(opt)
        scaler.update()
        for k, v in losses.items():  # summed on the device: no host read per step
            sums[k] = sums.get(k, 0.0) + v.detach().float()
        n_sum += 1
        if (step + 1) % cfg.log_every == 0 or step == 0:
            means = {k: float(v) / n_sum for k, v in sums.items()}
            terms = " ".join(f"{k.removeprefix('loss_')} {v:.3f}" for k, v in means.items())
            now = time.monotonic()
            log(f"step {step + 1:5d}  loss {sum(means.values()):.3f} ({terms})  lr {opt.param_groups[0]['lr']:.4f}"
                f"  {now - t0:6.1f} s  {n_sum * cfg.batch_size / (now - t_last):.1f} img/s")
            sums, n_sum, t_last = {}, 0, now
    else:
        step = cfg.steps
    log(f"trained {step} steps ({step * cfg.batch_size} images) in {time.monotonic() - t0:.1f} s")
    return model.eval()


def count_matched(ref_boxes, ref_labels, boxes, labels, iou_min: float) -> int:
    """How many ``ref`` boxes are matched one to one by ``boxes`` with the same label and IoU >= ``iou_min``
    (the project's matching, ``tests/parity.py`` ``match``, scores ignored)."""
    from parity import Detections, match

    def dets(b, lab):
        b = np.asarray(b, np.float32).reshape(-1, 4)
        return Detections(b, np.zeros(len(b), np.float32), np.asarray(lab, np.int64).reshape(-1))

    return match(dets(ref_boxes, ref_labels), dets(boxes, labels), iou_min=iou_min, score_tol=float("inf"))[0]


def self_check(model, num_images: int = 8, seed: int = 0, num_classes: int = len(SHAPES), log=print) -> dict:
    """Detections on held-out scenes at torchvision's default 800/1333 transform (what the benchmark
    serves).  Returns and prints: mean top score, recall (objects with a detection of score >= 0.5, same
    label, IoU >= 0.5), detections per image and those scoring below 0.1 (near the 0.05 threshold,
    where fp16 can drop one), and on CUDA the share of fp32 detections that autocast fp16 keeps
    (IoU >= 0.9, same label: the benchmark's criterion for fp16)."""
    import torch

    device = next(model.parameters()).device
    t = model.transform
    saved = (t.min_size, t.max_size, torch.backends.cudnn.allow_tf32)
    t.min_size, t.max_size = (800,), 1333
    torch.backends.cudnn.allow_tf32 = False  # fp32 as the benchmark's reference runs it
    model.eval()
    tops, found, total, dets, low, kept, ref_n = [], 0, 0, 0, 0, 0, 0
    try:
        for i in range(num_images):
            s = make_scene(seed, HELD_OUT + i, num_classes)
            x = torch.from_numpy(s.image).to(device).permute(2, 0, 1).float() / 255
            with torch.no_grad():
                out = model([x])[0]
            boxes, scores, labels = (out[k].float().cpu().numpy() for k in ("boxes", "scores", "labels"))
            tops.append(float(scores.max()) if len(scores) else 0.0)
            sure = scores >= 0.5
            found += count_matched(s.boxes, s.labels, boxes[sure], labels[sure], 0.5)
            total += len(s.boxes)
            dets += len(scores)
            low += int((scores < 0.1).sum())
            if device.type == "cuda":
                with torch.no_grad(), torch.autocast("cuda", dtype=torch.float16):
                    half = model([x])[0]
                kept += count_matched(boxes, labels, half["boxes"].float().cpu().numpy(), half["labels"].cpu().numpy(), 0.9)
                ref_n += len(scores)
    finally:
        t.min_size, t.max_size, torch.backends.cudnn.allow_tf32 = saved
    result = {"mean_top_score": float(np.mean(tops)), "found": found, "objects": total, "detections": dets,
              "below_0.1": low, "images": num_images}
    msg = (f"self-check on {num_images} held-out images (800/1333): mean top score {result['mean_top_score']:.3f}, "
           f"found {found}/{total} objects (IoU >= 0.5, score >= 0.5, same label), {dets} detections, "
           f"{low} of them below 0.1")
    if ref_n:
        result["fp16_kept"] = kept / ref_n
        msg += f"; fp16 autocast keeps {kept}/{ref_n} ({100 * kept / ref_n:.1f}%) at IoU >= 0.9, same label"
    log(msg)
    return result


def save(model, path: str | Path) -> Path:
    """``torch.save(model.state_dict(), path)`` (tensors moved to the CPU), parent folders made."""
    import torch

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, path)
    return path


def main(argv: Sequence[str] | None = None) -> int:
    d = TrainConfig()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="where to save the state_dict")
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--seconds", type=float, default=d.seconds, help="wall-clock budget of the training")
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--optimizer", choices=("sgd", "adamw"), default=d.optimizer)
    p.add_argument("--warmup-steps", type=int, default=d.warmup_steps)
    p.add_argument("--min-size", type=int, default=d.min_size, help="training resize (inference keeps 800)")
    p.add_argument("--max-size", type=int, default=d.max_size, help="training resize (inference keeps 1333)")
    p.add_argument("--classes", type=int, default=d.num_classes, help=f"shape classes K, 1..{len(SHAPES)}")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--device", default=d.device, help="auto (cuda if available, else cpu), cpu, cuda[:N]")
    p.add_argument("--workers", type=int, default=d.workers, help="DataLoader workers; -1: min(8, CPUs - 1)")
    p.add_argument("--log-every", type=int, default=d.log_every)
    p.add_argument("--no-cudnn-benchmark", action="store_true")
    p.add_argument("--check-images", type=int, default=8, help="held-out images of the self-check (0: none)")
    args = p.parse_args(argv)
    cfg = TrainConfig(steps=args.steps, seconds=args.seconds, batch_size=args.batch_size, lr=args.lr,
                      optimizer=args.optimizer, warmup_steps=args.warmup_steps, min_size=args.min_size,
                      max_size=args.max_size, num_classes=args.classes, seed=args.seed, device=args.device,
                      workers=args.workers, log_every=args.log_every, cudnn_benchmark=not args.no_cudnn_benchmark)
    try:
        model = train(cfg)
        path = save(model, args.out)
        print(f"saved state_dict to {path}", flush=True)
        if args.check_images > 0:
            self_check(model, args.check_images, cfg.seed, cfg.num_classes)
    except (ValueError, RuntimeError, FloatingPointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Train fasterrcnn_resnet50_fpn from scratch, briefly, on generated scenes: a checkpoint with
confident scores, made here from a seed, with no download.

Why: the fp16 check (:data:`evaluation.parity.FP16`) measures the weights, not the pipeline, when
the weights are seeded random ones (``exporters.loading.random_model``): their class scores are
near-ties that fp16 rounding reorders, and torchvision's own autocast fails the check.  A trained
detector gives separated scores.  COCO weights need a download that the benchmark machines can't do.

The model is ``fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=K + 1)``
(random init everywhere, trainable BatchNorm in the backbone) for the ``K`` shape classes of
:mod:`evaluation.synthetic`.  The saved file is ``model.state_dict()``: it loads with default
transform settings (800/1333, what the benchmark serves), also through
``exporters.loading.checkpoint_model(path)``, which reads the number of classes from it.  Training
resizes to ``TrainConfig.min_size`` for speed; the transform keeps no weights, so nothing of that
setting is saved.

Schedule: SGD (momentum 0.9, weight decay 1e-4), linear warm-up, flat, then a cosine tail over the
last 30% of the budget to 5% of the learning rate.  The budget is ``steps`` or ``seconds`` (wall
clock), whichever runs out first; the schedule follows whichever is further along, so a run cut by
the clock still ends at the low learning rate.  Gradients are clipped at norm 10: from scratch, the
early RPN box-regression gradients are large.  AMP fp16 on CUDA.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from evaluation.parity import FP16, Detections, match
from evaluation.synthetic import HELD_OUT, SHAPES, SyntheticScenes, collate, make_scene


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
    optimizer: str = "sgd"  # or "adamw" (with a learning rate of about 1e-4)
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
    (:func:`evaluation.parity.match`, scores ignored)."""

    def dets(b, lab):
        b = np.asarray(b, np.float32).reshape(-1, 4)
        return Detections(b, np.zeros(len(b), np.float32), np.asarray(lab, np.int64).reshape(-1))

    return match(dets(ref_boxes, ref_labels), dets(boxes, labels), iou_min=iou_min, score_tol=float("inf"))[0]


def self_check(model, num_images: int = 8, seed: int = 0, num_classes: int = len(SHAPES), log=print) -> dict:
    """Detections on held-out scenes at torchvision's default 800/1333 transform (what the benchmark
    serves).  Returns and prints: mean top score, recall (objects with a detection of score >= 0.5, same
    label, IoU >= 0.5), detections per image and those scoring below 0.1 (near the 0.05 threshold,
    where fp16 can drop one), and on CUDA the share of fp32 detections that autocast fp16 keeps
    (same label, IoU >= ``FP16.iou_min``: the fp16 criterion's matching)."""
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
                kept += count_matched(boxes, labels, half["boxes"].float().cpu().numpy(), half["labels"].cpu().numpy(),
                                      FP16.iou_min)
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
        msg += f"; fp16 autocast keeps {kept}/{ref_n} ({100 * kept / ref_n:.1f}%) at IoU >= {FP16.iou_min}, same label"
    log(msg)
    return result


def save(model, path: str | Path) -> Path:
    """``torch.save(model.state_dict(), path)`` (tensors moved to the CPU), parent folders made."""
    import torch

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, path)
    return path

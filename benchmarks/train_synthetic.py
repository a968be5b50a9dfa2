"""Train fasterrcnn_resnet50_fpn from scratch, briefly, on generated shape scenes, and save its state_dict.

    python -m benchmarks.train_synthetic --out /tmp/fasterrcnn_bench/synthetic.pt
    python -m benchmarks.perf --weights /tmp/fasterrcnn_bench/synthetic.pt --accuracy-images synthetic

The checkpoint gives the fp16 accuracy check separated scores (evaluation/training.py says why).
After training, a self-check on held-out scenes (eval mode, default 800/1333 transform) prints the
mean top score, the recall at IoU >= 0.5 (same label, score >= 0.5), how many detections sit near
the 0.05 score threshold, and on CUDA how many of the fp32 detections fp16 autocast keeps.  It is
informational.  Score the fp16 check on generated scenes (``--accuracy-images synthetic``), where
this detector is sure of itself, not on photographs.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from evaluation.synthetic import SHAPES
from evaluation.training import TrainConfig, save, self_check, train


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

"""Write the generated scenes as a COCO dataset (instances.json, images/, class_names.txt).

    python -m benchmarks.coco_scenes --out /tmp/scenes --images 200 [--format jpeg] [--classes 3] [--seed 0]

Then, with a checkpoint trained on the same scenes (benchmarks/train_synthetic.py):

    fasterrcnn export --weights synthetic.pt --class-names /tmp/scenes/class_names.txt
    fasterrcnn serve &
    fasterrcnn evaluate --annotations /tmp/scenes/instances.json --images /tmp/scenes/images --reference
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from evaluation.coco_scenes import FORMATS, write_scenes
from evaluation.synthetic import SHAPES


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="the dataset's folder")
    p.add_argument("--images", type=int, default=200, help="how many scenes")
    p.add_argument("--format", choices=sorted(FORMATS), default="png", help="png (lossless) or jpeg (quality 95)")
    p.add_argument("--classes", type=int, default=len(SHAPES), help=f"shape classes K, 1..{len(SHAPES)}")
    p.add_argument("--seed", type=int, default=0, help="the scene stream (the trainer's seed)")
    args = p.parse_args(argv)
    try:
        path = write_scenes(args.out, args.images, args.seed, args.classes, args.format)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.images} scenes: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

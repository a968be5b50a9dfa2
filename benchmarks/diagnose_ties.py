"""Where the GPU path parts from torchvision on an image with large flat regions (ties).

    python -m benchmarks.diagnose_ties [--out DIR]

A logo on a plain background, seeded random weights (91 classes, torchvision's default sizes),
torchvision eager on CUDA with TF32 off as the reference.  The rpn runs eagerly (with or without
folded batch norms, cuDNN autotuning on or off); the roi and postprocess steps run on the NumPy
or the CuPy backend.  Each variant prints how many of torchvision's detections it matches
(evaluation.parity.PARITY) and how many of torchvision's RPN proposals it reproduces, in order
and as a set.
"""
from __future__ import annotations

import argparse
import itertools
import time

import numpy as np
import torch

from evaluation.parity import PARITY, Detections, match, torchvision_detect
from evaluation.payloads import flat_logo
from exporters.loading import random_model, read_class_names, settings_from_model
from exporters.split import HeaderNetwork, RpnNetwork
from python_backend.backends import get_backend


def reference_proposals(model, image: np.ndarray) -> np.ndarray:
    """torchvision's post-NMS RPN proposals of ``image`` (on the resized image), in its order."""
    seen = {}

    def keep(_module, _inputs, out) -> None:  # a hook that returns nothing leaves the output alone
        seen["boxes"] = out[0][0]

    handle = model.rpn.register_forward_hook(keep)
    try:
        torchvision_detect(model, image)
    finally:
        handle.remove()
    return seen["boxes"].cpu().numpy()


def run_variant(model, settings, image, fold: bool, benchmark: bool, device: str):
    torch.backends.cudnn.benchmark = benchmark
    backend = get_backend(device)
    dev = next(model.parameters()).device
    x, sizes, originals = backend.preprocess_batch([image], settings)
    x, sizes, originals = (backend.to_host(a) for a in (x, sizes, originals))
    rpn = RpnNetwork(model, settings, fold_norms=fold).to(dev).eval()
    header = HeaderNetwork(model).to(dev).eval()
    arr = (lambda t: backend.asarray(t if device == "gpu" else t.cpu().numpy()))
    with torch.no_grad():
        proposals, *maps = rpn(torch.as_tensor(x, device=dev), torch.as_tensor(sizes, device=dev))
        batch = backend.roi_step(arr(proposals), [arr(m) for m in maps], backend.asarray(sizes), settings)
        scores, boxes = header(torch.as_tensor(backend.to_host(batch.features), device=dev),
                               torch.as_tensor(backend.to_host(batch.rois), device=dev))
        out = backend.postprocess_batch(arr(scores), arr(boxes), backend.to_host(batch.counts),
                                        backend.asarray(sizes), backend.asarray(originals), settings)
    b, s, lab, n = (backend.to_host(o)[0] for o in out)
    k = int(n.reshape(-1)[0])
    return Detections(b[:k], s[:k], lab[:k].astype(np.int64)), backend.to_host(batch.rois)


def compare_proposals(ref: np.ndarray, ours: np.ndarray) -> tuple[int, int, int]:
    """(same row in the same place, rows of ref found anywhere in ours within 1e-3, len(ref))."""
    n = min(len(ref), len(ours))
    in_place = int((np.abs(ref[:n] - ours[:n]).max(axis=1) <= 1e-3).sum())
    d = np.abs(ref[:, None, :] - ours[None, :, :]).max(axis=2)
    return in_place, int((d.min(axis=1) <= 1e-3).sum()), len(ref)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.diagnose_ties", description=__doc__.split("\n\n")[0])
    p.parse_args(argv)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    cuda = torch.cuda.is_available()
    model = random_model(num_classes=91, seed=0).to("cuda" if cuda else "cpu").eval()
    settings = settings_from_model(model, class_names=read_class_names(None, 91))
    image = flat_logo()
    ref = torchvision_detect(model, image)
    ref_props = reference_proposals(model, image)
    scores = np.sort(ref.scores)
    near = int(sum(np.any(np.abs(scores[i] - np.delete(scores, i)) <= 1e-3) for i in range(len(scores))))
    print(f"torchvision: {len(ref.scores)} detections, {near} with another score within 1e-3; "
          f"{len(ref_props)} RPN proposals", flush=True)
    print("| rpn batch norms | cudnn autotune | steps | detections matched | extra | proposals in place | as a set |")
    print("| --- | --- | --- | ---: | ---: | ---: | ---: |")
    devices = ("gpu", "cpu") if cuda else ("cpu",)
    for fold, benchmark, device in itertools.product((True, False), (True, False) if cuda else (False,), devices):
        t0 = time.perf_counter()
        dets, rois = run_variant(model, settings, image, fold, benchmark, device)
        matched, extra = match(ref, dets, PARITY.iou_min, PARITY.score_tol)
        in_place, as_set, total = compare_proposals(ref_props, rois)
        print(f"| {'folded' if fold else 'apart'} | {'on' if benchmark else 'off'} | "
              f"{'CuPy' if device == 'gpu' else 'NumPy'} | {matched}/{len(ref.scores)} | {extra} | "
              f"{in_place}/{total} | {as_set}/{total} |  ({time.perf_counter() - t0:.1f} s)", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

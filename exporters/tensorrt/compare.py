"""Check built engines against ONNX Runtime, and the engine-building CLI.

CLI::

    python -m exporters.tensorrt.compare --onnx artifacts/onnx --out artifacts/plans \\
        --max-batch-size 8 --precision fp16 --timing-cache artifacts/timing.cache --check
"""
from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from python_backend import names
from python_backend.settings import DetectorSettings, parse_canvases

from ..repository import RepositoryOptions
from ..specs import CANVASES_KEY
from .build import DEFAULT_WORKSPACE_BYTES, PRECISIONS, EngineBuildError, TensorRTUnavailable, build_plans
from .profiles import Shape, onnx_input_dims
from .run import run_engine

# proposals [B, K, 6] columns (exporters/split.py RpnNetwork): x1, y1, x2, y2, score, FPN level (-1: invalid)
SCORE, LEVEL = 4, 5
_REL_FLOOR = 1e-3  # |reference| below this is compared by absolute difference only
_REL_EPS = 1e-6


@dataclass(frozen=True)
class OutputDiff:
    name: str
    max_abs: float
    max_rel: float  # max |a - b| / (|b| + 1e-6) where |b| > 1e-3, else 0
    shape: Shape


def output_diff(name: str, engine: np.ndarray, reference: np.ndarray) -> OutputDiff:
    """Largest absolute and relative differences of one output; shapes must match."""
    a, b = np.asarray(engine, np.float64), np.asarray(reference, np.float64)
    if a.shape != b.shape:
        raise ValueError(f"output {name!r}: engine shape {a.shape}, ONNX Runtime shape {b.shape}")
    err = np.abs(a - b)
    big = np.abs(b) > _REL_FLOOR
    rel = float((err[big] / (np.abs(b[big]) + _REL_EPS)).max()) if big.any() else 0.0
    return OutputDiff(name, float(err.max()) if err.size else 0.0, rel, tuple(a.shape))


def onnxruntime_outputs(onnx_path: str | Path, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Every output of the ONNX on ONNX Runtime's CPU provider: the reference."""
    from python_backend.onnx_session import open_session

    session = open_session(onnx_path)
    feeds = {i.name: np.asarray(inputs[i.name], dtype=np.float32) for i in session.get_inputs()}
    out_names = [o.name for o in session.get_outputs()]
    return dict(zip(out_names, session.run(out_names, feeds)))


def compare_with_onnxruntime(plan: str | Path, onnx_path: str | Path, inputs: Mapping[str, np.ndarray],
                             device_index: int = 0) -> dict[str, OutputDiff]:
    """Run the engine and ONNX Runtime (CPU) on the same inputs; per-output differences."""
    trt_out = run_engine(plan, inputs, device_index)
    return {name: output_diff(name, trt_out[name], ref) for name, ref in onnxruntime_outputs(onnx_path, inputs).items()}


# ----------------------------------------------------------------------------------------------
# Rows compared as sets (TopK ties)
# ----------------------------------------------------------------------------------------------

def unmatched_rows(a: np.ndarray, b: np.ndarray, atol, rtol: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Pair rows of ``a [N, D]`` with rows of ``b [M, D]`` one to one, every column within
    ``atol + rtol * |b|`` (``atol`` a number or one per column), greedily in ``a``'s order;
    returns the indices of ``a``'s and ``b``'s rows left unpaired."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    tol = np.broadcast_to(np.asarray(atol, np.float64), (a.shape[1],))
    close = np.all(np.abs(a[:, None, :] - b[None, :, :]) <= tol + rtol * np.abs(b[None, :, :]), axis=2)
    used = np.zeros(len(b), dtype=bool)
    lone_a = []
    for i in range(len(a)):
        free = np.flatnonzero(close[i] & ~used)
        if free.size:
            used[free[0]] = True
        else:
            lone_a.append(i)
    return np.asarray(lone_a, dtype=np.int64), np.flatnonzero(~used)


def anchor_scaled_atol(anchor_sizes: Sequence[float], box_atol: float, anchor_rtol: float,
                       score_atol: float) -> dict[int, list[float]]:
    """{level: atol per proposals column}: box corners within ``box_atol + anchor_rtol *`` the
    level's anchor size, the score within ``score_atol``, the level exact.  A proposal is its
    anchor moved and scaled by the regression deltas (``exp(dw) * anchor``), so a delta that two
    runtimes sum in another order moves a box in proportion to its anchor; level -1 (padding
    rows) gets the smallest anchor's."""
    tol = {level: [box_atol + anchor_rtol * size] * 4 + [score_atol, 0.0] for level, size in enumerate(anchor_sizes)}
    tol[-1] = tol[0]
    return tol


def proposal_mismatches(engine: np.ndarray, reference: np.ndarray, atol, rtol: float = 0.0,
                        score_atol: float = 0.0) -> list[str]:
    """Differences between two ``proposals [B, K, 6]`` outputs, compared as sets of rows.

    TopK returns near-equal scores in either order, and at its cutoff keeps either of two rows
    that tie, so rows are compared as sets per image and FPN level, as torchvision's
    ``test_nms_gpu`` accepts different indices only where their scores are equal.  A row without
    a partner within ``atol``/``rtol`` (``atol`` may be {level: atol}, as
    :func:`anchor_scaled_atol` gives) is a mismatch, unless its score is within ``score_atol``
    of the other output's lowest score of that level: a tie at the cutoff (where a box that
    moved can't be told from a tied row kept instead, so the cutoff row's box is not checked).
    """
    engine, reference = np.asarray(engine), np.asarray(reference)
    if engine.shape != reference.shape or engine.ndim != 3 or engine.shape[2] <= LEVEL:
        raise ValueError(f"expected two proposals arrays [B, K, 6] of one shape, got {engine.shape} and "
                         f"{reference.shape}")
    problems = []
    for image in range(engine.shape[0]):
        e_rows, r_rows = engine[image], reference[image]
        levels = sorted(set(np.rint(e_rows[:, LEVEL]).tolist()) | set(np.rint(r_rows[:, LEVEL]).tolist()))
        for level in levels:
            e = e_rows[np.rint(e_rows[:, LEVEL]) == level]
            r = r_rows[np.rint(r_rows[:, LEVEL]) == level]
            level_atol = atol[int(level)] if isinstance(atol, Mapping) else atol
            lone_e, lone_r = unmatched_rows(e, r, level_atol, rtol)
            for side, rows, lone, other in (("engine", e, lone_e, r), ("reference", r, lone_r, e)):
                cutoff = other[:, SCORE].min() if len(other) else np.inf
                for i in lone:
                    if not abs(rows[i, SCORE] - cutoff) <= score_atol:
                        problems.append(f"image {image} level {level:g}: {side} row {rows[i].tolist()} has no "
                                        f"partner and is not a tie at the cutoff score {cutoff:.6g}")
    return problems


# ----------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------

def settings_from_onnx(rpn_model, header_model, rpn_post_nms_top_n: int) -> DetectorSettings:
    """The settings the profiles need, read from the exported ONNX (canvases, RoI size, classes).
    Only the profile fields are meaningful; use the exporter's settings where you have them."""
    meta = {p.key: p.value for p in rpn_model.metadata_props}
    if CANVASES_KEY not in meta:
        raise ValueError(f"the rpn ONNX has no {CANVASES_KEY!r} metadata: export it again with exporters.onnx_export")
    roi_dims = onnx_input_dims(header_model)[names.ROI_FEATURES]
    scores = next(o for o in header_model.graph.output if o.name == names.CLASS_SCORES)
    num_classes = scores.type.tensor_type.shape.dim[1].dim_value
    return DetectorSettings(num_classes=int(num_classes), canvases=parse_canvases(meta[CANVASES_KEY]),
                            roi_output_size=int(roi_dims[2]), rpn_post_nms_top_n=int(rpn_post_nms_top_n))


def random_inputs(settings: DetectorSettings, batch: int = 2, rois: int = 300, seed: int = 0,
                  canvas: tuple[int, int] | None = None) -> dict[str, dict]:
    """Plausible inputs for the numeric check: normalized noise images filling ``canvas`` (default:
    the largest of the settings' canvases) and RoIs inside it."""
    rng = np.random.default_rng(seed)
    h, w = canvas or settings.largest_canvas
    s = settings.roi_output_size
    margin, min_side, max_side = 32, 8, 256  # RoI corners inside the canvas, sides in pixels
    xy = rng.uniform(0, [w - margin, h - margin], size=(rois, 2))
    wh = rng.uniform(min_side, max_side, size=(rois, 2))
    boxes = np.concatenate([xy, np.minimum(xy + wh, [w, h])], axis=1).astype(np.float32)
    return {
        names.RPN: {names.IMAGES: rng.standard_normal((batch, 3, h, w), dtype=np.float32),
                    names.IMAGE_SIZES: np.array([[h, w]] * batch, dtype=np.float32)},
        names.HEADER: {names.ROI_FEATURES: rng.standard_normal((rois, s, s, settings.fpn_channels), dtype=np.float32),
                       names.ROIS: boxes},
    }


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m exporters.tensorrt.compare",
                                description="Build rpn.plan and header.plan from the exported ONNX, and compare "
                                            "them with ONNX Runtime (--check).")
    p.add_argument("--onnx", required=True, type=Path, help="folder with rpn.onnx and header.onnx (exporters output)")
    p.add_argument("--out", required=True, type=Path, help="folder for rpn.plan and header.plan")
    p.add_argument("--precision", choices=PRECISIONS, default="fp16")
    p.add_argument("--max-batch-size", type=int, default=RepositoryOptions.max_batch_size,
                   help="images per batch; must equal the model repository's max_batch_size")
    p.add_argument("--rpn-post-nms-top-n", type=int, default=DetectorSettings.rpn_post_nms_top_n,
                   help="RoIs per image (the model's eval value)")
    p.add_argument("--header-opt-rois", type=int, default=None, help="header profile opt R (default: the max)")
    p.add_argument("--workspace-gib", type=float, default=DEFAULT_WORKSPACE_BYTES / 2**30)
    p.add_argument("--timing-cache", type=Path, default=None)
    p.add_argument("--device", type=int, default=0, help="CUDA device to build and check on")
    p.add_argument("--check", action="store_true", help="compare each engine with ONNX Runtime on random inputs")
    p.add_argument("--verbose", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    try:
        import onnx

        paths = {n: args.onnx / f"{n}.onnx" for n in (names.RPN, names.HEADER)}
        for path in paths.values():
            if not path.is_file():
                raise FileNotFoundError(f"{path} does not exist: export the ONNX first")
        settings = settings_from_onnx(onnx.load(str(paths[names.RPN]), load_external_data=False),
                                      onnx.load(str(paths[names.HEADER]), load_external_data=False),
                                      args.rpn_post_nms_top_n)
        plans = build_plans(paths, args.out, settings, args.max_batch_size, args.precision,
                            int(args.workspace_gib * 2**30), args.timing_cache, args.header_opt_rois, args.verbose,
                            device_index=args.device)
        if args.check:
            # the header once, the rpn on every canvas (each through its group's optimization profile)
            checks = [(names.HEADER, random_inputs(settings)[names.HEADER], "")]
            checks += [(names.RPN, random_inputs(settings, canvas=c)[names.RPN], f" ({c[0]}x{c[1]})")
                       for c in settings.canvases]
            for name, inputs, where in checks:
                for out, d in compare_with_onnxruntime(plans[name], paths[name], inputs, args.device).items():
                    print(f"{name}{where}/{out}: max abs {d.max_abs:.3g}, max rel {d.max_rel:.3g}")
    except (TensorRTUnavailable, EngineBuildError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

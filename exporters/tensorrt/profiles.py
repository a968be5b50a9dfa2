"""Optimization profiles of the rpn and header engines (pure: no TensorRT import)."""
from __future__ import annotations

from typing import Sequence

from python_backend import names
from python_backend.settings import DetectorSettings

from ..specs import max_rois, tensor_specs

Shape = tuple[int, ...]
Profile = dict[str, tuple[Shape, Shape, Shape]]  # input name -> (min, opt, max)


def optimization_profiles(settings: DetectorSettings, max_batch_size: int,
                          header_opt_rois: int | None = None) -> dict[str, Profile]:
    """``{model: {input: (min, opt, max)}}`` for the rpn and header engines.

    rpn: the batch B of images runs 1..``max_batch_size`` on the fixed canvas.
    header: the RoI count R runs 1..``max_batch_size * rpn_post_nms_top_n``, the same limit as
    the header's Triton ``max_batch_size`` (:func:`exporters.specs.max_rois`), because the
    header's dynamic batcher hands several images' RoIs over in one call.

    Why opt = max for both: TensorRT runs every shape in [min, max] correctly and only tunes
    its tactics for opt.  The shapes where speed matters are the ones under load, where Triton's
    dynamic batcher fills batches (rpn: max_batch_size images; header: their RoIs).  At low load
    a lone image is latency bound by the rpn, and the header's GEMMs (M = R) keep near-optimal
    tactics over a wide range of M.  ``header_opt_rois`` overrides the header's opt (for example
    ``rpn_post_nms_top_n`` for a latency-first deployment of single images).
    """
    b = int(max_batch_size)
    if b < 1:
        raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
    r_max = max_rois(settings, b)
    r_opt = r_max if header_opt_rois is None else int(header_opt_rois)
    if not 1 <= r_opt <= r_max:
        raise ValueError(f"header_opt_rois must be in 1..{r_max}, got {header_opt_rois}")

    def batch_axis(lo: int, opt: int, hi: int, rest: Sequence[int]) -> tuple[Shape, Shape, Shape]:
        rest = tuple(int(d) for d in rest)
        return ((lo, *rest), (opt, *rest), (hi, *rest))

    # per-item dims from the one place the repository's configs take them from
    inputs = {model: {t["name"]: t["dims"] for t in tensor_specs(settings)[model][0]}
              for model in (names.RPN, names.HEADER)}
    return {
        names.RPN: {n: batch_axis(1, b, b, d) for n, d in inputs[names.RPN].items()},
        names.HEADER: {n: batch_axis(1, r_opt, r_max, d) for n, d in inputs[names.HEADER].items()},
    }


def onnx_input_dims(onnx_model) -> dict[str, list[int | str]]:
    """``{input: dims}`` of an ONNX model; a dynamic dimension is its ``dim_param`` (or ``"?"``)."""
    out = {}
    for value in onnx_model.graph.input:
        dims = value.type.tensor_type.shape.dim
        out[value.name] = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in dims]
    return out


def check_profile(profile: Profile, onnx_model) -> None:
    """Raise ``ValueError`` unless ``profile`` covers exactly the ONNX inputs, with their rank and
    static dimensions, and min <= opt <= max on every axis."""
    dims = onnx_input_dims(onnx_model)
    if set(dims) != set(profile):
        raise ValueError(f"profile inputs {sorted(profile)} do not match the ONNX inputs {sorted(dims)}")
    for name, (lo, opt, hi) in profile.items():
        expected = dims[name]
        for label, shape in (("min", lo), ("opt", opt), ("max", hi)):
            if len(shape) != len(expected):
                raise ValueError(f"profile {label} shape of {name!r} is {shape}, expected rank {len(expected)} "
                                 f"(ONNX dims {expected})")
            for axis, (got, want) in enumerate(zip(shape, expected)):
                if isinstance(want, int) and want > 0 and got != want:
                    raise ValueError(f"profile {label} shape of {name!r} has {got} on axis {axis}, "
                                     f"expected the ONNX's static {want}")
        for axis, (a, b, c) in enumerate(zip(lo, opt, hi)):
            if not 1 <= a <= b <= c:
                raise ValueError(f"profile of {name!r} axis {axis}: expected 1 <= min <= opt <= max, got {a}, {b}, {c}")


def shapes_string(profile: Profile, which: int) -> str:
    """``"images:1x3x800x1344,image_sizes:1x2"`` for min (0), opt (1) or max (2): the format of
    ONNX Runtime's TensorRT EP ``trt_profile_*_shapes`` options."""
    return ",".join(f"{name}:{'x'.join(str(d) for d in shapes[which])}" for name, shapes in profile.items())

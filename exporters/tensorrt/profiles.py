"""Optimization profiles of the rpn and header engines (pure: no TensorRT import)."""
from __future__ import annotations

from typing import Mapping, Sequence

from python_backend import names
from python_backend.settings import DetectorSettings

from ..specs import max_rois, tensor_specs

Shape = tuple[int, ...]
Profile = dict[str, tuple[Shape, Shape, Shape]]  # input name -> (min, opt, max)


def optimization_profiles(settings: DetectorSettings, max_batch_size: int,
                          header_opt_rois: int | None = None) -> dict[str, list[Profile]]:
    """``{model: [profile, ...]}`` for the rpn and header engines, each profile ``{input: (min, opt, max)}``.

    rpn: one profile per group of :func:`canvas_groups` (landscape canvases, portrait canvases),
    in ``settings.canvases`` order: height and width span the group's canvases (opt: its largest
    canvas), the batch B of images 1..``max_batch_size``.  Triton's TensorRT backend runs each
    batch with the listed profile whose ranges hold its shapes (the closest to opt among those:
    ``GetMostOptimizedProfile`` in triton-inference-server/tensorrt_backend src/instance_state.cc).
    Why groups and not one profile per canvas: that backend creates one execution context per
    listed profile in every instance (``InitOptimizationProfiles``), and each context allocates
    the activation memory of the engine's largest profile (``createExecutionContext``'s default
    ``kSTATIC`` strategy, NvInferRuntime.h), so five canvases meant five times the rpn's largest
    activations; docs/docker.md gives the estimate.
    header: one profile, the RoI count R 1..``max_batch_size * rpn_post_nms_top_n``, the same limit
    as the header's Triton ``max_batch_size`` (:func:`exporters.specs.max_rois`), because the
    header's dynamic batcher hands several images' RoIs over in one call.

    Why opt = max batch: TensorRT runs every shape in [min, max] correctly and only tunes its
    tactics for opt.  The shapes where speed matters are the ones under load, where Triton's
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
    rpn = []
    for group in canvas_groups(settings.canvases):
        lo = (min(h for h, _ in group), min(w for _, w in group))
        hi = (max(h for h, _ in group), max(w for _, w in group))
        opt = max(group, key=lambda c: c[0] * c[1])
        rpn.append({n: ((1, *_at_canvas(d, lo)), (b, *_at_canvas(d, opt)), (b, *_at_canvas(d, hi)))
                    for n, d in inputs[names.RPN].items()})
    return {
        names.RPN: rpn,
        names.HEADER: [{n: batch_axis(1, r_opt, r_max, d) for n, d in inputs[names.HEADER].items()}],
    }


def canvas_groups(canvases: Sequence[tuple[int, int]]) -> list[list[tuple[int, int]]]:
    """The canvases that share one rpn profile, in first-seen order: the landscape ones (height <=
    width) and the portrait ones, each group one profile when the box spanning its heights and
    widths is no larger in area than the largest canvas (so no context needs more memory than one
    canvas does), else one group per canvas.  ``800x800,800x1088,1088x800,800x1344,1344x800``:
    ``[[800x800, 800x1088, 800x1344], [1088x800, 1344x800]]``, heights 800 and widths 800..1344,
    then heights 1088..1344 and width 800."""
    largest = max((h * w for h, w in canvases), default=0)
    groups: dict[bool, list[tuple[int, int]]] = {}
    for h, w in canvases:
        groups.setdefault(h > w, []).append((int(h), int(w)))
    out = []
    for group in groups.values():
        box = max(h for h, _ in group) * max(w for _, w in group)
        out += [group] if box <= largest else [[c] for c in group]
    return out


def _at_canvas(dims: Sequence[int], canvas: tuple[int, int]) -> list[int]:
    """Per-item dims with their dynamic height and width (the -1s, in that order) set to ``canvas``."""
    free = [axis for axis, d in enumerate(dims) if d == -1]
    if free and len(free) != 2:
        raise ValueError(f"expected dims with a dynamic height and width or none, got {list(dims)}")
    out = [int(d) for d in dims]
    for axis, size in zip(free, canvas):
        out[axis] = int(size)
    return out


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


def check_profiles(profiles: Sequence[Profile], onnx_model) -> None:
    """:func:`check_profile` for each of an engine's profiles (at least one)."""
    if not profiles:
        raise ValueError("expected at least one optimization profile, got none")
    for profile in profiles:
        check_profile(profile, onnx_model)


def profile_for(profiles: Sequence[Profile], shapes: Mapping[str, Sequence[int]]) -> int | None:
    """Index of the first profile whose [min, max] holds every input's shape in ``shapes``
    ({input: shape}), or None: the profile an engine runs such a batch with."""
    for index, profile in enumerate(profiles):
        if all(len(shapes[n]) == len(lo) and all(a <= s <= c for a, s, c in zip(lo, shapes[n], hi))
               for n, (lo, _, hi) in profile.items()):
            return index
    return None


def shapes_string(profiles: Sequence[Profile], which: int) -> str:
    """``"images:1x3x800x800,image_sizes:1x2,images:1x3x800x1088,..."`` for min (0), opt (1) or
    max (2): the format of ONNX Runtime's TensorRT EP ``trt_profile_*_shapes`` options, which
    reads an input named again as the next profile's (tensorrt_execution_provider.cc in
    microsoft/onnxruntime, onnxruntime/core/providers/tensorrt)."""
    return ",".join(f"{name}:{'x'.join(str(d) for d in shapes[which])}"
                    for profile in profiles for name, shapes in profile.items())

"""TensorRT engine building: profiles, configs of every target, fp32 layer selection, errors.

Everything except the ``tensorrt``-marked tests runs without TensorRT (CI).  Those build real
engines from a tiny exported model and compare them with ONNX Runtime; they skip where
``import tensorrt`` fails or no CUDA GPU is visible.
"""
from __future__ import annotations

import sys
import types
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import pytest

from exporters import tensorrt_build as tb
from exporters.repository import RepositoryOptions, read_config, write_repository
from exporters.specs import max_rois
from python_backend import names
from python_backend.settings import DetectorSettings

TRT_SKIP_REASON = "TensorRT is not installed (it can't be installed on these machines; see README)"
ONNX_TO_TRITON = {onnx.TensorProto.FLOAT: "TYPE_FP32", onnx.TensorProto.INT32: "TYPE_INT32"}


# ----------------------------------------------------------------------------------------------
# fixtures
# ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny random fasterrcnn exported to ONNX once: (settings, {"rpn": path, "header": path})."""
    from exporters.loading import random_model, settings_from_model
    from exporters.onnx_export import export_header, export_rpn

    model = random_model(num_classes=5, seed=0, peaky=50, min_size=256, max_size=320)
    settings = settings_from_model(model, canvas=(320, 320))
    out = tmp_path_factory.mktemp("onnx")
    paths = {}
    for name, fn in ((names.RPN, export_rpn), (names.HEADER, export_header)):
        paths[name] = out / f"{name}.onnx"
        onnx.save(fn(model, settings), str(paths[name]))
    return settings, paths


def _settings(**kw) -> DetectorSettings:
    return DetectorSettings(num_classes=5, canvas_height=320, canvas_width=320, **kw)


# ----------------------------------------------------------------------------------------------
# profiles
# ----------------------------------------------------------------------------------------------

def test_profiles_cover_batch_and_rois():
    settings = _settings(rpn_post_nms_top_n=300)
    options = RepositoryOptions(target="tensorrt", max_batch_size=4)
    p = tb.optimization_profiles(settings, options)
    assert set(p) == {names.RPN, names.HEADER}
    assert p[names.RPN][names.IMAGES] == ((1, 3, 320, 320), (4, 3, 320, 320), (4, 3, 320, 320))
    assert p[names.RPN][names.IMAGE_SIZES] == ((1, 2), (4, 2), (4, 2))
    r = max_rois(settings, options.max_batch_size)
    assert r == 1200
    assert p[names.HEADER][names.ROI_FEATURES] == ((1, 7, 7, 256), (r, 7, 7, 256), (r, 7, 7, 256))
    assert p[names.HEADER][names.ROIS] == ((1, 4), (r, 4), (r, 4))


def test_profile_header_opt_override():
    settings = _settings()
    options = RepositoryOptions(target="tensorrt", max_batch_size=8)
    p = tb.optimization_profiles(settings, options, header_opt_rois=1000)
    assert p[names.HEADER][names.ROIS] == ((1, 4), (1000, 4), (8000, 4))
    with pytest.raises(ValueError, match=r"header_opt_rois must be in 1\.\.8000, got 9000"):
        tb.optimization_profiles(settings, options, header_opt_rois=9000)


def test_profiles_match_onnx_inputs(tiny):
    settings, paths = tiny
    profiles = tb.optimization_profiles(settings, RepositoryOptions(target="tensorrt", max_batch_size=2))
    for name, path in paths.items():
        tb.check_profile(profiles[name], onnx.load(str(path)))


def test_check_profile_rejects_mismatches(tiny):
    settings, paths = tiny
    rpn = onnx.load(str(paths[names.RPN]))
    wrong_canvas = tb.optimization_profiles(DetectorSettings(num_classes=5, canvas_height=320, canvas_width=352),
                                            RepositoryOptions())[names.RPN]
    with pytest.raises(ValueError, match=r"'images' has 352 on axis 3, expected the ONNX's static 320"):
        tb.check_profile(wrong_canvas, rpn)
    header_profile = tb.optimization_profiles(settings, RepositoryOptions())[names.HEADER]
    with pytest.raises(ValueError, match="do not match the ONNX inputs"):
        tb.check_profile(header_profile, rpn)
    good = tb.optimization_profiles(settings, RepositoryOptions())[names.RPN]
    bad_order = dict(good, **{names.IMAGE_SIZES: ((2, 2), (1, 2), (8, 2))})
    with pytest.raises(ValueError, match="min <= opt <= max"):
        tb.check_profile(bad_order, rpn)


def test_shapes_string_is_ort_format():
    profile = {"a": ((1, 3), (4, 3), (8, 3)), "b": ((1,), (2,), (3,))}
    assert tb.shapes_string(profile, 0) == "a:1x3,b:1"
    assert tb.shapes_string(profile, 2) == "a:8x3,b:3"


# ----------------------------------------------------------------------------------------------
# configs of every target, against the ONNX I/O and the profiles
# ----------------------------------------------------------------------------------------------

def _onnx_io(path: Path):
    m = onnx.load(str(path))

    def spec(values):
        return {v.name: (ONNX_TO_TRITON[v.type.tensor_type.elem_type],
                         [d.dim_value if d.HasField("dim_value") else -1 for d in v.type.tensor_type.shape.dim])
                for v in values}

    return spec(m.graph.input), spec(m.graph.output)


def _parse_shapes(text: str) -> dict[str, tuple[int, ...]]:
    out = {}
    for item in text.split(","):
        name, dims = item.split(":")
        out[name] = tuple(int(d) for d in dims.split("x"))
    return out


TARGET_CASES = {
    "python": dict(target="python", device="gpu"),
    "onnxruntime": dict(target="onnxruntime"),
    "onnxruntime+trt": dict(target="onnxruntime", ort_tensorrt=True, trt_precision="fp16",
                            ort_trt_cache_dir="/cache/ort_trt"),
    "tensorrt": dict(target="tensorrt"),
}


@pytest.mark.parametrize("case", list(TARGET_CASES))
def test_network_configs_match_onnx_and_profiles(case, tiny, tmp_path):
    from tritonclient.grpc import model_config_pb2 as mc

    settings, paths = tiny
    options = RepositoryOptions(max_batch_size=2, **TARGET_CASES[case])
    plans = None
    if options.target == "tensorrt":
        plans = {}
        for name in (names.RPN, names.HEADER):
            plans[name] = tmp_path / f"{name}.plan"
            plans[name].write_bytes(b"not a real engine")
    repo = write_repository(tmp_path / "repo", settings, paths, options, plans=plans)
    profiles = tb.optimization_profiles(settings, options)

    for name in (names.RPN, names.HEADER):
        cfg = read_config(repo / name / "config.pbtxt")
        assert cfg.name == name
        onnx_in, onnx_out = _onnx_io(paths[name])
        for tensors, expected in ((cfg.input, onnx_in), (cfg.output, onnx_out)):
            got = {t.name: (mc.DataType.Name(t.data_type), [-1] + list(t.dims)) for t in tensors}
            assert got == expected, f"{case}/{name}: config {got}, ONNX {expected}"
        # the batch axis: Triton's max_batch_size is the profile's max, and the non-batch dims
        # of every profile shape are the config's dims
        profile = profiles[name]
        for t in cfg.input:
            lo, opt, hi = profile[t.name]
            assert hi[0] == cfg.max_batch_size, f"{name}/{t.name}: profile max {hi[0]}, config {cfg.max_batch_size}"
            assert lo[0] == 1
            assert lo[1:] == opt[1:] == hi[1:] == tuple(t.dims)
        version = repo / name / "1"
        if options.target == "tensorrt":
            assert cfg.platform == "tensorrt_plan"
            assert (version / "model.plan").read_bytes() == b"not a real engine"
            assert not (version / "model.onnx").exists()
        else:
            assert (version / "model.onnx").is_file()
        accs = list(cfg.optimization.execution_accelerators.gpu_execution_accelerator)
        if options.ort_tensorrt:
            assert cfg.platform == "onnxruntime_onnx"
            assert [a.name for a in accs] == ["tensorrt"]
            params = dict(accs[0].parameters)
            assert params["precision_mode"] == "FP16"
            assert params["trt_engine_cache_enable"] == "1"
            assert params["trt_engine_cache_path"] == "/cache/ort_trt"
            for which, key in enumerate(("trt_profile_min_shapes", "trt_profile_opt_shapes", "trt_profile_max_shapes")):
                assert _parse_shapes(params[key]) == {k: v[which] for k, v in profile.items()}
        else:
            assert accs == []
    # every config of the repository parses
    for path in repo.glob("*/config.pbtxt"):
        read_config(path)


def test_repository_options_validate_trt_fields():
    with pytest.raises(ValueError, match="ort_tensorrt applies to the onnxruntime target only, got target 'tensorrt'"):
        RepositoryOptions(target="tensorrt", ort_tensorrt=True)
    with pytest.raises(ValueError, match=r"trt_precision must be one of \('fp32', 'fp16'\), got 'int8'"):
        RepositoryOptions(target="onnxruntime", ort_tensorrt=True, trt_precision="int8")
    RepositoryOptions()  # defaults unchanged for existing callers


# ----------------------------------------------------------------------------------------------
# fp32 layer selection, with look-alike layers
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Enum:
    name: str


@dataclass
class _Tensor:
    name: str
    dtype: _Enum = field(default_factory=lambda: _Enum("FLOAT"))


@dataclass
class _Layer:
    name: str
    type: _Enum
    ins: list
    outs: list
    op: _Enum | None = None
    precision: object = None
    output_types: dict = field(default_factory=dict)

    @property
    def num_inputs(self):
        return len(self.ins)

    @property
    def num_outputs(self):
        return len(self.outs)

    def get_input(self, i):
        return self.ins[i]

    def get_output(self, i):
        return self.outs[i]

    def set_output_type(self, i, dtype):
        self.output_types[i] = dtype


class _Network:
    def __init__(self):
        self.layers: list[_Layer] = []
        self.tensors: dict[str, _Tensor] = {}

    def add(self, name, kind, ins=(), outs=None, op=None, dtypes=None):
        outs = outs or [name + ":0"]
        dtypes = dtypes or ["FLOAT"] * len(outs)
        for o, d in zip(outs, dtypes):
            self.tensors[o] = _Tensor(o, _Enum(d))
        self.layers.append(_Layer(name, _Enum(kind), [self.tensors[i] for i in ins],
                                  [self.tensors[o] for o in outs], _Enum(op) if op else None))
        return outs[0]

    @property
    def num_layers(self):
        return len(self.layers)

    def get_layer(self, i):
        return self.layers[i]


def _detector_like_network() -> _Network:
    """A small graph with the rpn/header patterns:

    image > Mul(mask) > Conv > Add(residual, Conv) > Conv(head) > Select(valid) > TopK > Sigmoid
    head > Sub/Exp/Mul decode with anchors (tail) > Concat > output; bias Add with a constant
    before a conv; a bool mask (Less) and int32 shape arithmetic.
    """
    n = _Network()
    n.tensors["images"] = _Tensor("images")
    n.tensors["sizes"] = _Tensor("sizes")
    shape = n.add("shape", "SHAPE", ["images"], dtypes=["INT32"])
    n.add("shape_mul", "ELEMENTWISE", [shape, shape], op="PROD", dtypes=["INT32"])
    mask_bool = n.add("mask_less", "ELEMENTWISE", ["sizes", "sizes"], op="LESS", dtypes=["BOOL"])
    mask = n.add("mask_cast", "CAST", [mask_bool])
    x = n.add("mask_mul", "ELEMENTWISE", ["images", mask], op="PROD")
    c1 = n.add("conv1", "CONVOLUTION", [x])
    bias = n.add("bias_const", "CONSTANT")
    b1 = n.add("bias_add", "ELEMENTWISE", [c1, bias], op="SUM")
    c2 = n.add("conv2", "CONVOLUTION", [b1])
    res = n.add("residual_add", "ELEMENTWISE", [c2, c1], op="SUM")
    relu = n.add("relu", "ACTIVATION", [res], op="RELU")
    head = n.add("head_conv", "CONVOLUTION", [relu])
    valid = n.add("valid", "SELECT", [mask_bool, head, head])
    top = n.add("topk", "TOPK", [valid], outs=["topk:values", "topk:indices"], dtypes=["FLOAT", "INT32"])
    prob = n.add("sigmoid", "ACTIVATION", [top], op="SIGMOID")
    anchors = n.add("anchor_scale", "ELEMENTWISE", ["sizes", "sizes"], op="PROD")
    gathered = n.add("gather", "GATHER", [head, "topk:indices"])
    e = n.add("exp", "UNARY", [gathered], op="EXP")
    w = n.add("decode_mul", "ELEMENTWISE", [e, anchors], op="PROD")
    ctr = n.add("decode_sub", "ELEMENTWISE", [w, anchors], op="SUB")
    n.add("stack", "CONCATENATION", [ctr, prob])
    return n


def test_fp32_selection_on_detector_patterns():
    n = _detector_like_network()
    keep = tb.fp32_layer_names(n)
    assert keep == ["residual_add", "valid", "topk", "sigmoid", "anchor_scale", "exp", "decode_mul", "decode_sub",
                    "stack"]
    # never constrained: the dense body in fp16, masks, biases fused into convs, ints and bools
    for name in ("conv1", "conv2", "head_conv", "mask_mul", "bias_add", "relu", "mask_less", "shape_mul", "shape"):
        assert name not in keep, name


def test_fp32_selection_keeps_concat_and_add_inside_the_body():
    """Mask R-CNN port lesson: Concat and tensor+tensor Add stay fp32 even when convs follow."""
    n = _Network()
    n.tensors["x"] = _Tensor("x")
    a = n.add("conv_a", "CONVOLUTION", ["x"])
    b = n.add("conv_b", "CONVOLUTION", ["x"])
    s = n.add("fpn_add", "ELEMENTWISE", [a, b], op="SUM")
    c = n.add("concat", "CONCATENATION", [s, a])
    m = n.add("scale", "ELEMENTWISE", [c, c], op="PROD")
    n.add("conv_out", "CONVOLUTION", [m])
    assert tb.fp32_layer_names(n) == ["fpn_add", "concat"]


def test_constrain_fp32_sets_only_float_outputs():
    n = _detector_like_network()
    fake_trt = types.SimpleNamespace(float32="float32")
    count = tb.constrain_fp32(n, ["topk", "exp"], fake_trt)
    assert count == 2
    layers = {layer.name: layer for layer in n.layers}
    assert layers["topk"].precision == "float32" and layers["topk"].output_types == {0: "float32"}
    assert layers["exp"].output_types == {0: "float32"}
    assert layers["conv1"].precision is None


# ----------------------------------------------------------------------------------------------
# errors without TensorRT or a GPU
# ----------------------------------------------------------------------------------------------

def test_missing_tensorrt_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # `import tensorrt` raises ImportError
    monkeypatch.setitem(sys.modules, "tensorrt_bindings", None)
    onnx_file = tmp_path / "rpn.onnx"
    onnx_file.write_bytes(b"")
    expected = r"not importable \(import tensorrt: .*tensorrt-cu12-bindings==10\.5\.0"
    with pytest.raises(tb.TensorRTUnavailable, match=expected):
        tb.build_engine(onnx_file, tmp_path / "rpn.plan", {})
    assert not (tmp_path / "rpn.plan").exists()


def test_no_gpu_is_a_clear_error(monkeypatch, tmp_path):
    fake = types.ModuleType("tensorrt")
    fake.__version__ = "10.5.0"
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    monkeypatch.setattr(tb, "cuda_device_count", lambda: 0)
    with pytest.raises(tb.TensorRTUnavailable, match="TensorRT 10.5.0 is installed but no CUDA GPU is visible"):
        tb.require_tensorrt()


def test_old_tensorrt_is_refused(monkeypatch):
    fake = types.ModuleType("tensorrt")
    fake.__version__ = "8.6.1"
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    with pytest.raises(tb.TensorRTUnavailable, match=r"TensorRT 8\.6\.1 is too old: this code needs TensorRT >= 10"):
        tb.import_tensorrt()


def test_bad_arguments_fail_before_tensorrt(tmp_path):
    with pytest.raises(ValueError, match=r"precision must be one of \('fp32', 'tf32', 'fp16'\), got 'int8'"):
        tb.build_engine(tmp_path / "x.onnx", tmp_path / "x.plan", {}, precision="int8")
    with pytest.raises(FileNotFoundError, match="x.onnx does not exist"):
        tb.build_engine(tmp_path / "x.onnx", tmp_path / "x.plan", {})


def test_parser_errors_name_the_node():
    class Err:
        def __init__(self, node, name, op, desc):
            self._v = (node, name, op, desc)

        def node(self):
            return self._v[0]

        def node_name(self):
            return self._v[1]

        def node_operator(self):
            return self._v[2]

        def desc(self):
            return self._v[3]

    parser = types.SimpleNamespace(num_errors=2, get_error=[Err(12, "/Where_3", "Where", "bad type"),
                                                            Err(-1, "", "", "bad file")].__getitem__)
    assert tb.parser_errors(parser) == ["node 12 '/Where_3' (Where): bad type", "model: bad file"]


def test_cli_reports_missing_onnx(tmp_path, capsys):
    assert tb.main(["--onnx", str(tmp_path), "--out", str(tmp_path / "plans")]) == 2
    assert "rpn.onnx does not exist: export the ONNX first" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# progress, cache key
# ----------------------------------------------------------------------------------------------

def test_build_progress_prints_phases_with_durations():
    lines, now = [], [0.0]
    p = tb.BuildProgress(lines.append, max_depth=2, step_interval_s=5.0, clock=lambda: now[0])
    p.phase_start("Building engine", None, 3)
    p.phase_start("Tactic selection", "Building engine", 100)
    p.phase_start("Layer 7", "Tactic selection", 10)  # depth 2: not printed
    now[0] = 1.0
    assert p.step_complete("Tactic selection", 0) is True  # too soon to print
    now[0] = 6.0
    assert p.step_complete("Tactic selection", 49) is True
    p.phase_finish("Layer 7")
    p.phase_finish("Tactic selection")
    now[0] = 7.5
    p.phase_finish("Building engine")
    assert lines == [
        "[trt] Building engine (3 steps)",
        "  [trt] Tactic selection (100 steps)",
        "  [trt] Tactic selection: 50/100, 6 s",
        "  [trt] Tactic selection done in 6.0 s",
        "[trt] Building engine done in 7.5 s",
    ]


def test_engine_cache_key():
    s, o = _settings(), RepositoryOptions(target="tensorrt")
    key = tb.engine_cache_key(s, o, "fp16", "NVIDIA H100 80GB HBM3", "10.5.0", "abc")
    assert key.startswith("NVIDIA-H100-80GB-HBM3__trt10.5.0__fp16__")
    assert key == tb.engine_cache_key(s, o, "fp16", "NVIDIA H100 80GB HBM3", "10.5.0", "abc")
    others = {
        tb.engine_cache_key(s, o, "fp16", "NVIDIA L4", "10.5.0", "abc"),
        tb.engine_cache_key(s, o, "fp32", "NVIDIA H100 80GB HBM3", "10.5.0", "abc"),
        tb.engine_cache_key(_settings(box_score_thresh=0.5), o, "fp16", "NVIDIA H100 80GB HBM3", "10.5.0", "abc"),
        tb.engine_cache_key(s, RepositoryOptions(target="tensorrt", max_batch_size=4), "fp16",
                            "NVIDIA H100 80GB HBM3", "10.5.0", "abc"),
        tb.engine_cache_key(s, o, "fp16", "NVIDIA H100 80GB HBM3", "10.5.0", "other weights"),
    }
    assert key not in others and len(others) == 5


# ----------------------------------------------------------------------------------------------
# real engines (TensorRT + GPU)
# ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def trt_ready():
    try:
        tb.import_tensorrt()
    except tb.TensorRTUnavailable:
        pytest.skip(TRT_SKIP_REASON)
    if tb.cuda_device_count() < 1:
        pytest.skip("no CUDA GPU is visible")


# fp32 (TF32 off) should match ONNX Runtime's CPU numbers to float32 rounding of a deep
# network; fp16 keeps decode and softmax in fp32, so boxes stay within a pixel or two.
TOLERANCES = {"fp32": {names.CLASS_SCORES: 1e-4, names.CLASS_BOXES: 1e-2, "features": 1e-3},
              "fp16": {names.CLASS_SCORES: 2e-2, names.CLASS_BOXES: 2.0, "features": 0.5}}


@pytest.mark.tensorrt
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_engines_match_onnxruntime(precision, tiny, trt_ready, tmp_path):
    settings, paths = tiny
    options = RepositoryOptions(target="tensorrt", max_batch_size=2)
    plans = tb.build_plans(paths, tmp_path, settings, options, precision, workspace_bytes=1 << 30,
                           timing_cache_path=tmp_path / "timing.cache")
    assert (tmp_path / "timing.cache").stat().st_size > 0
    inputs = tb.random_inputs(settings, batch=2, rois=64)
    tol = TOLERANCES[precision]
    header = tb.compare_with_onnxruntime(plans[names.HEADER], paths[names.HEADER], inputs[names.HEADER])
    assert header[names.CLASS_SCORES].max_abs < tol[names.CLASS_SCORES], header
    assert header[names.CLASS_BOXES].max_abs < tol[names.CLASS_BOXES], header
    rpn = tb.compare_with_onnxruntime(plans[names.RPN], paths[names.RPN], inputs[names.RPN])
    for feature in names.FEATURES:
        assert rpn[feature].max_abs < tol["features"], rpn
    # proposals go through TopK: near-ties may swap rows, so only their shape is compared here
    assert rpn[names.PROPOSALS].shape == (2, settings.num_proposals, 6)


@pytest.mark.tensorrt
def test_engine_accepts_the_profile_extremes(tiny, trt_ready, tmp_path):
    settings, paths = tiny
    options = RepositoryOptions(target="tensorrt", max_batch_size=2)
    profile = tb.optimization_profiles(settings, options)[names.HEADER]
    plan = tb.build_engine(paths[names.HEADER], tmp_path / "header.plan", profile, "fp32", 1 << 30)
    for r in (1, max_rois(settings, options.max_batch_size)):
        rng = np.random.default_rng(r)
        out = tb.run_engine(plan, {names.ROI_FEATURES: rng.standard_normal((r, 7, 7, 256), dtype=np.float32),
                                   names.ROIS: np.tile(np.array([[0, 0, 32, 32]], np.float32), (r, 1))})
        assert out[names.CLASS_SCORES].shape == (r, settings.num_classes)
        np.testing.assert_allclose(out[names.CLASS_SCORES].sum(axis=1), 1.0, atol=1e-4)

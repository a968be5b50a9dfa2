"""TensorRT engines (exporters/tensorrt/): profiles, configs of every target, the network adapter
of the fp32 policy, errors, the engine cache, GPUs, comparisons.

Everything except the ``tensorrt``-marked tests runs without TensorRT (CI).  Those build real
engines from a tiny exported model and compare them with ONNX Runtime; they skip where
``import tensorrt`` fails or no CUDA GPU is visible.  The fp32 policy itself is tested in
``tests/test_trt_precision.py``.
"""
from __future__ import annotations

import contextlib
import errno
import os
import sys
import types
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from exporters.repository import RepositoryOptions, read_config, write_repository
from exporters.specs import max_rois
from exporters.tensorrt import build, cache, compare, gpus
from exporters.tensorrt.gpus import GpuInfo
from exporters.tensorrt.profiles import (canvas_groups, check_profile, check_profiles, optimization_profiles, profile_for,
                                        shapes_string)
from exporters.tensorrt.progress import BuildProgress
from exporters.tensorrt.run import run_engine
from python_backend import names
from python_backend.settings import DetectorSettings

TRT_SKIP_REASON = "TensorRT is not installed (it can't be installed on these machines; see README)"
ONNX_TO_TRITON = {onnx.TensorProto.FLOAT: "TYPE_FP32", onnx.TensorProto.INT32: "TYPE_INT32"}
H100 = GpuInfo(0, "NVIDIA H100 80GB HBM3", "9.0")


# ----------------------------------------------------------------------------------------------
# fixtures
# ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny random fasterrcnn exported to ONNX once: (settings, {"rpn": path, "header": path}), with
    the default canvases of its resize (256x256, 256x320, 320x256)."""
    from exporters.loading import random_model, settings_from_model
    from exporters.onnx_export import export_header, export_rpn

    model = random_model(num_classes=5, seed=0, peaky=50, min_size=256, max_size=320)
    settings = settings_from_model(model, "auto")
    out = tmp_path_factory.mktemp("onnx")
    paths = {}
    for name, fn in ((names.RPN, export_rpn), (names.HEADER, export_header)):
        paths[name] = out / f"{name}.onnx"
        onnx.save(fn(model, settings), str(paths[name]))
    return settings, paths


def _settings(**kw) -> DetectorSettings:
    return DetectorSettings(num_classes=5, min_size=256, max_size=320, **kw)  # canvases 256x256, 256x320, 320x256


# ----------------------------------------------------------------------------------------------
# profiles
# ----------------------------------------------------------------------------------------------

def test_profiles_cover_batch_and_rois():
    """rpn: one profile per group of canvases (landscape, portrait: tests/test_trt_profiles_memory.py),
    spanning its canvases, opt at the largest, the batch 1..max (opt at max); header: one."""
    settings = _settings(rpn_post_nms_top_n=300)
    p = optimization_profiles(settings, 4)
    assert set(p) == {names.RPN, names.HEADER}
    assert [profile[names.IMAGES] for profile in p[names.RPN]] == [
        ((1, 3, 256, 256), (4, 3, 256, 320), (4, 3, 256, 320)), ((1, 3, 320, 256), (4, 3, 320, 256), (4, 3, 320, 256))]
    assert all(profile[names.IMAGE_SIZES] == ((1, 2), (4, 2), (4, 2)) for profile in p[names.RPN])
    r = max_rois(settings, 4)
    assert r == 1200
    (header,) = p[names.HEADER]
    assert header[names.ROI_FEATURES] == ((1, 7, 7, 256), (r, 7, 7, 256), (r, 7, 7, 256))
    assert header[names.ROIS] == ((1, 4), (r, 4), (r, 4))


def test_every_dynamic_axis_is_covered_by_a_profile(tiny):
    """Each dynamic axis of the ONNX inputs, over the profiles, spans what the server sends:
    batches 1..max_batch_size, the canvases' heights and widths (and those between the canvases of
    one profile); and each batch the server can
    send (a batch on one canvas) has exactly one profile, that of the canvas's group (landscape 0,
    portrait 1)."""
    settings, paths = tiny
    profiles = optimization_profiles(settings, 3)
    rpn = onnx.load(str(paths[names.RPN]))
    spans: dict[str, set[int]] = {}
    for value in rpn.graph.input:
        for axis, d in enumerate(value.type.tensor_type.shape.dim):
            if not d.HasField("dim_value"):
                spans.setdefault(d.dim_param, set()).update(
                    v for p in profiles[names.RPN] for v in range(p[value.name][0][axis], p[value.name][2][axis] + 1))
    # the landscape profile's widths run 256..320 (256x256 and 256x320 share it); heights are fixed
    assert spans == {"batch": {1, 2, 3}, "height": {256, 320}, "width": set(range(256, 321))}
    for h, w in settings.canvases:
        index = int(h > w)
        for b in (1, 2, 3):
            shapes = {names.IMAGES: (b, 3, h, w), names.IMAGE_SIZES: (b, 2)}
            fitting = [i for i, p in enumerate(profiles[names.RPN]) if profile_for([p], shapes) == 0]
            assert fitting == [index] and profile_for(profiles[names.RPN], shapes) == index
    assert profile_for(profiles[names.RPN], {names.IMAGES: (1, 3, 320, 320), names.IMAGE_SIZES: (1, 2)}) is None
    assert profile_for(profiles[names.RPN], {names.IMAGES: (4, 3, 256, 256), names.IMAGE_SIZES: (4, 2)}) is None
    header = onnx.load(str(paths[names.HEADER]))
    dynamic = [(v.name, a) for v in header.graph.input for a, d in enumerate(v.type.tensor_type.shape.dim)
               if not d.HasField("dim_value")]
    assert dynamic == [(names.ROI_FEATURES, 0), (names.ROIS, 0)]
    (p,) = profiles[names.HEADER]
    assert all(p[n][0][0] == 1 and p[n][2][0] == max_rois(settings, 3) for n, _ in dynamic)


def test_profile_header_opt_override():
    settings = _settings()
    p = optimization_profiles(settings, 8, header_opt_rois=1000)
    assert p[names.HEADER][0][names.ROIS] == ((1, 4), (1000, 4), (8000, 4))
    with pytest.raises(ValueError, match=r"header_opt_rois must be in 1\.\.8000, got 9000"):
        optimization_profiles(settings, 8, header_opt_rois=9000)
    with pytest.raises(ValueError, match="max_batch_size must be >= 1, got 0"):
        optimization_profiles(settings, 0)


def test_profiles_match_onnx_inputs(tiny):
    settings, paths = tiny
    profiles = optimization_profiles(settings, 2)
    for name, path in paths.items():
        check_profiles(profiles[name], onnx.load(str(path)))


def test_check_profile_rejects_mismatches(tiny):
    settings, paths = tiny
    rpn = onnx.load(str(paths[names.RPN]))
    good = optimization_profiles(settings, 8)[names.RPN][0]
    four_channels = dict(good, **{names.IMAGES: tuple((s[0], 4, *s[2:]) for s in good[names.IMAGES])})
    with pytest.raises(ValueError, match=r"'images' has 4 on axis 1, expected the ONNX's static 3"):
        check_profile(four_channels, rpn)
    header_profile = optimization_profiles(settings, 8)[names.HEADER][0]
    with pytest.raises(ValueError, match="do not match the ONNX inputs"):
        check_profile(header_profile, rpn)
    bad_order = dict(good, **{names.IMAGE_SIZES: ((2, 2), (1, 2), (8, 2))})
    with pytest.raises(ValueError, match="min <= opt <= max"):
        check_profile(bad_order, rpn)
    with pytest.raises(ValueError, match="expected at least one optimization profile, got none"):
        check_profiles([], rpn)
    with pytest.raises(ValueError, match="min <= opt <= max"):
        check_profiles([good, bad_order], rpn)


def test_the_engine_tool_reads_the_canvases_from_the_rpn_onnx(tiny):
    """``python -m exporters.tensorrt.compare`` builds from the ONNX alone: the rpn's canvases are in
    its metadata (its height and width are dynamic), so it builds the exporter's profiles."""
    settings, paths = tiny
    rpn, header = onnx.load(str(paths[names.RPN])), onnx.load(str(paths[names.HEADER]))
    read = compare.settings_from_onnx(rpn, header, settings.rpn_post_nms_top_n)
    assert read.canvases == settings.canvases and read.num_classes == settings.num_classes
    assert optimization_profiles(read, 8) == optimization_profiles(settings, 8)
    del rpn.metadata_props[:]
    with pytest.raises(ValueError, match="the rpn ONNX has no 'canvases' metadata"):
        compare.settings_from_onnx(rpn, header, settings.rpn_post_nms_top_n)


def test_shapes_string_is_ort_format():
    """ONNX Runtime's TensorRT EP reads an input named again as the next profile's."""
    profiles = [{"a": ((1, 3), (4, 3), (8, 3)), "b": ((1,), (2,), (3,))}, {"a": ((1, 5), (2, 5), (2, 5)),
                                                                           "b": ((1,), (1,), (1,))}]
    assert shapes_string(profiles[:1], 0) == "a:1x3,b:1"
    assert shapes_string(profiles[:1], 2) == "a:8x3,b:3"
    assert shapes_string(profiles, 1) == "a:4x3,b:2,a:2x5,b:1"


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


def _parse_shapes(text: str) -> list[tuple[str, tuple[int, ...]]]:
    out = []
    for item in text.split(","):
        name, dims = item.split(":")
        out.append((name, tuple(int(d) for d in dims.split("x"))))
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
    repo = write_repository(tmp_path / "repo", settings, paths, options, plans=plans, link=True)
    profiles = optimization_profiles(settings, options.max_batch_size)

    for name in (names.RPN, names.HEADER):
        cfg = read_config(repo / name / "config.pbtxt")
        assert cfg.name == name
        onnx_in, onnx_out = _onnx_io(paths[name])
        for tensors, expected in ((cfg.input, onnx_in), (cfg.output, onnx_out)):
            got = {t.name: (mc.DataType.Name(t.data_type), [-1] + list(t.dims)) for t in tensors}
            assert got == expected, f"{case}/{name}: config {got}, ONNX {expected}"
        # the batch axis: Triton's max_batch_size is each profile's max, and the non-batch dims
        # of every profile shape are the config's dims, a dynamic one (-1) within its canvases
        groups = canvas_groups(settings.canvases) if name == names.RPN else [[None]]
        assert len(profiles[name]) == len(groups)
        for profile, group in zip(profiles[name], groups):
            for t in cfg.input:
                lo, opt, hi = profile[t.name]
                assert hi[0] == cfg.max_batch_size, f"{name}/{t.name}: profile max {hi[0]}, config {cfg.max_batch_size}"
                assert lo[0] == 1
                for shape, pick in ((lo, min), (hi, max)):
                    canvas = None if group == [None] else (pick(h for h, _ in group), pick(w for _, w in group))
                    free = iter(canvas or ())
                    assert shape[1:] == tuple(next(free) if d == -1 else d for d in t.dims)
        version = repo / name / "1"
        # Triton's TensorRT backend makes contexts for the listed profiles only (profile 0 if none)
        listed = [list(g.profile) for g in cfg.instance_group]
        assert listed == ([[str(i) for i in range(len(groups))]] if options.target == "tensorrt" else [[]])
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
                assert _parse_shapes(params[key]) == [(k, v[which]) for p in profiles[name] for k, v in p.items()]
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
# the fp32 policy's adapter over TensorRT networks, with look-alike layers
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
    """Like ``trt.ILayer`` as TensorRT returns it: the operation is only readable after a downcast
    (``trt.IElementWiseLayer``, see :func:`exporters.tensorrt.build.layer_info`)."""

    name: str
    type: _Enum
    ins: list
    outs: list
    hidden_op: _Enum | None = None
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


class _ElementWise(_Layer):
    @property
    def op(self):
        return self.hidden_op


class _Activation(_Layer):
    @property
    def type(self):  # an activation's ``type`` is its ActivationType once downcast
        return self.hidden_op

    @type.setter
    def type(self, value):
        pass


FAKE_TRT = types.SimpleNamespace(IElementWiseLayer=_ElementWise, IUnaryLayer=_ElementWise,
                                 IActivationLayer=_Activation, float32="float32")


class _Network:
    def __init__(self):
        self.layers: list[_Layer] = []
        self.tensors: dict[str, _Tensor] = {}

    def add(self, name, kind, ins=(), op=None, dtype="FLOAT"):
        out = _Tensor(name + ":0", _Enum(dtype))
        self.tensors[out.name] = out
        self.layers.append(_Layer(name, _Enum(kind), [self.tensors[i] for i in ins], [out],
                                  _Enum(op) if op else None))
        return out.name

    @property
    def num_layers(self):
        return len(self.layers)

    def get_layer(self, i):
        return self.layers[i]


def _gemm_softmax_network() -> _Network:
    """x -> Gemm (CONSTANT weight, MATRIX_MULTIPLY, CONSTANT bias -> broadcast SHUFFLE -> SUM) -> softmax,
    and a sigmoid on the logits: the parser's layer shapes."""
    n = _Network()
    n.tensors["x"] = _Tensor("x")
    w = n.add("fc.weight", "CONSTANT")
    mm = n.add("fc.matmul", "MATRIX_MULTIPLY", ["x", w])
    b = n.add("ONNXTRT_Broadcast_1", "SHUFFLE", [n.add("fc.bias", "CONSTANT")])
    logits = n.add("fc", "ELEMENTWISE", [mm, b], op="SUM")
    n.add("softmax", "SOFTMAX", [logits])
    n.add("sigmoid", "ACTIVATION", [logits], op="SIGMOID")
    n.add("shape", "SHAPE", [logits], dtype="INT32")
    return n


def test_layer_info_reads_operations_after_downcasting():
    n = _gemm_softmax_network()
    layers = {layer.name: layer for layer in n.layers}
    info = build.layer_info(layers["fc"], FAKE_TRT)
    assert (info.kind, info.op, info.inputs, info.outputs) == ("ELEMENTWISE", "SUM", ("fc.matmul:0",
                                                                                        "ONNXTRT_Broadcast_1:0"),
                                                              ("fc:0",))
    assert type(layers["fc"]) is _Layer  # the wrapper's class is restored
    assert build.layer_info(layers["sigmoid"], FAKE_TRT).op == "SIGMOID"
    assert build.layer_info(layers["shape"], FAKE_TRT).float_outputs == ()


def test_fp32_layer_names_over_a_network():
    """The bias add through the broadcast SHUFFLE stays fp16; softmax and sigmoid are pinned."""
    assert build.fp32_layer_names(_gemm_softmax_network(), FAKE_TRT) == ["softmax", "sigmoid"]


def test_constrain_fp32_sets_only_float_outputs():
    """A SHAPE or CONSTANT layer, or one with an int32 output (TopK), takes no precision (TensorRT
    fails an OBEY_PRECISION_CONSTRAINTS build it can't obey); TopK's values output alone is typed."""
    n = _gemm_softmax_network()
    n.layers.append(_Layer("topk", _Enum("TOPK"), [n.tensors["fc:0"]],
                           [_Tensor("topk:0"), _Tensor("topk:1", _Enum("INT32"))]))
    assert build.constrain_fp32(n, ["softmax", "shape", "fc.weight"], FAKE_TRT, {"topk": (0,)}) == 2
    layers = {layer.name: layer for layer in n.layers}
    assert layers["softmax"].precision == "float32" and layers["softmax"].output_types == {0: "float32"}
    assert layers["shape"].precision is None and layers["shape"].output_types == {}
    assert layers["fc.weight"].precision is None and layers["fc.weight"].output_types == {}
    assert layers["topk"].precision is None and layers["topk"].output_types == {0: "float32"}
    assert layers["fc"].precision is None and layers["fc"].output_types == {}
    with pytest.raises(ValueError, match="output 1 of topk .* is not a float activation"):
        build.constrain_fp32(n, [], FAKE_TRT, {"topk": (1,)})


# ----------------------------------------------------------------------------------------------
# errors without TensorRT or a GPU
# ----------------------------------------------------------------------------------------------

def test_missing_tensorrt_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # `import tensorrt` raises ImportError
    monkeypatch.setitem(sys.modules, "tensorrt_bindings", None)
    onnx_file = tmp_path / "rpn.onnx"
    onnx_file.write_bytes(b"")
    expected = r"not importable \(import tensorrt: .*tensorrt-cu13-bindings==10\.13\.3\.9"
    with pytest.raises(build.TensorRTUnavailable, match=expected):
        build.build_engine(onnx_file, tmp_path / "rpn.plan", [])
    assert not (tmp_path / "rpn.plan").exists()


def test_no_gpu_is_a_clear_error(monkeypatch):
    fake = types.ModuleType("tensorrt")
    fake.__version__ = "10.5.0"
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    monkeypatch.setattr(build, "cuda_device_count", lambda: 0)
    with pytest.raises(build.TensorRTUnavailable, match="TensorRT 10.5.0 is installed but no CUDA GPU is visible"):
        build.require_tensorrt()


def test_old_tensorrt_is_refused(monkeypatch):
    fake = types.ModuleType("tensorrt")
    fake.__version__ = "8.6.1"
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    with pytest.raises(build.TensorRTUnavailable, match=r"TensorRT 8\.6\.1 is too old: this code needs TensorRT >= 10"):
        build.import_tensorrt()


def test_bad_arguments_fail_before_tensorrt(tmp_path):
    with pytest.raises(ValueError, match=r"precision must be one of \('fp32', 'tf32', 'fp16'\), got 'int8'"):
        build.build_engine(tmp_path / "x.onnx", tmp_path / "x.plan", [], precision="int8")
    with pytest.raises(FileNotFoundError, match="x.onnx does not exist"):
        build.build_engine(tmp_path / "x.onnx", tmp_path / "x.plan", [])


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
    assert build.parser_errors(parser) == ["node 12 '/Where_3' (Where): bad type", "model: bad file"]


def test_cli_reports_missing_onnx(tmp_path, capsys):
    assert compare.main(["--onnx", str(tmp_path), "--out", str(tmp_path / "plans")]) == 2
    assert "rpn.onnx does not exist: export the ONNX first" in capsys.readouterr().err


def test_build_progress_prints_phases_with_durations():
    lines, now = [], [0.0]
    p = BuildProgress(lines.append, max_depth=2, step_interval_s=5.0, clock=lambda: now[0])
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


# ----------------------------------------------------------------------------------------------
# the loaded library's version and the engine cache
# ----------------------------------------------------------------------------------------------

class _FakeLibnvinfer:
    """A loaded libnvinfer as ctypes shows it: the version getters of NvInferRuntime.h."""

    def __init__(self, major, minor, patch, build_number):
        self.getInferLibMajorVersion = lambda: major
        self.getInferLibMinorVersion = lambda: minor
        self.getInferLibPatchVersion = lambda: patch
        self.getInferLibBuildVersion = lambda: build_number


MAPS = ("7f1c2a000000-7f1c2b000000 r-xp 00000000 08:01 1234  /usr/lib/x86_64-linux-gnu/libnvinfer_plugin.so.10.6.0\n"
        "7f1c3a000000-7f1c3b000000 r-xp 00000000 08:01 5678  /usr/lib/x86_64-linux-gnu/libnvinfer.so.10.6.0\n"
        "7ffd1a000000-7ffd1b000000 rw-p 00000000 00:00 0  [stack]\n")


def test_version_is_the_loaded_library_not_the_bindings(tmp_path):
    """After a base-image bump the bindings may still say 10.5.0 while libnvinfer 10.6 is loaded."""
    maps = tmp_path / "maps"
    maps.write_text(MAPS)
    opened = []

    def load(path):
        opened.append(path)
        return _FakeLibnvinfer(10, 6, 0, 26)

    bindings = types.SimpleNamespace(__version__="10.5.0")
    assert build.loaded_tensorrt_version(bindings, maps, load) == "10.6.0.26"
    assert opened == ["/usr/lib/x86_64-linux-gnu/libnvinfer.so.10.6.0"]
    # no maps file: the soname of the bindings' major version (dlopen returns the loaded library)
    assert build.loaded_tensorrt_version(bindings, tmp_path / "absent", load) == "10.6.0.26"
    assert opened[-1] == "libnvinfer.so.10"


def test_library_version_from_the_packed_number():
    lib = types.SimpleNamespace(getInferLibVersion=lambda: 100500)  # (10 * 100 + 5) * 100 + 0
    assert build.library_version(lib) == "10.5.0"


def test_engine_cache_key():
    s, o = _settings(), RepositoryOptions(target="tensorrt")
    key = cache.engine_cache_key(s, o, "fp16", [H100], "10.5.0.18", "abc")
    assert key.startswith("NVIDIA-H100-80GB-HBM3-cc9.0__trt10.5.0.18__fp16__")
    assert key == cache.engine_cache_key(s, o, "fp16", [H100], "10.5.0.18", "abc")
    others = {
        cache.engine_cache_key(s, o, "fp16", [GpuInfo(0, "NVIDIA L4", "8.9")], "10.5.0.18", "abc"),
        cache.engine_cache_key(s, o, "fp16", [H100, GpuInfo(1, "NVIDIA A100-SXM4-80GB", "8.0")], "10.5.0.18", "abc"),
        cache.engine_cache_key(s, o, "fp16", [H100], "10.6.0.26", "abc"),
        cache.engine_cache_key(s, o, "fp32", [H100], "10.5.0.18", "abc"),
        cache.engine_cache_key(_settings(box_score_thresh=0.5), o, "fp16", [H100], "10.5.0.18", "abc"),
        cache.engine_cache_key(s, RepositoryOptions(target="tensorrt", max_batch_size=4), "fp16", [H100],
                               "10.5.0.18", "abc"),
        cache.engine_cache_key(s, o, "fp16", [H100], "10.5.0.18", "other weights"),
    }
    assert key not in others and len(others) == 7
    # two GPUs of one model key like one
    assert key == cache.engine_cache_key(s, o, "fp16", [H100, GpuInfo(1, H100.name, "9.0")], "10.5.0.18", "abc")
    with pytest.raises(ValueError, match="needs at least one GPU, got none"):
        cache.engine_cache_key(s, o, "fp16", [], "10.5.0.18", "abc")
    named = cache.engine_cache_key(s, o, "fp16", "NVIDIA H100 80GB HBM3", "10.5.0.18", "abc")  # GPU_NAME override
    assert named.startswith("NVIDIA-H100-80GB-HBM3__trt10.5.0.18__fp16__") and named != key


def test_a_plan_of_a_stale_library_is_not_reused(tmp_path):
    """Cached under the key of the library that built it; the loaded one's key finds nothing."""
    s, o = _settings(), RepositoryOptions(target="tensorrt")
    maps = tmp_path / "maps"
    maps.write_text(MAPS)
    built_with = cache.engine_cache_key(s, o, "fp16", [H100], "10.5.0.18", "abc")
    root = tmp_path / "repos"
    (root / built_with / "model_repository" / "rpn" / "1").mkdir(parents=True)
    (root / built_with / cache.COMPLETE_MARKER).write_text("{}")
    loaded = build.loaded_tensorrt_version(types.SimpleNamespace(__version__="10.5.0"), maps,
                                           lambda _: _FakeLibnvinfer(10, 6, 0, 26))
    key = cache.engine_cache_key(s, o, "fp16", [H100], loaded, "abc")
    assert key != built_with
    assert cache.why_rebuild(root / built_with, None) is None  # the old folder itself is complete
    assert cache.why_rebuild(root / key, None) == f"no finished preparation in {root / key}"


def _prepared(root: Path, plans: dict[str, bytes]) -> Path:
    for rel, blob in plans.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(blob)
    (root / cache.COMPLETE_MARKER).write_text("{}")
    return root


def _fake_tensorrt(monkeypatch):
    """build's TensorRT and device switch replaced: a plan deserializes unless it says b"stale"."""
    devices = []

    @contextlib.contextmanager
    def use_device(index):
        devices.append(index)
        yield

    class Runtime:
        def __init__(self, logger):
            pass

        def deserialize_cuda_engine(self, blob):
            if blob == b"crash":
                raise RuntimeError("corrupt plan")
            return None if blob == b"stale" else object()

    class Logger:
        ERROR = 0

        def __init__(self, severity):
            pass

    trt = types.SimpleNamespace(Runtime=Runtime, Logger=Logger, __version__="10.5.0")
    monkeypatch.setattr(build, "require_tensorrt", lambda: trt)
    monkeypatch.setattr(build, "use_device", use_device)
    return devices


def test_a_plan_that_does_not_deserialize_triggers_a_rebuild(monkeypatch, tmp_path):
    devices = _fake_tensorrt(monkeypatch)
    targets = gpus.plan_targets([GpuInfo(0, "NVIDIA A100-SXM4-80GB", "8.0"), GpuInfo(1, H100.name, "9.0")])
    good = {"model_repository/rpn/1/model_cc8.0.plan": b"ok", "model_repository/rpn/1/model_cc9.0.plan": b"ok",
            "plans/cc9.0/rpn.plan": b"stale"}  # outside the repository: not served, not checked
    root = _prepared(tmp_path / "good", good)
    assert cache.why_rebuild(root, build.plan_check(targets)) is None
    assert devices == [0, 1]  # each plan on a device of its compute capability
    for bad in (b"stale", b"crash"):
        root = _prepared(tmp_path / bad.decode(), dict(good, **{"model_repository/header/1/model_cc9.0.plan": bad}))
        reason = cache.why_rebuild(root, build.plan_check(targets))
        assert reason == (f"cached engine {root}/model_repository/header/1/model_cc9.0.plan does not deserialize "
                          "with this TensorRT and GPU")
    # a plan for a compute capability this host no longer has
    root = _prepared(tmp_path / "other", {"model_repository/rpn/1/model_cc8.6.plan": b"ok"})
    assert "model_cc8.6.plan does not deserialize" in cache.why_rebuild(root, build.plan_check(targets))
    assert cache.why_rebuild(tmp_path / "unfinished", None) == f"no finished preparation in {tmp_path / 'unfinished'}"


def test_plan_deserializes_reads_files_and_catches_failures(tmp_path):
    plan = tmp_path / "model.plan"
    plan.write_bytes(b"engine")
    assert cache.plan_deserializes(plan, lambda blob: blob if blob == b"engine" else None)
    assert not cache.plan_deserializes(b"other", lambda blob: blob if blob == b"engine" else None)
    assert not cache.plan_deserializes(tmp_path / "missing.plan", lambda blob: object())

    def explode(blob):
        raise RuntimeError("magic tag does not match")

    assert not cache.plan_deserializes(plan, explode)


def test_timing_cache_round_trip(tmp_path):
    path = tmp_path / "timing" / "h100.cache"
    assert cache.read_timing_cache(path) == b""
    cache.write_timing_cache(path, b"first")
    cache.write_timing_cache(path, memoryview(b"second"))
    assert cache.read_timing_cache(path) == b"second"
    assert os.listdir(path.parent) == ["h100.cache"]
    expected = tmp_path / "NVIDIA-H100-80GB-HBM3-cc9.0__trt10.5.0.18.cache"
    assert cache.timing_cache_file(tmp_path, H100, "10.5.0.18") == expected


@pytest.mark.parametrize("where", ["write", "fsync", "replace"])
def test_an_interrupted_timing_cache_write_leaves_the_old_file(where, monkeypatch, tmp_path):
    """Disk full halfway through the write, or the container stopped before the rename: the old
    cache survives whole and no temporary file is left behind."""
    path = tmp_path / "timing.cache"
    cache.write_timing_cache(path, b"old cache " * 100)

    class Stopped(BaseException):  # like the KeyboardInterrupt/SystemExit of a stopped process
        pass

    real_fdopen = os.fdopen

    class HalfWritten:
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def write(self, data):
            self.f.write(bytes(data[: len(data) // 2]))
            self.f.flush()
            raise OSError(errno.ENOSPC, "No space left on device")

    def stop(*args, **kwargs):
        raise Stopped()

    if where == "write":
        monkeypatch.setattr(cache.os, "fdopen", lambda fd, mode: HalfWritten(real_fdopen(fd, mode)))
    else:
        monkeypatch.setattr(cache.os, where, stop)
    with pytest.raises(OSError if where == "write" else Stopped):
        cache.write_timing_cache(path, b"new cache " * 200)
    monkeypatch.undo()
    assert path.read_bytes() == b"old cache " * 100
    assert os.listdir(tmp_path) == ["timing.cache"]


# ----------------------------------------------------------------------------------------------
# GPUs: one plan per GPU model (two models of one compute capability: tests/test_trt_gpu_models.py)
# ----------------------------------------------------------------------------------------------

A100, L4 = GpuInfo(0, "NVIDIA A100-SXM4-80GB", "8.0"), GpuInfo(2, "NVIDIA L4", "8.9")


def test_one_gpu_model_keeps_the_default_plan_name():
    targets = gpus.plan_targets([GpuInfo(1, H100.name, "9.0"), H100])
    assert targets == [gpus.PlanTarget("9.0", 0, (H100.name,), "model.plan")]
    cfg = mc.ModelConfig(name="rpn")
    gpus.set_cc_model_filenames(cfg, targets)
    assert dict(cfg.cc_model_filenames) == {}


def test_mixed_gpus_get_one_plan_per_compute_capability():
    targets = gpus.plan_targets([GpuInfo(1, H100.name, "9.0"), L4, A100])
    assert targets == [gpus.PlanTarget("8.0", 0, (A100.name,), "model_cc8.0.plan"),
                       gpus.PlanTarget("9.0", 1, (H100.name,), "model_cc9.0.plan"),
                       gpus.PlanTarget("8.9", 2, (L4.name,), "model_cc8.9.plan")]
    cfg = mc.ModelConfig(name="rpn", platform="tensorrt_plan")
    gpus.set_cc_model_filenames(cfg, targets)
    parsed = text_format.Parse(text_format.MessageToString(cfg), mc.ModelConfig())
    assert dict(parsed.cc_model_filenames) == {"8.0": "model_cc8.0.plan", "8.9": "model_cc8.9.plan",
                                               "9.0": "model_cc9.0.plan"}
    with pytest.raises(ValueError, match="no CUDA device to build TensorRT engines on"):
        gpus.plan_targets([])


def test_build_plans_per_gpu_builds_each_target_on_its_device(monkeypatch, tmp_path):
    calls = []

    def fake_build_plans(onnx_paths, out_dir, settings, max_batch_size, precision, workspace_bytes,
                         timing_cache_path, header_opt_rois, verbose, printer, device_index):
        calls.append((Path(out_dir).name, max_batch_size, precision, device_index))
        return {n: Path(out_dir) / f"{n}.plan" for n in (names.RPN, names.HEADER)}

    monkeypatch.setattr(build, "build_plans", fake_build_plans)
    targets = gpus.plan_targets([A100, GpuInfo(1, H100.name, "9.0"), GpuInfo(2, A100.name, "8.0")])
    plans = build.build_plans_per_gpu({}, tmp_path, _settings(), 4, targets, "fp16", printer=lambda _: None)
    assert calls == [("cc8.0", 4, "fp16", 0), ("cc9.0", 4, "fp16", 1)]
    assert plans == {n: {"model_cc8.0.plan": tmp_path / "cc8.0" / f"{n}.plan",
                         "model_cc9.0.plan": tmp_path / "cc9.0" / f"{n}.plan"} for n in (names.RPN, names.HEADER)}


class _FakeDriver:
    """libcuda as ctypes sees it: two devices; records the context calls."""

    NAMES = {0: b"NVIDIA A100-SXM4-80GB", 1: b"NVIDIA H100 80GB HBM3"}
    CC = {0: (8, 0), 1: (9, 0)}

    def __init__(self):
        self.calls = []

    @staticmethod
    def _set(ref, value):
        ref._obj.value = value  # ctypes.byref(x)._obj is x

    def cuDeviceGetCount(self, ref):
        self._set(ref, 2)
        return 0

    def cuDeviceGet(self, ref, index):
        self._set(ref, index)
        return 0 if index in self.NAMES else 101  # CUDA_ERROR_INVALID_DEVICE

    def cuDeviceGetName(self, buf, size, dev):
        buf.value = self.NAMES[dev.value]
        return 0

    def cuDeviceGetAttribute(self, ref, attribute, dev):
        self._set(ref, self.CC[dev.value][attribute - 75])  # 75: major, 76: minor
        return 0

    def cuDevicePrimaryCtxRetain(self, ref, dev):
        self.calls.append(("retain", dev.value))
        return 0

    def cuCtxPushCurrent(self, ctx):
        self.calls.append(("push",))
        return 0

    def cuCtxPopCurrent(self, ref):
        self.calls.append(("pop",))
        return 0

    def cuDevicePrimaryCtxRelease(self, dev):
        self.calls.append(("release", dev.value))
        return 0


def test_cuda_devices_and_use_device_through_the_driver(monkeypatch):
    driver = _FakeDriver()
    monkeypatch.setattr(gpus, "_driver", lambda: driver)
    assert gpus.cuda_devices() == [A100, GpuInfo(1, H100.name, "9.0")]
    assert gpus.cuda_device_count() == 2
    with pytest.raises(KeyError):
        with gpus.use_device(1):
            assert driver.calls == [("retain", 1), ("push",)]
            raise KeyError("the build failed")
    assert driver.calls == [("retain", 1), ("push",), ("pop",), ("release", 1)]  # restored all the same
    with pytest.raises(gpus.CudaError, match=r"cuDeviceGet\(5\) failed with CUresult 101"):
        with gpus.use_device(5):
            pass
    with gpus.use_device(None):  # the current device, no driver call
        pass
    assert len(driver.calls) == 4


# ----------------------------------------------------------------------------------------------
# comparing outputs; proposals as sets of rows (TopK ties)
# ----------------------------------------------------------------------------------------------

def _proposals(rows_per_level: list[list[tuple[float, ...]]]) -> np.ndarray:
    rows = [(*r, level) for level, rows in enumerate(rows_per_level) for r in rows]
    return np.asarray([rows], dtype=np.float32)  # [1, K, 6]


BOX_TOL = [0.01] * 4 + [1e-4, 0.0]


def test_reordered_ties_are_the_same_proposals():
    ref = _proposals([[(0, 0, 10, 10, 0.9), (5, 5, 20, 20, 0.5), (1, 1, 8, 8, 0.5)], [(0, 0, 64, 64, 0.7)]])
    eng = ref.copy()
    eng[0, [1, 2]] = eng[0, [2, 1]]  # equal scores in the other order
    eng[0, :, :4] += 0.005  # within the box tolerance
    assert compare.proposal_mismatches(eng, ref, BOX_TOL) == []


def test_a_tie_at_the_cutoff_may_keep_another_row():
    ref = _proposals([[(0, 0, 10, 10, 0.9), (5, 5, 20, 20, 0.30001)]])
    eng = _proposals([[(0, 0, 10, 10, 0.9), (7, 7, 30, 30, 0.3)]])  # the other of two tied rows kept
    assert compare.proposal_mismatches(eng, ref, BOX_TOL, score_atol=1e-4) == []
    assert len(compare.proposal_mismatches(eng, ref, BOX_TOL, score_atol=0.0)) == 2  # both rows unexplained


def test_a_moved_box_or_a_lost_top_row_is_a_mismatch():
    ref = _proposals([[(0, 0, 10, 10, 0.9), (5, 5, 20, 20, 0.5)], [(0, 0, 64, 64, 0.7)]])
    moved = ref.copy()
    moved[0, 0, 2] += 1.0  # level 0's top box, one pixel off
    problems = compare.proposal_mismatches(moved, ref, BOX_TOL, score_atol=1e-4)
    assert len(problems) == 2 and all(p.startswith("image 0 level 0:") for p in problems)
    below = _proposals([[(0, 0, 10, 10, 0.9), (5, 5, 20, 20, 0.2)], [(0, 0, 64, 64, 0.7)]])
    problems = compare.proposal_mismatches(below, ref, BOX_TOL, score_atol=1e-4)  # kept a row far below the cutoff
    assert [p.split(":")[0] for p in problems] == ["image 0 level 0"] * 2
    lost = _proposals([[(3, 3, 9, 9, 0.5), (5, 5, 20, 20, 0.5)], [(0, 0, 64, 64, 0.7)]])
    problems = compare.proposal_mismatches(lost, ref, BOX_TOL, score_atol=1e-4)
    assert problems == ["image 0 level 0: reference row [0.0, 0.0, 10.0, 10.0, 0.8999999761581421, 0.0] has no "
                        "partner and is not a tie at the cutoff score 0.5"]
    with pytest.raises(ValueError, match=r"expected two proposals arrays \[B, K, 6\] of one shape"):
        compare.proposal_mismatches(ref[:, :2], ref, BOX_TOL)


def test_box_tolerance_grows_with_the_levels_anchor():
    """A box off by 0.03 px is within tolerance on the 512-pixel anchors of level 1 here and a
    mismatch on the 32-pixel anchors of level 0."""
    tol = compare.anchor_scaled_atol([32, 512], box_atol=0.01, anchor_rtol=1e-4, score_atol=1e-4)
    assert tol[0] == pytest.approx([0.0132] * 4 + [1e-4, 0.0]) and tol[1][0] == pytest.approx(0.0612)
    ref = _proposals([[(0, 0, 10, 10, 0.9), (5, 5, 20, 20, 0.5)], [(0, 0, 400, 300, 0.7), (9, 9, 99, 99, 0.6)]])
    moved = ref.copy()
    moved[0, [0, 2], 3] += 0.03  # each level's top row (a row at the cutoff could be a tie kept instead)
    problems = compare.proposal_mismatches(moved, ref, tol, score_atol=1e-4)
    assert len(problems) == 2 and all(p.startswith("image 0 level 0:") for p in problems)


def test_output_diff():
    d = compare.output_diff("x", np.array([1.0, 2.5, 0.0]), np.array([1.0, 2.0, 1e-4]))
    assert (d.name, d.max_abs, d.shape) == ("x", 0.5, (3,))
    assert d.max_rel == pytest.approx(0.5 / (2.0 + 1e-6))
    with pytest.raises(ValueError, match=r"output 'x': engine shape \(2,\), ONNX Runtime shape \(3,\)"):
        compare.output_diff("x", np.zeros(2), np.zeros(3))


# ----------------------------------------------------------------------------------------------
# real engines (TensorRT + GPU)
# ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def trt_ready():
    try:
        build.import_tensorrt()
    except build.TensorRTUnavailable:
        pytest.skip(TRT_SKIP_REASON)
    if gpus.cuda_device_count() < 1:
        pytest.skip("no CUDA GPU is visible")


# fp32 (TF32 off) should match ONNX Runtime's CPU numbers to float32 rounding of a deep
# network; fp16 keeps decode and softmax in fp32, so boxes stay within a pixel or two.
TOLERANCES = {"fp32": {names.CLASS_SCORES: 1e-4, names.CLASS_BOXES: 1e-2, "features": 1e-3,
                       "box": 1e-2, "box_rel": 0.0, "score": 1e-4},
              "fp16": {names.CLASS_SCORES: 2e-2, names.CLASS_BOXES: 2.0, "features": 0.5,
                       "box": 2.0, "box_rel": 1e-2, "score": 2e-2}}


@pytest.mark.tensorrt
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_engines_match_onnxruntime(precision, tiny, trt_ready, tmp_path):
    settings, paths = tiny
    plans = build.build_plans(paths, tmp_path, settings, 2, precision, workspace_bytes=1 << 30,
                              timing_cache_path=tmp_path / "timing.cache")
    assert (tmp_path / "timing.cache").stat().st_size > 0
    inputs = compare.random_inputs(settings, batch=2, rois=64)
    tol = TOLERANCES[precision]
    header = compare.compare_with_onnxruntime(plans[names.HEADER], paths[names.HEADER], inputs[names.HEADER])
    assert header[names.CLASS_SCORES].max_abs < tol[names.CLASS_SCORES], header
    assert header[names.CLASS_BOXES].max_abs < tol[names.CLASS_BOXES], header
    for canvas in settings.canvases:  # each canvas runs on its own optimization profile
        rpn_inputs = compare.random_inputs(settings, batch=2, canvas=canvas)[names.RPN]
        engine = run_engine(plans[names.RPN], rpn_inputs)
        reference = compare.onnxruntime_outputs(paths[names.RPN], rpn_inputs)
        for feature in names.FEATURES:
            assert engine[feature].shape == reference[feature].shape
            assert compare.output_diff(feature, engine[feature], reference[feature]).max_abs < tol["features"], canvas
        # proposals go through TopK: near-ties may swap rows, so they are compared as sets of rows
        proposals = reference[names.PROPOSALS]
        assert proposals.shape == (2, settings.num_proposals, 6)
        assert (proposals[:, :, compare.LEVEL] >= 0).sum() > settings.num_proposals  # valid rows to compare
        atol = [tol["box"]] * 4 + [tol["score"], 0.0]
        problems = compare.proposal_mismatches(engine[names.PROPOSALS], proposals, atol, tol["box_rel"], tol["score"])
        assert problems == [], f"{canvas}: " + "\n".join(problems[:10])


@pytest.mark.tensorrt
def test_engine_accepts_the_profile_extremes(tiny, trt_ready, tmp_path):
    settings, paths = tiny
    profile = optimization_profiles(settings, 2)[names.HEADER]
    plan = build.build_engine(paths[names.HEADER], tmp_path / "header.plan", profile, "fp32", 1 << 30)
    for r in (1, max_rois(settings, 2)):
        rng = np.random.default_rng(r)
        out = run_engine(plan, {names.ROI_FEATURES: rng.standard_normal((r, 7, 7, 256), dtype=np.float32),
                                names.ROIS: np.tile(np.array([[0, 0, 32, 32]], np.float32), (r, 1))})
        assert out[names.CLASS_SCORES].shape == (r, settings.num_classes)
        np.testing.assert_allclose(out[names.CLASS_SCORES].sum(axis=1), 1.0, atol=1e-4)


@pytest.mark.tensorrt
def test_cached_engines_deserialize_on_every_gpu(tiny, trt_ready, tmp_path):
    settings, paths = tiny
    targets = gpus.plan_targets(gpus.cuda_devices())
    plans = build.build_plans_per_gpu(paths, tmp_path / "plans", settings, 1, targets, "fp32", 1 << 30)
    root = tmp_path / "prepared"
    for model, files in plans.items():
        for filename, path in files.items():
            (root / "model_repository" / model / "1").mkdir(parents=True, exist_ok=True)
            (root / "model_repository" / model / "1" / filename).write_bytes(path.read_bytes())
    (root / cache.COMPLETE_MARKER).write_text("{}")
    assert cache.why_rebuild(root, build.plan_check(targets)) is None
    stale = root / "model_repository" / names.HEADER / "1" / targets[0].filename
    stale.write_bytes(stale.read_bytes()[: stale.stat().st_size // 2])  # a truncated plan
    assert cache.why_rebuild(root, build.plan_check(targets)) == (
        f"cached engine {stale} does not deserialize with this TensorRT and GPU")

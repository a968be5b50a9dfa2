"""The python-backend adapter (python_backend/triton_models/adapter.py) and the step models over it,
without a tritonserver: a stand-in pb_utils module (tests/triton_fake.py) carries the requests.

Checked here: a bad request gets its own error naming what was wrong while its batch-mates get
their values (equal to each step's NumPy reference run on that request alone); good requests run
as one call; a failing batch falls back to one call per request; a KIND_GPU instance runs on its
own device id; numpy 1 and numpy 2 tensor paths.
"""
from __future__ import annotations

import os
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from tritonclient.grpc import model_config_pb2 as mc

import triton_fake as fake
from exporters.repository import RepositoryOptions, python_step_config
from evaluation.payloads import encode, textured_image
from python_backend import backends, names, triton_io
from python_backend.settings import FPN_STRIDES, DetectorSettings, level_grid
from python_backend.triton_models import adapter as adapter_module
from python_backend.triton_models.adapter import StepAdapter, rows, split

MODELS = Path(adapter_module.__file__).parent
NUMPY = backends.get_backend("cpu")  # the reference steps
# small enough that the NumPy steps take milliseconds
SETTINGS = DetectorSettings(num_classes=3, canvases=((64, 64),), min_size=48, max_size=64,
                            rpn_pre_nms_top_n=20, rpn_post_nms_top_n=10, fpn_channels=8, box_detections_per_img=5)


def _double_config(device: str = "cpu") -> mc.ModelConfig:
    cfg = mc.ModelConfig(name="double", backend="python", max_batch_size=4)
    cfg.input.add(name="x", data_type=mc.TYPE_FP32, dims=[2])
    cfg.output.add(name="y", data_type=mc.TYPE_FP32, dims=[2])
    for k, v in {**SETTINGS.to_parameters(), "device": device}.items():
        cfg.parameters[k].string_value = v
    return cfg


class Doubler:
    """A step: y = 2x, raising for a negative x; records the number of requests of each call."""

    def __init__(self, adapter: StepAdapter):
        self.adapter, self.calls = adapter, []

    def __call__(self, items):
        self.calls.append(len(items))
        x = self.adapter.join(items, "x")
        if (x < 0).any():
            raise ValueError(f"negative input {x[x < 0][0]:g}")
        return split((2 * x,), rows(items, "x"))


def _doubler():
    adapter = StepAdapter(fake.model_args(_double_config()), fake.pb_utils_module())
    return adapter, Doubler(adapter)


def _x(*rows_):
    return fake.Request(x=np.array(rows_, dtype=np.float32))


def test_good_requests_run_as_one_call():
    adapter, step = _doubler()
    requests = [_x([1, 2]), _x([3, 4], [5, 6]), _x([7, 8])]
    responses = adapter.execute(requests, step)
    assert step.calls == [3]
    for request, response in zip(requests, responses):
        assert not response.has_error()
        np.testing.assert_array_equal(response.output("y"), 2 * request.tensors["x"].as_numpy())


def test_a_bad_request_fails_alone_and_its_batch_mates_get_their_values():
    adapter, step = _doubler()
    requests = [
        _x([1, 2]),
        _x([-1, 0]),  # the step raises for it: the batch falls back to one call per request
        _x([3, 4], [5, 6]),
        fake.Request(x=np.zeros((1, 2), np.int32)),  # caught before the step: wrong dtype
        _x([1, 2, 3]),  # wrong shape
        fake.Request(),  # no input
    ]
    responses = adapter.execute(requests, step)
    assert step.calls == [3, 1, 1, 1]  # the three readable requests together, then each alone
    for i in (0, 2):
        assert not responses[i].has_error()
        np.testing.assert_array_equal(responses[i].output("y"), 2 * requests[i].tensors["x"].as_numpy())
    errors = {i: r.error().message() for i, r in enumerate(responses) if r.has_error()}
    assert set(errors) == {1, 3, 4, 5}
    assert errors[1] == "double: ValueError: negative input -1"
    assert errors[3] == "input 'x': expected dtype float32, got int32"
    assert errors[4] == "input 'x': expected shape [-1, 2] (-1: any), got [1, 3]"
    assert errors[5] == "missing input 'x'"


def test_a_step_returning_the_wrong_number_of_results_is_an_error_for_each_request():
    adapter, _ = _doubler()
    responses = adapter.execute([_x([1, 2]), _x([3, 4])], lambda items: [])
    assert all("the step returned 0 results for 1 requests" in r.error().message() for r in responses)


@pytest.mark.parametrize("numpy2", [False, True], ids=["numpy1-path", "numpy2-path"])
def test_tensors_go_through_the_path_of_the_numpy_version(monkeypatch, numpy2):
    """numpy 2 breaks this Triton's numpy path (python_backend/triton_io.py): there inputs are read
    and outputs made through DLPack; under numpy 1 through as_numpy / Tensor(name, array)."""
    monkeypatch.setattr(triton_io, "NUMPY2", numpy2)
    adapter, step = _doubler()
    requests = [_x([1, 2]), _x([3, 4])]
    responses = adapter.execute(requests, step)
    for request, response in zip(requests, responses):
        assert request.tensors["x"].reads == ["to_dlpack" if numpy2 else "as_numpy"]
        (out,) = response.output_tensors()
        assert out.via == ("dlpack" if numpy2 else "numpy")
        np.testing.assert_array_equal(response.output("y"), 2 * request.tensors["x"].as_numpy())


_OUTPUTS_CHILD = """
import sys
import numpy as np
import triton_fake as fake
from python_backend import triton_io
triton_io.NUMPY2 = True  # outputs through DLPack, as under numpy 2
if sys.argv[1] == "stub-name-left":
    triton_io.mark_consumed = lambda capsule: None
pb_utils = fake.pb_utils_module()
for array in (np.arange(6, dtype=np.float32).reshape(2, 3), np.arange(4, dtype=np.int64), np.zeros((0, 4), np.float32)):
    out = triton_io.output(pb_utils, "y", array)
    assert out.via == "dlpack" and out.as_numpy().dtype == array.dtype, out.via
    np.testing.assert_array_equal(out.as_numpy(), array)
print("outputs equal")
"""


@pytest.mark.parametrize("mode", ["as-served", "stub-name-left"])
def test_an_output_capsule_is_left_named_as_dlpack_says(mode):
    """Under numpy 2 outputs go through DLPack, and the stub names a capsule it took "used_dlpack"
    (the fake does as the stub).  ``output`` renames it "used_dltensor", so numpy's capsule
    destructor is silent.  Left as the stub names it, the destructor prints a "PyCapsule_GetPointer
    called with incorrect name" traceback for every output tensor (seen in the GPU server's logs,
    numpy 2), and under numpy 1 it then crashes the interpreter: hence a child process."""
    tests = Path(__file__).resolve().parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tests), str(tests.parent)])}
    child = subprocess.run([sys.executable, "-c", _OUTPUTS_CHILD, mode], capture_output=True, text=True,
                           env=env, timeout=120)
    if mode == "as-served":
        assert (child.returncode, child.stdout.strip()) == (0, "outputs equal"), child.stderr
        assert "PyCapsule" not in child.stderr
    else:
        assert "PyCapsule_GetPointer called with incorrect name" in child.stderr, child.stderr


# --- device selection ----------------------------------------------------------------------------

@pytest.fixture
def backend_calls(monkeypatch):
    """get_backend's (device, device_id) calls; the NumPy backend stands in for CuPy."""
    calls, numpy_backend = [], backends.get_backend("cpu")

    def get_backend(device, device_id=0):
        calls.append((device, device_id))
        return numpy_backend

    monkeypatch.setattr(backends, "get_backend", get_backend)
    return calls


def test_gpu_instance_runs_on_its_own_device(backend_calls):
    adapter = StepAdapter(fake.model_args(_double_config("gpu"), kind="GPU", device_id=1), fake.pb_utils_module())
    assert backend_calls == [("gpu", 1)]
    assert (adapter.device, adapter.device_id) == ("gpu", 1)


@pytest.mark.parametrize("model", [names.PREPROCESS, names.PREPROCESS_RAW, names.ROI, names.POSTPROCESS])
def test_each_step_model_picks_its_instances_gpu(monkeypatch, backend_calls, model):
    cfg = python_step_config(model, SETTINGS, RepositoryOptions(device="gpu", max_batch_size=2))
    adapter_file = {names.PREPROCESS_RAW: "preprocess.py"}.get(model, f"{model}.py")
    instance = fake.load_model(MODELS / adapter_file, monkeypatch)()
    instance.initialize(fake.model_args(cfg, kind="GPU", device_id=3))
    assert backend_calls == [("gpu", 3)]


def test_torch_arrays_make_the_instances_gpu_current(monkeypatch):
    """torch on a GPU instance: its device current, TF32 off, the allocator capped on that device
    at the parameter's GiB (as a fraction of the card, which is what torch takes)."""
    current, caps = [], []
    monkeypatch.setattr(torch.cuda, "set_device", current.append)
    monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction", lambda f, d: caps.append((f, d)))
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d: types.SimpleNamespace(total_memory=24 << 30))
    cfg = _double_config("gpu")
    cfg.parameters["gpu_memory_gib"].string_value = "6"  # of a 24 GiB card
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        adapter = StepAdapter(fake.model_args(cfg, kind="GPU", device_id=1), fake.pb_utils_module(), arrays="torch")
        assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
    assert current == [torch.device("cuda", 1)] and adapter.arrays.device == torch.device("cuda", 1)
    assert caps == [(0.25, torch.device("cuda", 1))]


def test_host_arrays_on_a_gpu_instance_copy_from_its_own_device(monkeypatch, backend_calls):
    """The ONNX Runtime runner computes on the host: the NumPy backend, and CuPy (which copies GPU
    inputs to the host) made current on the instance's device."""
    used = []
    device = type("Device", (), {"__init__": lambda self, i: setattr(self, "id", i),
                                 "use": lambda self: used.append(self.id)})
    monkeypatch.setitem(sys.modules, "cupy", types.SimpleNamespace(cuda=types.SimpleNamespace(Device=device)))
    StepAdapter(fake.model_args(_double_config("gpu"), kind="GPU", device_id=2), fake.pb_utils_module(),
                arrays="numpy")
    assert backend_calls == [("cpu", 0)] and used == [2]


def test_device_parameter_and_instance_kind_must_agree():
    with pytest.raises(ValueError, match="parameter device is 'gpu' but this instance is KIND_CPU"):
        StepAdapter(fake.model_args(_double_config("gpu"), kind="CPU"), fake.pb_utils_module())


# --- the step models, on the CPU -----------------------------------------------------------------

def _step_model(model: str, monkeypatch):
    cfg = python_step_config(model, SETTINGS, RepositoryOptions(max_batch_size=4))
    adapter_file = {names.PREPROCESS_RAW: "preprocess.py"}.get(model, f"{model}.py")
    instance = fake.load_model(MODELS / adapter_file, monkeypatch)()
    instance.initialize(fake.model_args(cfg))
    return instance


def _outputs(response, *output_names):
    assert not response.has_error(), response.error().message()
    return [response.output(n) for n in output_names]


def test_preprocess_isolates_bad_images(monkeypatch):
    model = _step_model(names.PREPROCESS, monkeypatch)
    images = [textured_image(40, 60, seed=0), textured_image(70, 50, seed=1), textured_image(64, 64, seed=2)]
    bytes_request = lambda data: fake.Request(**{names.IMAGE_BYTES: np.frombuffer(data, np.uint8)[None]})  # noqa: E731
    two = np.stack([np.frombuffer(encode(images[2]), np.uint8)] * 2)
    requests = [bytes_request(encode(images[0])), bytes_request(b"\x00not an image"), bytes_request(encode(images[1])),
                bytes_request(b""), fake.Request(**{names.IMAGE_BYTES: two}),
                bytes_request(encode(textured_image(2, 300, seed=3)))]  # 2x300: the resize leaves it no row
    responses = model.execute(requests)
    outs = (names.IMAGES, names.IMAGE_SIZES, names.ORIGINAL_SIZES)
    for response, own in ((responses[0], images[:1]), (responses[2], images[1:2])):
        for got, want in zip(_outputs(response, *outs), NUMPY.preprocess_batch(own, SETTINGS)):
            np.testing.assert_array_equal(got, want)
    assert "bad input image: not a decodable image" in responses[1].error().message()
    assert "bad input image: empty input" in responses[3].error().message()
    assert responses[4].error().message() == ("bad input image: expected one encoded image per request ([1, N] uint8), "
                                              "got 2 rows: send each image as its own request")
    assert responses[5].error().message().startswith("bad input image: image of 2x300 pixels (height x width) "
                                                     "resizes to 0x64")


def _roi_request(rng, sizes, live: bool = True):
    b = len(sizes)
    xy = rng.uniform(0, 30, (b, SETTINGS.num_proposals, 2))
    wh = rng.uniform(2, 30, (b, SETTINGS.num_proposals, 2))
    levels = rng.integers(0, 5, (b, SETTINGS.num_proposals, 1)) if live else -np.ones((b, SETTINGS.num_proposals, 1))
    proposals = np.concatenate([xy, xy + wh, rng.uniform(0, 1, (b, SETTINGS.num_proposals, 1)), levels], axis=2)
    h, w = SETTINGS.largest_canvas
    features = {n: rng.standard_normal((b, level_grid(h, s), level_grid(w, s), SETTINGS.fpn_channels))
                for n, s in zip(names.FEATURES, FPN_STRIDES)}
    return fake.Request(**{names.PROPOSALS: proposals.astype(np.float32),
                           names.IMAGE_SIZES: np.array(sizes, np.float32),
                           **{n: f.astype(np.float32) for n, f in features.items()}})


def test_roi_isolates_image_sizes_past_the_canvas(monkeypatch):
    model = _step_model(names.ROI, monkeypatch)
    rng = np.random.default_rng(0)
    requests = [_roi_request(rng, [(48, 64)]), _roi_request(rng, [(48, 64), (96, 40)]),
                _roi_request(rng, [(64, 48), (40, 60)]), _roi_request(rng, [(48, 48)], live=False)]
    responses = model.execute(requests)
    assert responses[1].error().message().startswith(
        "image_sizes[1] = (96, 40): expected a resized (height, width) within the 64x64 canvas")
    for i in (0, 2):
        t = {n: requests[i].tensors[n].as_numpy() for n in requests[i].tensors}
        want = NUMPY.roi_step(t[names.PROPOSALS], [t[n] for n in names.FEATURES], t[names.IMAGE_SIZES], SETTINGS)
        assert want.rois.shape[0] > 0
        rois, feats, counts = _outputs(responses[i], names.ROIS, names.ROI_FEATURES, names.NUM_ROIS)
        np.testing.assert_array_equal(rois, want.rois)
        np.testing.assert_array_equal(feats, want.features)
        np.testing.assert_array_equal(counts, want.counts.reshape(-1, 1))
    # no RoI survives: one zero filler row, num_rois 0
    rois, feats, counts = _outputs(responses[3], names.ROIS, names.ROI_FEATURES, names.NUM_ROIS)
    assert rois.tolist() == [[0, 0, 0, 0]] and not feats.any() and counts.tolist() == [[0]]


def _postprocess_request(rng, counts, rows_=None):
    r = sum(counts) if rows_ is None else rows_
    c = SETTINGS.num_classes
    logits = rng.standard_normal((r, c)) * 3
    scores = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    xy = rng.uniform(0, 40, (r, c, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(1, 20, (r, c, 2))], axis=2)
    b = len(counts)
    return fake.Request(**{names.CLASS_SCORES: scores.astype(np.float32), names.CLASS_BOXES: boxes.astype(np.float32),
                           names.NUM_ROIS: np.array(counts, np.int32).reshape(b, 1),
                           names.IMAGE_SIZES: np.full((b, 2), 64, np.float32),
                           names.ORIGINAL_SIZES: np.full((b, 2), 128, np.float32)})


def test_postprocess_isolates_counts_that_disagree_with_the_rois(monkeypatch):
    model = _step_model(names.POSTPROCESS, monkeypatch)
    rng = np.random.default_rng(1)
    requests = [_postprocess_request(rng, [6, 4]), _postprocess_request(rng, [5], rows_=7),
                _postprocess_request(rng, [0], rows_=1),  # the roi step's filler row: no detections
                _postprocess_request(rng, [3, 0, 5])]
    responses = model.execute(requests)
    assert responses[1].error().message().startswith("num_rois sums to 5 RoIs but class_scores has 7 rows")
    outs = (names.DETECTION_BOXES, names.DETECTION_SCORES, names.DETECTION_LABELS, names.NUM_DETECTIONS)
    for i in (0, 3):
        t = {n: requests[i].tensors[n].as_numpy() for n in requests[i].tensors}
        want = NUMPY.postprocess_batch(t[names.CLASS_SCORES], t[names.CLASS_BOXES], t[names.NUM_ROIS].reshape(-1),
                                       t[names.IMAGE_SIZES], t[names.ORIGINAL_SIZES], SETTINGS)
        assert want[3].sum() > 0
        for got, expected in zip(_outputs(responses[i], *outs), want):
            np.testing.assert_array_equal(got, expected)
    boxes, scores, labels, num = _outputs(responses[2], *outs)
    assert num.tolist() == [[0]] and not boxes.any() and not scores.any()


def test_request_canvas_is_read_from_the_shapes_and_checked():
    """The rpn's images or the roi step's maps give a batch's canvas: one of the settings' (a
    TensorRT profile or a trace serves each), with every map the canvas over its stride."""
    settings = DetectorSettings(num_classes=3, canvases=((64, 64), (64, 96)), min_size=48, max_size=96)
    images = {names.IMAGES: np.zeros((2, 3, 64, 96), np.float32)}
    assert adapter_module.request_canvas(images, settings) == (64, 96)
    maps = {n: np.zeros((1, 64 // s, 96 // s, 8), np.float32) for n, s in zip(names.FEATURES, FPN_STRIDES)}
    assert adapter_module.request_canvas(maps, settings) == (64, 96)
    assert adapter_module.request_canvas({names.ROIS: np.zeros((3, 4), np.float32)}, settings) is None
    with pytest.raises(adapter_module.BadRequest, match=r"images: a 96x96 canvas \(height x width\); expected one "
                                                        r"of the canvases 64x64,64x96"):
        adapter_module.request_canvas({names.IMAGES: np.zeros((1, 3, 96, 96), np.float32)}, settings)
    p4 = names.FEATURES[2]
    with pytest.raises(adapter_module.BadRequest,
                       match=rf"{p4}: expected a 4x6 map \(the 64x96 canvas / 16\), got 4x4"):
        adapter_module.request_canvas(dict(maps, **{p4: np.zeros((1, 4, 4, 8), np.float32)}), settings)


@pytest.mark.parametrize("precision, tf32", [("fp32", False), ("tf32", True), ("fp16", False)])
def test_torch_arrays_turn_tf32_on_only_for_the_tf32_precision(monkeypatch, precision, tf32):
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: None)
    monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction", lambda f, d: None)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d: types.SimpleNamespace(total_memory=24 << 30))
    cfg = _double_config("gpu")
    cfg.parameters["precision"].string_value = precision
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = not tf32
        StepAdapter(fake.model_args(cfg, kind="GPU", device_id=0), fake.pb_utils_module(), arrays="torch")
        assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == (tf32, tf32)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved

"""The ``torch`` target: TorchScript traces, their configs, the CLI, a real server, GPU preprocess.

CPU parts run everywhere (traced on the CPU, the runner on KIND_CPU instances); the GPU
preprocess check is marked ``gpu`` and skips with a reason without CuPy or CUDA.
"""
from __future__ import annotations

import numpy as np
import pytest
import skimage.data
import torch

from exporters import torch_export
from exporters.__main__ import main as cli_main
from exporters.repository import RepositoryOptions, bucket_key, read_config, write_repository
from exporters.split import HeaderNetwork, RpnNetwork
from evaluation.parity import assert_parity, from_packed, torchvision_detect
from evaluation.payloads import encode, textured_image
import triton_fake as fake
from python_backend import names
from python_backend.reference.image import preprocess_batch
from python_backend.settings import (DetectorSettings, bucket_file, check_buckets, default_buckets, format_buckets,
                                     parse_buckets)
from python_backend.torch_runtime import CanvasBuckets, RuntimeOptions, TorchNetwork
from tritonclient.grpc import model_config_pb2 as mc

TORCH_TYPES = {torch.float32: mc.TYPE_FP32, torch.int32: mc.TYPE_INT32}


@pytest.fixture(scope="module")
def traces(small_model, square_export, tmp_path_factory):
    """(settings, {"rpn": path, "header": path, "rpn_<h>x<w>": path, ...}) traced on the CPU in fp32 on
    the 320x320 canvas, the rpn also at the default buckets (256x256, 256x320, 320x256)."""
    settings, _ = square_export
    return settings, torch_export.export_torch(small_model, settings, tmp_path_factory.mktemp("torch"), device="cpu",
                                               buckets=default_buckets(settings))


def _images():
    return [skimage.data.astronaut(), textured_image(400, 240, seed=1), textured_image(240, 400, seed=3)]


# --- numerics: the trace is the eager split module ----------------------------------------------

@pytest.mark.parametrize("batch", [1, 3])  # traced at batch 2
def test_traced_rpn_equals_eager_split_module(small_model, traces, batch):
    settings, paths = traces
    x, sizes, _ = preprocess_batch(_images()[:batch], settings)
    x, sizes = torch.from_numpy(x), torch.from_numpy(sizes)
    eager = RpnNetwork(small_model, settings).eval()
    traced = torch.jit.load(str(paths[names.RPN]))
    with torch.no_grad():
        want, got = eager(x, sizes), traced(x, sizes)
    assert len(want) == len(got) == 1 + len(names.FEATURES)
    for name, a, b in zip((names.PROPOSALS, *names.FEATURES), want, got):
        assert b.dtype == torch.float32 and b.shape == a.shape, name
        torch.testing.assert_close(b, a, rtol=0, atol=1e-6, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("frozen", [False, True], ids=["BatchNorm2d", "FrozenBatchNorm2d"])
def test_batch_norms_fold_into_convolutions(small_model, frozen):
    """Both norm types torchvision builds (BatchNorm2d without weights, FrozenBatchNorm2d with them)
    fold into their convolutions: none is left and the backbone computes the same maps."""
    import copy

    from torchvision.ops.misc import FrozenBatchNorm2d

    from exporters.split import fold_batch_norms

    backbone = copy.deepcopy(small_model.backbone).eval()
    g = torch.Generator().manual_seed(3)
    norms = [(n, m) for n, m in backbone.named_modules() if isinstance(m, (torch.nn.BatchNorm2d, FrozenBatchNorm2d))]
    assert len(norms) == 53  # ResNet-50: stem + 16 blocks x 3 + 4 downsample
    for name, m in norms:  # statistics and affine far from the identity, so a wrong fold shows
        c = m.num_features if hasattr(m, "num_features") else m.weight.shape[0]
        stats = dict(weight=torch.rand(c, generator=g) + 0.5, bias=torch.randn(c, generator=g) * 0.1,
                     running_mean=torch.randn(c, generator=g) * 0.1, running_var=torch.rand(c, generator=g) + 0.5)
        if frozen:
            new = FrozenBatchNorm2d(c)
            for k, v in stats.items():
                getattr(new, k).copy_(v)
            parent = backbone.get_submodule(name.rsplit(".", 1)[0]) if "." in name else backbone
            setattr(parent, name.rsplit(".", 1)[-1], new)
        else:
            with torch.no_grad():
                for k, v in stats.items():
                    getattr(m, k).copy_(v)
    folded = copy.deepcopy(backbone)
    assert fold_batch_norms(folded) == 53
    assert not any(isinstance(m, (torch.nn.BatchNorm2d, FrozenBatchNorm2d)) for m in folded.modules())
    x = torch.randn(2, 3, 128, 160, generator=g)
    with torch.no_grad():
        want, got = backbone(x), folded(x)
    for k in want:
        scale = want[k].abs().max()
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=1e-5 * float(scale), msg=lambda m: f"{k}: {m}")


@pytest.mark.parametrize("rois", [1, 37])  # traced at 8
def test_traced_header_equals_eager_split_module(small_model, traces, rois):
    _, paths = traces
    g = torch.Generator().manual_seed(rois)
    feats = torch.randn(rois, 7, 7, 256, generator=g)
    xy = torch.rand(rois, 2, generator=g) * 200
    boxes = torch.cat([xy, xy + 1 + torch.rand(rois, 2, generator=g) * 100], dim=1)
    eager = HeaderNetwork(small_model).eval()
    traced = torch.jit.load(str(paths[names.HEADER]))
    with torch.no_grad():
        want, got = eager(feats, boxes), traced(feats, boxes)
    for name, a, b in zip((names.CLASS_SCORES, names.CLASS_BOXES), want, got):
        assert b.shape == a.shape, name
        torch.testing.assert_close(b, a, rtol=0, atol=1e-6, msg=lambda m: f"{name}: {m}")


def test_fp16_header_keeps_float32_outputs_and_stays_close(small_model, traces):
    settings, _ = traces
    (_, _), (feats, boxes) = torch_export.example_inputs(settings, torch.device("cpu"), rois=16)
    feats = torch.randn(feats.shape, generator=torch.Generator().manual_seed(0))
    net16 = torch_export.header_module(small_model, "fp16")
    traced = torch_export.trace(net16, (feats, boxes), torch.device("cpu"))
    with torch.no_grad():
        want = HeaderNetwork(small_model).eval()(feats, boxes)
        got = traced(feats, boxes)
    for a, b in zip(want, got):
        assert b.dtype == torch.float32 and b.shape == a.shape
    torch.testing.assert_close(got[0], want[0], rtol=0, atol=2e-2)  # softmax of float16 logits


def test_bad_precision_and_device_are_named():
    with pytest.raises(ValueError, match="precision must be one of"):
        torch_export.header_module(None, "int8")
    with pytest.raises(ValueError, match="device must be"):
        torch_export.resolve_device("tpu")
    with pytest.raises(ValueError, match="torch_precision"):
        RepositoryOptions(target="torch", torch_precision="bf16")


# --- configs ------------------------------------------------------------------------------------

@pytest.fixture(scope="module", params=["cpu", "gpu"])
def torch_repo(request, traces, tmp_path_factory):
    settings, paths = traces
    out = tmp_path_factory.mktemp(f"torch_repo_{request.param}")
    options = RepositoryOptions(target="torch", device=request.param, max_batch_size=4, torch_precision="fp16",
                                torch_rpn_buckets=default_buckets(settings))
    write_repository(out, settings, {}, options, torch_models=paths)
    return out, settings, paths, request.param


def _configs(out):
    return {p.parent.name: read_config(p) for p in sorted(out.glob("*/config.pbtxt"))}


@pytest.mark.parametrize("model", [names.RPN, names.HEADER])
def test_torch_network_configs(torch_repo, model):
    out, settings, _, device = torch_repo
    cfg = _configs(out)[model]
    assert cfg.backend == "python" and not cfg.platform
    kind = mc.ModelInstanceGroup.KIND_GPU if device == "gpu" else mc.ModelInstanceGroup.KIND_CPU
    assert [g.kind for g in cfg.instance_group] == [kind]
    params = {k: v.string_value for k, v in cfg.parameters.items()}
    assert params["torch_file"] == "model.pt" and params["precision"] == "fp16"
    assert "onnx_file" not in params
    assert params.get("FORCE_CPU_ONLY_INPUT_TENSORS") == ("no" if device == "gpu" else None)
    assert cfg.HasField("dynamic_batching") and cfg.dynamic_batching.max_queue_delay_microseconds == 0  # the default
    assert cfg.max_batch_size == (4 * settings.rpn_post_nms_top_n if model == names.HEADER else 4)
    # run-time options of the rpn runner (python_backend/torch_runtime.py); the header has none
    if model == names.RPN:
        assert params["channels_last"] == "true"
        assert params["cuda_graphs"] == ("true" if device == "gpu" else "false")
        fused = device == "gpu" and params["precision"] == "fp16"
        assert params["optimize_for_inference"] == ("true" if fused else "false")
        assert params["canvas_buckets"] == "256x256,256x320,320x256"
        assert params["gpu_memory_fraction"] == "0.5"  # room for every bucket's graphs
    else:
        assert "channels_last" not in params and "cuda_graphs" not in params and "canvas_buckets" not in params
    version = out / model / "1"
    assert (version / "model.pt").is_file() and not (version / "model.onnx").exists()
    buckets = sorted(p.name for p in version.glob("model_*.pt"))
    assert buckets == (["model_256x256.pt", "model_256x320.pt", "model_320x256.pt"] if model == names.RPN else [])


@pytest.mark.parametrize("device", ["cpu", pytest.param("gpu", marks=pytest.mark.gpu)])
def test_torch_repository_serves_its_traces(small_model, traces, tmp_path, monkeypatch, device):
    """The rpn and header ``model.py`` that write_repository puts in a torch-target repository load
    that repository's traces (``torch_file``, the canvas buckets) on the instance's device and
    answer a batch of requests, each with what the eager split modules give for it alone.  (The
    ONNX runner there, or a runner that ignored the traces, would not.)"""
    settings, paths = traces
    if device == "gpu":
        if not torch.cuda.is_available():
            pytest.skip("needs CUDA")
        paths = torch_export.export_torch(small_model, settings, tmp_path / "traces", device="gpu",
                                          buckets=default_buckets(settings))
    options = RepositoryOptions(target="torch", device=device, max_batch_size=4, torch_rpn_buckets=default_buckets(settings))
    repo = write_repository(tmp_path / "repo", settings, {}, options, torch_models=paths)

    def serve(model, requests):
        instance = fake.load_model(repo / model / "1" / "model.py", monkeypatch)()
        instance.initialize(fake.model_args(read_config(repo / model / "config.pbtxt"), kind=device.upper(),
                                            repository=repo / model))
        responses = instance.execute([fake.Request(**r) for r in requests])
        assert not any(r.has_error() for r in responses), [r.error().message() for r in responses if r.has_error()]
        return responses

    rpn_requests = [dict(zip((names.IMAGES, names.IMAGE_SIZES), preprocess_batch(ims, settings)[:2]))
                    for ims in (_images()[:1], _images()[1:])]
    eager = RpnNetwork(small_model, settings).eval()
    for request, response in zip(rpn_requests, serve(names.RPN, rpn_requests)):
        x, sizes = (torch.from_numpy(request[n]) for n in (names.IMAGES, names.IMAGE_SIZES))
        with torch.no_grad():
            want = eager(x, sizes)
        got = [torch.from_numpy(response.output(n)) for n in (names.PROPOSALS, *names.FEATURES)]
        assert_same_rpn_outputs(want, got, sizes, dict(rtol=1e-4, atol=1e-3))
    g = torch.Generator().manual_seed(1)
    header_requests = []
    for rois in (5, 9):
        xy = torch.rand(rois, 2, generator=g) * 200
        header_requests.append({names.ROI_FEATURES: torch.randn(rois, 7, 7, 256, generator=g).numpy(),
                                names.ROIS: torch.cat([xy, xy + 1 + torch.rand(rois, 2, generator=g) * 100], 1).numpy()})
    eager = HeaderNetwork(small_model).eval()
    for request, response in zip(header_requests, serve(names.HEADER, header_requests)):
        with torch.no_grad():
            want = eager(*(torch.from_numpy(request[n]) for n in (names.ROI_FEATURES, names.ROIS)))
        for name, a in zip((names.CLASS_SCORES, names.CLASS_BOXES), want):
            torch.testing.assert_close(torch.from_numpy(response.output(name)), a, rtol=1e-4, atol=1e-4,
                                       msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("model", [names.RPN, names.HEADER])
def test_torch_configs_match_the_traces_io(torch_repo, model):
    """Run each trace on inputs built from its config and check every output against the config."""
    out, _, _, _ = torch_repo
    cfg = _configs(out)[model]
    traced = torch.jit.load(str(out / model / "1" / "model.pt"))
    batch = 2
    args = []
    for t in cfg.input:
        assert t.data_type == mc.TYPE_FP32, t.name
        args.append(torch.rand(batch, *t.dims) * (300 if t.name in (names.IMAGE_SIZES, names.ROIS) else 1))
    with torch.no_grad():
        results = traced(*args)
    assert len(results) == len(cfg.output)
    for t, r in zip(cfg.output, results):
        assert TORCH_TYPES[r.dtype] == t.data_type, t.name
        assert list(r.shape) == [batch, *t.dims], f"{model}.{t.name}: trace gives {list(r.shape)}, config {list(t.dims)}"


def test_torch_ensemble_maps_agree_with_step_configs(torch_repo):
    out, _, _, _ = torch_repo
    cfgs = _configs(out)
    ens = cfgs[names.ENSEMBLE]
    produced = {t.name: t.data_type for t in ens.input}
    for step in ens.ensemble_scheduling.step:
        cfg = cfgs[step.model_name]
        inputs = {t.name: t for t in cfg.input}
        outputs = {t.name: t for t in cfg.output}
        assert set(step.input_map) == set(inputs)
        for model_tensor, ens_tensor in step.input_map.items():
            assert produced[ens_tensor] == inputs[model_tensor].data_type
        for model_tensor, ens_tensor in step.output_map.items():
            produced[ens_tensor] = outputs[model_tensor].data_type
    assert {t.name for t in ens.output} <= set(produced)


def test_torch_target_needs_traces(traces, tmp_path):
    settings, paths = traces
    with pytest.raises(ValueError, match="needs TorchScript traces"):
        write_repository(tmp_path, settings, {}, RepositoryOptions(target="torch"))
    with pytest.raises(ValueError, match="needs TorchScript traces"):
        write_repository(tmp_path, settings, {}, RepositoryOptions(target="torch"),
                         torch_models={names.RPN: paths[names.RPN]})
    with pytest.raises(ValueError, match=r"an rpn trace for each canvas bucket; missing \['288x288'\]"):
        write_repository(tmp_path, settings, {}, RepositoryOptions(target="torch", torch_rpn_buckets=((288, 288),)),
                         torch_models=paths)
    with pytest.raises(ValueError, match="canvas bucket 320x352 must fit in the 320x320 canvas"):
        write_repository(tmp_path, settings, {}, RepositoryOptions(target="torch", torch_rpn_buckets=((320, 352),)),
                         torch_models={**paths, "rpn_320x352": paths[names.RPN]})


def test_cli_exports_the_torch_target(tmp_path):
    repo = tmp_path / "repo"
    rc = cli_main(["export", "--target", "torch", "--device", "cpu", "--canvas", "320x320", "--min-size", "256",
                   "--max-size", "320", "--repository", str(repo)])
    assert rc == 0
    for model in (names.RPN, names.HEADER):
        assert (repo / model / "1" / "model.pt").is_file()
        params = read_config(repo / model / "config.pbtxt").parameters
        assert params["precision"].string_value == "fp32"
    # --rpn-buckets auto (the default): the square, 4:3 and 3:4 buckets of this canvas
    assert sorted(p.name for p in (repo / names.RPN / "1").glob("model_*.pt")) == [
        "model_256x256.pt", "model_256x320.pt", "model_320x256.pt"]


def test_cli_postprocess_instances(tmp_path):
    repo = tmp_path / "repo"
    rc = cli_main(["export", "--target", "torch", "--device", "cpu", "--canvas", "320x320", "--min-size", "256",
                   "--max-size", "320", "--rpn-buckets", "none", "--postprocess-instances", "3",
                   "--repository", str(repo)])
    assert rc == 0
    assert [g.count for g in read_config(repo / names.POSTPROCESS / "config.pbtxt").instance_group] == [3]
    assert [g.count for g in read_config(repo / names.RPN / "config.pbtxt").instance_group] == [1]


@pytest.mark.parametrize("arg, want", [("none", ""), ("288x320, 256x256", "256x256,288x320")])
def test_cli_rpn_buckets(tmp_path, arg, want):
    repo = tmp_path / "repo"
    rc = cli_main(["export", "--target", "torch", "--device", "cpu", "--canvas", "320x320", "--min-size", "256",
                   "--max-size", "320", "--rpn-buckets", arg, "--repository", str(repo)])
    assert rc == 0
    params = read_config(repo / names.RPN / "config.pbtxt").parameters
    assert params["canvas_buckets"].string_value == want
    assert params["gpu_memory_fraction"].string_value == ("0.5" if want else "0.3")
    assert sorted(p.name for p in (repo / names.RPN / "1").glob("model_*.pt")) == [
        bucket_file(h, w) for h, w in parse_buckets(want)]


@pytest.mark.parametrize("arg, error", [("320", "not HEIGHTxWIDTH"), ("300x320", "multiple of 32")])
def test_cli_rejects_bad_rpn_buckets(tmp_path, capsys, arg, error):
    with pytest.raises(SystemExit):
        cli_main(["export", "--target", "torch", "--device", "cpu", "--rpn-buckets", arg,
                  "--repository", str(tmp_path / "repo")])
    assert error in capsys.readouterr().err


def test_cli_rejects_a_bucket_larger_than_the_canvas(tmp_path, capsys):
    rc = cli_main(["export", "--target", "torch", "--device", "cpu", "--canvas", "320x320", "--min-size", "256",
                   "--max-size", "320", "--rpn-buckets", "352x320", "--repository", str(tmp_path / "repo")])
    assert rc == 2
    assert "canvas bucket 352x320 must fit in the 320x320 canvas" in capsys.readouterr().err


def test_cli_torch_gpu_without_cuda_is_an_error(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here: the error path is for machines without it")
    rc = cli_main(["export", "--target", "torch", "--device", "gpu", "--canvas", "320x320", "--repository",
                   str(tmp_path / "repo")])
    assert rc == 2
    assert "no CUDA device" in capsys.readouterr().err


# --- a real server: the torch runner in the ensemble --------------------------------------------

@pytest.mark.triton
def test_torch_target_on_tritonserver_matches_torchvision(small_model, traces, tmp_path):
    pytest.importorskip("tritonclient.grpc")
    from client import detect
    from fasterrcnn.server import ServerError, TritonServer, free_port

    settings, paths = traces
    repo = tmp_path / "repo"
    options = RepositoryOptions(target="torch", max_batch_size=4, queue_delay_us=100_000,
                                torch_rpn_buckets=default_buckets(settings))
    write_repository(repo, settings, {}, options, torch_models=paths)
    server = TritonServer(repo, grpc_port=free_port(), http_port=free_port(), metrics_port=free_port())
    try:
        server.start(timeout=240)
    except ServerError as e:
        pytest.fail(str(e))
    try:
        client = detect.connect(server.grpc_url)
        images = _images()
        # together (batched onto the full canvas) and one at a time (each on its own bucket)
        for concurrency in (3, 1):
            results = detect.infer_many(client, [encode(im) for im in images], concurrency=concurrency)
            for i, (image, res) in enumerate(zip(images, results)):
                assert not isinstance(res, Exception), res
                ours = from_packed(*(res.as_numpy(n) for n in (names.DETECTION_BOXES, names.DETECTION_SCORES,
                                                                names.DETECTION_LABELS, names.NUM_DETECTIONS)))
                assert_parity(torchvision_detect(small_model, image), ours,
                              f"torch target image {i} at concurrency {concurrency}")
        bad = detect.infer_many(client, [b"not an image"])[0]
        assert isinstance(bad, Exception) and "bad input image" in str(bad)
    finally:
        server.stop()


# --- GPU preprocess equals the NumPy path ------------------------------------------------------

def _cupy_or_skip():
    cp = pytest.importorskip("cupy", reason="CuPy is not installed: the GPU preprocess cannot be tested here")
    try:
        if cp.cuda.runtime.getDeviceCount() < 1:
            raise RuntimeError("no device")
    except Exception:
        pytest.skip("no CUDA device visible to CuPy")
    return cp


# --- the runner's core: channels last and CUDA graphs ------------------------------------------------

def test_rpn_trace_has_no_host_synchronization(traces):
    """The rpn must be capturable as a CUDA graph (python_backend/torch_runtime.py): no op in the
    trace may read a tensor's value on the host (``int(tensor)``, ``.item()``, ``nonzero``).
    Seen on the H100: ``reshape(-1, n * base.shape[0], 4)`` traced as NumToTensor -> mul with a
    CUDA constant -> Int, a device-to-host read, and capture failed."""
    _, paths = traces
    graph = str(torch.jit.load(str(paths[names.RPN])).inlined_graph)
    for op in ("aten::Int", "aten::item", "aten::nonzero", "prim::NumToTensor", "aten::ScalarImplicit"):
        assert op not in graph, f"{op} in the rpn trace"


def _rpn_inputs(settings, batch, device="cpu"):
    x, sizes, _ = preprocess_batch(_images()[:batch], settings)
    return [torch.from_numpy(x).to(device), torch.from_numpy(sizes).to(device)]


def test_runtime_options_from_parameters():
    assert RuntimeOptions.from_parameters({}) == RuntimeOptions(False, False, False)
    assert RuntimeOptions.from_parameters({"channels_last": "true", "cuda_graphs": "False"}) == RuntimeOptions(True, False)
    assert RuntimeOptions.from_parameters({"optimize_for_inference": "yes"}) == RuntimeOptions(optimize_for_inference=True)
    with pytest.raises(ValueError, match="expected true or false, got 'maybe'"):
        RuntimeOptions.from_parameters({"cuda_graphs": "maybe"})
    with pytest.raises(ValueError, match="cuda_graphs needs a GPU"):
        TorchNetwork(__file__, torch.device("cpu"), [[3, 8, 8]], 4, RuntimeOptions(cuda_graphs=True))
    with pytest.raises(ValueError, match="optimize_for_inference is for GPU"):
        TorchNetwork(__file__, torch.device("cpu"), [[3, 8, 8]], 4, RuntimeOptions(optimize_for_inference=True))


def test_channels_last_rpn_equals_the_plain_trace(traces):
    """Same trace, channels-last weights and input: the same numbers up to convolution order."""
    settings, paths = traces
    args = _rpn_inputs(settings, 3)
    dims = [list(a.shape[1:]) for a in args]
    plain = TorchNetwork(str(paths[names.RPN]), torch.device("cpu"), dims, 4)
    nhwc = TorchNetwork(str(paths[names.RPN]), torch.device("cpu"), dims, 4, RuntimeOptions(channels_last=True))
    assert any(p.dim() == 4 and p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous()
               for p in nhwc.module.parameters())
    want, got = plain(args), nhwc(args)
    for name, a, b in zip(names.FEATURES, want[1:], got[1:]):
        assert b.shape == a.shape and b.dtype == a.dtype, name
        torch.testing.assert_close(b, a, rtol=1e-3, atol=1e-3, msg=lambda m: f"{name}: {m}")  # summation order
    # proposals: random weights give near-tied objectness, so convolution order may swap a few
    # rows of the top-k; nearly every row must still be there
    a, b = want[0], got[0]
    assert b.shape == a.shape
    for i in range(a.shape[0]):
        close = torch.isclose(b[i][:, None, :], a[i][None, :, :], rtol=1e-4, atol=1e-3).all(-1).any(1)
        assert close.float().mean() >= 0.99, f"image {i}: {close.float().mean():.3f} of the proposals found"


# --- canvas buckets: the rpn on the smallest canvas that holds a batch ---------------------------

def test_default_buckets_and_their_checks():
    assert default_buckets(DetectorSettings(num_classes=91)) == ((800, 800), (800, 1088))  # 800x1344: landscape only
    assert default_buckets(DetectorSettings(num_classes=91, canvas_height=1344)) == (
        (800, 800), (800, 1088), (1088, 800))
    assert default_buckets(DetectorSettings(num_classes=91, canvas_width=800)) == ()  # the canvas is the square one
    assert parse_buckets(format_buckets(((800, 1088), (800, 800)))) == ((800, 1088), (800, 800))
    assert parse_buckets("") == ()
    assert check_buckets([(800, 1088), (800, 800), (800, 800)], (800, 1344)) == ((800, 800), (800, 1088))
    for bad, error in ((((800, 1344),), "be smaller"), (((832, 800),), "must fit"), (((800, 1000),), "multiple of 32")):
        with pytest.raises(ValueError, match=error):
            check_buckets(bad, (800, 1344))


def _bucketed(settings, paths, device="cpu", options=RuntimeOptions(), max_batch=4):
    bucketed = CanvasBuckets.load(paths[names.RPN], {b: paths[bucket_key(*b)] for b in default_buckets(settings)},
                                  torch.device(device), max_batch, options, settings)
    return bucketed.full, bucketed


def assert_same_rpn_outputs(want, got, image_sizes, tol):
    """Outputs of one batch on two canvases: each image's proposals of each level, and its map cells
    inside its padded extent.  Convolutions at another width sum in another order, so values agree
    to ``tol``, and random weights give near-tied objectness, so a few rows of a level may swap
    places in the top-k: nearly every row must be found, in the same number per level."""
    proposals_want, proposals_got = want[0], got[0]
    assert proposals_got.shape == proposals_want.shape
    for i in range(proposals_want.shape[0]):
        for level in range(5):
            a = proposals_want[i][proposals_want[i][:, 5] == level]
            b = proposals_got[i][proposals_got[i][:, 5] == level]
            assert b.shape == a.shape, f"image {i} level {level}: {b.shape[0]} proposals, want {a.shape[0]}"
            found = torch.isclose(b[:, None, :], a[None, :, :], **tol).all(-1).any(1).float().mean()
            assert found >= 0.99, f"image {i} level {level}: {found:.3f} of the proposals found"
    for name, stride, a, b in zip(names.FEATURES, (4, 8, 16, 32), want[1:], got[1:]):
        assert b.shape == a.shape and b.dtype == a.dtype, name
        for i, (h, w) in enumerate(image_sizes.tolist()):
            eh, ew = -(-int(h) // 32) * 32 // stride, -(-int(w) // 32) * 32 // stride
            torch.testing.assert_close(b[i, :eh, :ew], a[i, :eh, :ew], **tol, msg=lambda m: f"{name} image {i}: {m}")


@pytest.mark.parametrize("images, canvas", [
    ([0], (256, 256)),  # astronaut 512x512 -> 256x256
    ([0, 2], (256, 320)),  # with a 240x400 landscape (192x320)
    ([1], (320, 256)),  # a 400x240 portrait (320x192)
    ([0, 1, 2], (320, 320)),  # portrait and landscape: the full canvas
])
def test_bucketed_rpn_equals_the_full_canvas(traces, images, canvas):
    settings, paths = traces
    full, bucketed = _bucketed(settings, paths)
    x, sizes, _ = preprocess_batch([_images()[i] for i in images], settings)
    args = [torch.from_numpy(x), torch.from_numpy(sizes)]
    assert bucketed.select(args[1])[0] == canvas
    got = bucketed(args)
    assert bucketed.calls == {canvas: 1}
    want = full(args)
    assert_same_rpn_outputs(want, got, args[1], dict(rtol=1e-4, atol=1e-3))
    if canvas != settings.canvas:  # past the bucket: zero cells
        for stride, m in zip((4, 8, 16, 32), got[1:]):
            assert not m[:, canvas[0] // stride:].any() and not m[:, :, canvas[1] // stride:].any()


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_bucketed_rpn_with_graphs_equals_the_full_canvas(small_model, square_export, tmp_path, precision):
    """As served on the GPU (graphs in one shared pool; fp16: channels last and the fused
    convolutions): every batch on its bucket gives the full canvas's outputs."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    settings, _ = square_export
    paths = torch_export.export_torch(small_model, settings, tmp_path, device="gpu", precision=precision,
                                      buckets=default_buckets(settings))
    fp16 = precision == "fp16"
    options = RuntimeOptions(channels_last=fp16, cuda_graphs=True, optimize_for_inference=fp16)
    tol = dict(rtol=1e-2, atol=5e-2) if fp16 else dict(rtol=1e-4, atol=1e-3)
    with torch_export._tf32_off():
        full, bucketed = _bucketed(settings, paths, "cuda", options, max_batch=3)
        bucketed.warm_up()
        assert all(sorted(net._graphs) == [1, 2, 3] and net._pool == full._pool for _, net in bucketed.buckets)
        cases = (([0], (256, 256)), ([0, 2], (256, 320)), ([1], (320, 256)), ([0, 1, 2], (320, 320)))
        for images, canvas in cases:
            x, sizes, _ = preprocess_batch([_images()[i] for i in images], settings)
            args = [torch.from_numpy(x).cuda(), torch.from_numpy(sizes).cuda()]
            got = bucketed(args)
            assert_same_rpn_outputs(full(args), got, args[1], tol)
    assert bucketed.calls == {canvas: 1 for _, canvas in cases}


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_cuda_graph_rpn_equals_eager_calls(small_model, square_export, tmp_path, precision):
    """The runner's graphs (one per batch size, shared pool) give what the trace gives eagerly, for
    every batch size and in any order, and their outputs survive the next replay."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    settings, _ = square_export
    dev = torch.device("cuda")
    paths = torch_export.export_torch(small_model, settings, tmp_path, device="gpu", precision=precision)
    dims = [[3, *settings.canvas], [2]]
    options = RuntimeOptions(channels_last=True, cuda_graphs=True)
    graphed = TorchNetwork(str(paths[names.RPN]), dev, dims, 3, options)
    graphed.warm_up()
    eager = TorchNetwork(str(paths[names.RPN]), dev, dims, 3, RuntimeOptions(channels_last=True))
    assert sorted(graphed._graphs) == [1, 2, 3]
    kept = []
    for batch in (3, 1, 2, 3):
        args = _rpn_inputs(settings, batch, dev)
        got = graphed(args)
        kept.append((args, [t.clone() for t in got], got))
        want = eager(args)
        for name, a, b in zip((names.PROPOSALS, *names.FEATURES), want, got):
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5, msg=lambda m: f"batch {batch} {name}: {m}")
    for _, snapshot, got in kept:  # later replays did not overwrite earlier outputs
        for a, b in zip(snapshot, got):
            assert torch.equal(a, b)


@pytest.mark.gpu
def test_warmed_header_serves_any_roi_count_without_growing(small_model, square_export, tmp_path):
    """After warm_up, header calls of any RoI count up to the largest reuse the cached blocks: the
    process's reserved GPU memory stays within a few small-block segments of where warm_up left it
    (without the warm-up's last, largest call, the soak's header step grew in steps: docs/benchmarks.md,
    "Soak memory").  Control: the same calls after dropping the cache grow it by more than that slack."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    settings, _ = square_export
    dev = torch.device("cuda")
    paths = torch_export.export_torch(small_model, settings, tmp_path, device="gpu", precision="fp32")
    s, ch = settings.roi_output_size, settings.fpn_channels
    max_rois = 4 * settings.rpn_post_nms_top_n
    net = TorchNetwork(str(paths[names.HEADER]), dev, [[s, s, ch], [4]], max_rois)
    g = torch.Generator().manual_seed(0)
    counts = [int(n) for n in torch.randint(1, max_rois + 1, (12,), generator=g)] + [max_rois, 1, max_rois - 1]
    # the requests' tensors exist before the warm-up: in serving they are Triton's memory, not this
    # process's allocator
    feeds = {n: (torch.rand([n, s, s, ch], device=dev),
                 torch.tensor([[0.0, 0.0, 50.0, 60.0]], device=dev).repeat(n, 1)) for n in set(counts)}

    def serve(parts):
        for n in counts:
            f, r = feeds[n]
            # one request as is; several are joined with torch.cat, as the runner does
            args = [f, r] if parts == 1 else [torch.cat(f.chunk(parts)), torch.cat(r.chunk(parts))]
            out = net(args)
            assert out[0].shape == (n, settings.num_classes)
            del out, args
        torch.cuda.synchronize(dev)

    torch.cuda.empty_cache()
    net.warm_up()
    reserved = torch.cuda.memory_reserved(dev)
    serve(1)
    serve(3)
    # a few 2 MiB small-block segments may still come; the soak's growth without the warm-up's
    # last call was hundreds of MiB (docs/benchmarks.md, "Soak memory")
    slack = 32 << 20
    assert torch.cuda.memory_reserved(dev) - reserved <= slack
    torch.cuda.empty_cache()
    cold = torch.cuda.memory_reserved(dev)
    serve(1)
    serve(3)
    assert torch.cuda.memory_reserved(dev) - cold > slack


@pytest.mark.gpu
def test_optimized_fp16_rpn_is_as_close_to_fp32_as_the_plain_fp16(small_model, square_export, tmp_path):
    """optimize_for_inference (cuDNN's fused convolution + bias + ReLU, in a CUDA graph) against the
    fp32 trace of the same weights, next to the plain fp16 trace: its FPN maps and proposals must
    be no further from fp32 than the plain fp16 ones.  (Fused, a convolution's output is rounded to
    float16 once instead of after each of conv, bias and ReLU; with random weights, objectness
    near-ties let either fp16 path swap a few top-k rows, so proposals are compared as fractions.)"""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    settings, _ = square_export
    dev = torch.device("cuda")
    dims = [[3, *settings.canvas], [2]]
    p16 = torch_export.export_torch(small_model, settings, tmp_path / "fp16", device="gpu", precision="fp16")
    p32 = torch_export.export_torch(small_model, settings, tmp_path / "fp32", device="gpu", precision="fp32")
    fused = TorchNetwork(str(p16[names.RPN]), dev, dims, 3, RuntimeOptions(True, True, True))
    fused.warm_up()
    assert "aten::cudnn_convolution_relu" in str(fused.module.inlined_graph)  # the fusion happened
    plain = TorchNetwork(str(p16[names.RPN]), dev, dims, 3, RuntimeOptions(channels_last=True))
    ref = TorchNetwork(str(p32[names.RPN]), dev, dims, 3)
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    args = _rpn_inputs(settings, 3, dev)
    want, base, got = ref(args), plain(args), fused(args)
    for name, a, b, c in zip(names.FEATURES, want[1:], base[1:], got[1:]):
        scale = float(a.abs().max())
        err_plain, err_fused = float((b - a).abs().max()) / scale, float((c - a).abs().max()) / scale
        assert err_fused <= max(1.5 * err_plain, 2e-3), f"{name}: fused {err_fused:.2e}, plain fp16 {err_plain:.2e}"

    def found(rows, reference):
        return torch.isclose(rows[:, None, :], reference[None, :, :], rtol=1e-3, atol=0.5).all(-1).any(1).float().mean()

    for i in range(args[0].shape[0]):
        f_plain, f_fused = float(found(base[0][i], want[0][i])), float(found(got[0][i], want[0][i]))
        assert f_fused >= f_plain - 0.05, f"image {i}: fused {f_fused:.3f}, plain fp16 {f_plain:.3f} found"


@pytest.mark.gpu
@pytest.mark.parametrize("shapes", [[(512, 512)], [(300, 400), (400, 240), (12, 20), (256, 320)]])
def test_gpu_preprocess_equals_numpy(square_export, shapes):
    cp = _cupy_or_skip()
    from python_backend.cuda.image import preprocess_batch as gpu_preprocess_batch

    settings, _ = square_export
    images = [textured_image(h, w, seed=i) for i, (h, w) in enumerate(shapes)]
    want = preprocess_batch(images, settings)
    # The kernel writes the padding itself (the batch is not zeroed first): leave NaN in the pool
    # block the batch will reuse, so a missed padding element shows.
    ch, cw = settings.canvas
    junk = cp.full((len(images), 3, ch, cw), cp.nan, dtype=cp.float32)
    del junk
    got = gpu_preprocess_batch(images, settings)
    for a, b in zip(want, got):
        assert isinstance(b, cp.ndarray)
        np.testing.assert_array_equal(cp.asnumpy(b), a)  # bit for bit: same float32 steps, no FMA


@pytest.mark.gpu
def test_gpu_preprocess_rejects_what_does_not_fit(landscape_export):
    _cupy_or_skip()
    from python_backend.cuda.image import preprocess_batch as gpu_preprocess_batch
    from python_backend.reference.image import BadImageError

    settings, _ = landscape_export
    with pytest.raises(BadImageError, match="does not fit"):
        gpu_preprocess_batch([textured_image(400, 240, seed=0)], settings)

"""The ``torch`` target: TorchScript traces, their configs, the CLI, a real server, GPU preprocess.

CPU parts run everywhere (traced on the CPU, the runner on KIND_CPU instances); the GPU
preprocess check is marked ``gpu`` and skips with a reason without CuPy or CUDA.
"""
from __future__ import annotations

import numpy as np
import pytest
import skimage.data
import torch
from torchvision.models.detection.transform import GeneralizedRCNNTransform

from exporters import torch_export
from fasterrcnn.__main__ import main as cli_main
from exporters.repository import RepositoryOptions, all_configs, canvas_key, read_config, write_repository
from exporters.split import HeaderNetwork, RpnNetwork
from evaluation.parity import assert_parity, from_packed, torchvision_detect
from evaluation.payloads import encode, textured_image
import triton_fake as fake
from python_backend import names
from python_backend.reference.image import preprocess_batch
from python_backend.settings import DetectorSettings, canvas_file, fills_canvas
from python_backend.torch_runtime import CanvasNetworks, RuntimeOptions, TorchNetwork
from tritonclient.grpc import model_config_pb2 as mc

TORCH_TYPES = {torch.float32: mc.TYPE_FP32, torch.float16: mc.TYPE_FP16, torch.int32: mc.TYPE_INT32}


def _images():
    """A square, a portrait and a landscape image: one per canvas."""
    return [skimage.data.astronaut(), textured_image(400, 240, seed=1), textured_image(240, 400, seed=3)]


# images each canvas is the smallest for (preprocess picks it for any batch of them)
ON_CANVAS = {(256, 256): [(512, 512), (300, 300), (100, 100)], (256, 320): [(240, 400), (200, 300), (230, 320)],
             (320, 256): [(400, 240), (300, 200), (320, 230)]}
LANDSCAPE = (256, 320)


def _batch(canvas, n: int, seed: int = 0):
    """``n`` images whose batch preprocess pads onto ``canvas``."""
    return [textured_image(h, w, seed=seed + i) for i, (h, w) in enumerate(ON_CANVAS[canvas][:n])]


def _rpn_inputs(settings, batch, device="cpu", canvas=LANDSCAPE):
    x, sizes, _ = preprocess_batch(_batch(canvas, batch), settings)
    assert x.shape[-2:] == canvas
    return [torch.from_numpy(x).to(device), torch.from_numpy(sizes).to(device)]


# --- numerics: the trace is the eager split module ----------------------------------------------

@pytest.mark.parametrize("canvas", list(ON_CANVAS))
@pytest.mark.parametrize("batch", [1, 3])  # traced at batch 2
def test_traced_rpn_equals_eager_split_module(small_model, small_traces, batch, canvas):
    """Each canvas's trace is the eager network on that canvas."""
    settings, paths = small_traces
    x, sizes = _rpn_inputs(settings, batch, canvas=canvas)
    eager = RpnNetwork(small_model, settings).eval()
    traced = torch.jit.load(str(paths[canvas_key(*canvas)]))
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
def test_traced_header_equals_eager_split_module(small_model, small_traces, rois):
    _, paths = small_traces
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


def test_fp16_header_keeps_float32_outputs_and_stays_close(small_model, small_traces):
    settings, _ = small_traces
    (_, _), (feats, boxes) = torch_export.example_inputs(settings, torch.device("cpu"), LANDSCAPE, rois=16)
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

# float16 runs about seven times slower than float32 on a CPU, so the fp16 traces (whose configs,
# files and tensor types are what their tests check, not their numbers) are of the same ResNet-50
# detector at a 64/96 resize: canvases 64x64, 64x96 and 96x64
TINY = dict(num_classes=91, seed=0, min_size=64, max_size=96)
TINY_CANVASES = ((64, 64), (64, 96), (96, 64))


@pytest.fixture(scope="module")
def traces16(tmp_path_factory):
    """As ``small_traces`` (tests/conftest.py), in fp16 (float16 FPN maps out of the rpn), of the
    ``TINY`` detector."""
    from exporters.loading import random_model, read_class_names, settings_from_model

    model = random_model(**TINY)
    settings = settings_from_model(model, "auto", read_class_names(None, 91))
    assert settings.canvases == TINY_CANVASES
    return settings, torch_export.export_torch(model, settings, tmp_path_factory.mktemp("torch16"), device="cpu",
                                               precision="fp16")


@pytest.fixture(scope="module", params=["cpu", "gpu"])
def torch_repo(request, traces16, tmp_path_factory):
    """An fp16 torch-target repository of the fp16 traces."""
    settings, paths = traces16
    out = tmp_path_factory.mktemp(f"torch_repo_{request.param}")
    options = RepositoryOptions(target="torch", device=request.param, max_batch_size=4, torch_precision="fp16")
    write_repository(out, settings, {}, options, torch_models=paths, link=True)
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
    assert params["precision"] == "fp16" and "onnx_file" not in params
    # the header's one trace; the rpn's one per canvas, found by the settings' canvases
    assert (params.get("torch_file"), params.get("torch_per_canvas")) == (
        (None, "true") if model == names.RPN else ("model.pt", None))
    assert params.get("FORCE_CPU_ONLY_INPUT_TENSORS") == ("no" if device == "gpu" else None)
    # the caching allocator's cap (GiB) of each torch process on a GPU; none on the CPU
    assert params.get("gpu_memory_gib") == ({names.RPN: "8", names.HEADER: "4"}[model] if device == "gpu" else None)
    assert cfg.HasField("dynamic_batching") and cfg.dynamic_batching.max_queue_delay_microseconds == 0  # the default
    assert cfg.max_batch_size == (4 * settings.rpn_post_nms_top_n if model == names.HEADER else 4)
    # run-time options of the rpn runner (python_backend/torch_runtime.py); the header has none
    if model == names.RPN:
        assert params["channels_last"] == "true"
        assert params["cuda_graphs"] == ("true" if device == "gpu" else "false")
        fused = device == "gpu" and params["precision"] == "fp16"
        assert params["optimize_for_inference"] == ("true" if fused else "false")
        assert params["canvases"] == "[[64, 64], [64, 96], [96, 64]]"
        assert params["unmasked_rpn"] == "true"  # RepositoryOptions.torch_unmasked_rpn: on by default
    else:
        assert "channels_last" not in params and "cuda_graphs" not in params
    version = out / model / "1"
    assert sorted(p.name for p in version.iterdir()) == (
        ["model.py", "model_64x64.pt", "model_64x64_unmasked.pt", "model_64x96.pt", "model_64x96_unmasked.pt",
         "model_96x64.pt", "model_96x64_unmasked.pt"] if model == names.RPN else ["model.pt", "model.py"])


@pytest.mark.parametrize("device", ["cpu", pytest.param("gpu", marks=pytest.mark.gpu)])
def test_torch_repository_serves_its_traces(small_model, small_traces, tmp_path, monkeypatch, device):
    """The rpn and header ``model.py`` that write_repository puts in a torch-target repository load
    that repository's traces (the header's ``torch_file``, the rpn's per canvas) on the instance's
    device and answer a batch of requests, each with what the eager split modules give for it
    alone.  (The ONNX runner there, or a runner that ignored the traces, would not.)"""
    settings, paths = small_traces
    if device == "gpu":
        if not torch.cuda.is_available():
            pytest.skip("needs CUDA")
        paths = torch_export.export_torch(small_model, settings, tmp_path / "traces", device="gpu")
    options = RepositoryOptions(target="torch", device=device, max_batch_size=4)
    repo = write_repository(tmp_path / "repo", settings, {}, options, torch_models=paths, link=True)

    def serve(model, requests):
        instance = fake.load_model(repo / model / "1" / "model.py", monkeypatch)()
        instance.initialize(fake.model_args(read_config(repo / model / "config.pbtxt"), kind=device.upper(),
                                            repository=repo / model))
        responses = instance.execute([fake.Request(**r) for r in requests])
        assert not any(r.has_error() for r in responses), [r.error().message() for r in responses if r.has_error()]
        return responses

    eager = RpnNetwork(small_model, settings).eval()
    # the CPU eager network is the reference: on the GPU the convolutions sum in another order, and
    # boxes decoded through exp() of the deltas carry that difference (seen on the H200: a few P6
    # boxes outside the CPU's tolerance)
    tol = dict(rtol=1e-3, atol=1e-2) if device == "gpu" else dict(rtol=1e-4, atol=1e-3)
    # an execute holds requests on one canvas (Triton's batcher joins equal shapes only); each
    # canvas gets its own
    for canvas in settings.canvases:
        rpn_requests = [dict(zip((names.IMAGES, names.IMAGE_SIZES), preprocess_batch(ims, settings)[:2]))
                        for ims in (_batch(canvas, 1), _batch(canvas, 2, seed=5))]
        for request, response in zip(rpn_requests, serve(names.RPN, rpn_requests)):
            x, sizes = (torch.from_numpy(request[n]) for n in (names.IMAGES, names.IMAGE_SIZES))
            assert tuple(x.shape[-2:]) == canvas
            with torch.no_grad():
                want = eager(x, sizes)
            got = [torch.from_numpy(response.output(n)) for n in (names.PROPOSALS, *names.FEATURES)]
            assert_same_rpn_outputs(want, got, sizes, tol)
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


@pytest.mark.parametrize("precision, graphs, maps", [("fp16", "true", mc.TYPE_FP16), ("fp32", "false", mc.TYPE_FP32),
                                                     ("tf32", "false", mc.TYPE_FP32)])
def test_gpu_rpn_options_per_precision(small_traces, tmp_path, precision, graphs, maps):
    """On a GPU, CUDA graphs for the fp16 rpn only (fp32's filled the rpn's memory cap at warm-up,
    docs/benchmarks.md), and float16 maps from rpn to roi in fp16 only; two rpn instances in fp16
    only (docs/benchmarks.md, session 18), and one more postprocess instance than rpn instances."""
    settings, paths = small_traces
    write_repository(tmp_path, settings, {}, RepositoryOptions(target="torch", device="gpu",
                                                               torch_precision=precision),
                     torch_models=paths, link=True)
    cfgs = _configs(tmp_path)
    assert cfgs[names.RPN].parameters["cuda_graphs"].string_value == graphs
    counts = {name: [g.count for g in cfgs[name].instance_group] for name in names.STEPS}
    rpn = 2 if precision == "fp16" else 1
    assert counts == {**dict.fromkeys(names.STEPS, [1]), names.RPN: [rpn], names.POSTPROCESS: [rpn + 1]}, counts
    for tensors in (cfgs[names.RPN].output, cfgs[names.ROI].input):
        assert {t.name: t.data_type for t in tensors if t.name in names.FEATURES} == dict.fromkeys(names.FEATURES, maps)


@pytest.mark.parametrize("model", [names.RPN, names.HEADER])
def test_torch_configs_match_the_traces_io(torch_repo, model):
    """Run each trace on inputs built from its config (the rpn's at each canvas, where the config's
    height and width are -1) and check every output against the config: a -1 there is the
    canvas's map size.  Both devices' repositories hold the same traces (hard links) and the same
    tensor specs, so the traces run once, under the CPU repository's configs (float16 runs slowly
    on the CPU), and the GPU repository's specs must equal those."""
    out, settings, _, device = torch_repo
    cfg = _configs(out)[model]
    if device == "gpu":
        cpu_cfg = all_configs(settings, RepositoryOptions(target="torch", device="cpu", max_batch_size=4,
                                                          torch_precision="fp16"))[model]
        assert (list(cfg.input), list(cfg.output)) == (list(cpu_cfg.input), list(cpu_cfg.output))
        return
    batch = 2
    files = {c: canvas_file(*c) for c in settings.canvases} if model == names.RPN else {None: "model.pt"}
    for canvas, file in files.items():
        traced = torch.jit.load(str(out / model / "1" / file))
        args = []
        for t in cfg.input:
            assert t.data_type == mc.TYPE_FP32, t.name
            free = iter(canvas or ())
            dims = [next(free) if d == -1 else d for d in t.dims]
            args.append(torch.rand(batch, *dims) * (300 if t.name in (names.IMAGE_SIZES, names.ROIS) else 1))
        with torch.no_grad():
            results = traced(*args)
        assert len(results) == len(cfg.output)
        for t, r in zip(cfg.output, results):
            assert TORCH_TYPES[r.dtype] == t.data_type, t.name
            assert len(r.shape) == len(t.dims) + 1 and r.shape[0] == batch
            for got, want in zip(r.shape[1:], t.dims):
                assert want == got or (want == -1 and canvas is not None), f"{model}.{t.name}: {list(r.shape)}"
            if t.name in names.FEATURES:
                stride = canvas[0] // r.shape[1]
                assert tuple(r.shape[1:3]) == (canvas[0] // stride, canvas[1] // stride) and stride in (4, 8, 16, 32)


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


def test_torch_target_needs_traces(small_traces, tmp_path):
    settings, paths = small_traces
    with pytest.raises(ValueError, match=r"needs TorchScript traces of the header and of the rpn at every canvas; "
                                         r"missing \['header', 'rpn_256x256', 'rpn_256x320', 'rpn_320x256', "
                                         r"'rpn_256x256_unmasked', 'rpn_256x320_unmasked', 'rpn_320x256_unmasked'\]"):
        write_repository(tmp_path, settings, {}, RepositoryOptions(target="torch"), link=True)
    partial = {k: v for k, v in paths.items() if k != canvas_key(320, 256)}
    with pytest.raises(ValueError, match=r"missing \['rpn_320x256'\]"):
        write_repository(tmp_path, settings, {}, RepositoryOptions(target="torch"), torch_models=partial, link=True)


# The command-line exports below check options, configs and files, not numbers: they trace the
# detector at the 64/96 resize (TINY), where each trace costs less

def test_cli_exports_the_torch_target(tmp_path):
    repo = tmp_path / "repo"
    rc = cli_main(["export", "--target", "torch", "--device", "cpu", "--min-size", "64", "--max-size", "96",
                   "--postprocess-instances", "3", "--repository", str(repo)])
    assert rc == 0
    assert (repo / names.HEADER / "1" / "model.pt").is_file()
    for model in (names.RPN, names.HEADER):
        params = read_config(repo / model / "config.pbtxt").parameters
        assert params["precision"].string_value == "fp32"
    # --canvases auto (the default): the rpn traced at each default canvas of this resize, with and
    # without extent masks (--unmasked-rpn, the default)
    assert sorted(p.name for p in (repo / names.RPN / "1").glob("model*.pt")) == [
        "model_64x64.pt", "model_64x64_unmasked.pt", "model_64x96.pt", "model_64x96_unmasked.pt",
        "model_96x64.pt", "model_96x64_unmasked.pt"]
    assert [g.count for g in read_config(repo / names.POSTPROCESS / "config.pbtxt").instance_group] == [3]
    assert [g.count for g in read_config(repo / names.RPN / "config.pbtxt").instance_group] == [1]


@pytest.mark.parametrize("arg, want", [("96x96", ((96, 96),)), ("96x64, 64x64", ((64, 64), (96, 64)))])
def test_cli_canvases(tmp_path, arg, want):
    repo = tmp_path / "repo"
    rc = cli_main(["export", "--target", "torch", "--device", "cpu", "--min-size", "64", "--max-size", "96",
                   "--canvases", arg, "--repository", str(repo)])
    assert rc == 0
    params = read_config(repo / names.RPN / "config.pbtxt").parameters
    assert DetectorSettings.from_parameters({k: v.string_value for k, v in params.items()}).canvases == want
    assert sorted(p.name for p in (repo / names.RPN / "1").glob("model*.pt")) == sorted(
        canvas_file(h, w, unmasked) for h, w in want for unmasked in (False, True))


@pytest.mark.parametrize("arg, error", [("320", "not HEIGHTxWIDTH"), ("300x320", "multiple of 32")])
def test_cli_rejects_bad_canvases(tmp_path, capsys, arg, error):
    with pytest.raises(SystemExit):
        cli_main(["export", "--target", "torch", "--device", "cpu", "--canvases", arg,
                  "--repository", str(tmp_path / "repo")])
    assert error in capsys.readouterr().err


def test_cli_torch_gpu_without_cuda_is_an_error(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here: the error path is for machines without it")
    rc = cli_main(["export", "--target", "torch", "--device", "gpu", "--repository", str(tmp_path / "repo")])
    assert rc == 2
    assert "no CUDA device" in capsys.readouterr().err


# --- a real server: the torch runner in the ensemble --------------------------------------------

@pytest.mark.triton
def test_torch_target_on_tritonserver_matches_torchvision(small_model, small_traces, tmp_path):
    pytest.importorskip("tritonclient.grpc")
    from client import detect
    from fasterrcnn.server import ServerError, TritonServer, free_port

    settings, paths = small_traces
    repo = tmp_path / "repo"
    options = RepositoryOptions(target="torch", max_batch_size=4, queue_delay_us=100_000)
    write_repository(repo, settings, {}, options, torch_models=paths, link=True)
    server = TritonServer(repo, grpc_port=free_port(), http_port=free_port(), metrics_port=free_port())
    try:
        server.start(timeout=240)
    except ServerError as e:
        pytest.fail(str(e))
    try:
        client = detect.connect(server.grpc_url)
        images = _images()
        refs = [torchvision_detect(small_model, image) for image in images]
        # together and one at a time: square, portrait and landscape, each request on its own canvas
        for concurrency in (3, 1):
            results = detect.infer_many(client, [encode(im) for im in images], concurrency=concurrency)
            for i, (ref, res) in enumerate(zip(refs, results)):
                assert not isinstance(res, Exception), res
                ours = from_packed(*(res.as_numpy(n) for n in (names.DETECTION_BOXES, names.DETECTION_SCORES,
                                                                names.DETECTION_LABELS, names.NUM_DETECTIONS)))
                assert_parity(ref, ours, f"torch target image {i} at concurrency {concurrency}")
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

def test_rpn_trace_has_no_host_synchronization(small_traces):
    """The rpn must be capturable as a CUDA graph (python_backend/torch_runtime.py): no op in the
    trace may read a tensor's value on the host (``int(tensor)``, ``.item()``, ``nonzero``).
    Seen on the H100: ``reshape(-1, n * base.shape[0], 4)`` traced as NumToTensor -> mul with a
    CUDA constant -> Int, a device-to-host read, and capture failed."""
    settings, paths = small_traces
    for canvas in settings.canvases:
        graph = str(torch.jit.load(str(paths[canvas_key(*canvas)])).inlined_graph)
        for op in ("aten::Int", "aten::item", "aten::nonzero", "prim::NumToTensor", "aten::ScalarImplicit"):
            assert op not in graph, f"{op} in the rpn trace of {canvas}"


def test_shared_buffers_hold_the_largest_tensors_once():
    """CUDA graphs share the buffers of their inputs and outputs (python_backend/torch_runtime.py
    SharedBuffers): each tensor is a view of its buffer, in its own shape, dtype and memory format,
    and a tensor larger than what was reserved is refused rather than written past the buffer."""
    from python_backend.torch_runtime import SharedBuffers

    bufs = SharedBuffers(torch.device("cpu"))
    big = (torch.arange(24, dtype=torch.float32).reshape(2, 3, 4), torch.ones(8, dtype=torch.float16))
    bufs.reserve(big)
    assert bufs.nbytes == 24 * 4 + 8 * 2
    small = (torch.full((1, 3, 4), 7.0), torch.arange(5, dtype=torch.float16))
    got = bufs.write(small)
    for g, s in zip(got, small):
        assert g.dtype == s.dtype and g.shape == s.shape and torch.equal(g, s)
    assert got[0].data_ptr() == bufs.buffers[0].data_ptr()  # a view of the buffer, not a new tensor
    again = bufs.write((torch.zeros(1, 3, 4), torch.zeros(5, dtype=torch.float16)))
    assert again[0].data_ptr() == got[0].data_ptr() and torch.equal(got[0], torch.zeros(1, 3, 4))
    bufs.reserve((torch.zeros(2, 3, 4), torch.zeros(2, dtype=torch.float16)))  # smaller: no new buffer
    assert bufs.buffers[0].data_ptr() == got[0].data_ptr()
    with pytest.raises(ValueError, match=r"does not fit its buffer of 96 bytes"):
        bufs.write((torch.zeros(3, 3, 4), torch.zeros(1, dtype=torch.float16)))
    with pytest.raises(ValueError, match="3 tensors, but buffers were reserved for 2"):
        bufs.write((torch.zeros(1), torch.zeros(1), torch.zeros(1)))
    nhwc = torch.arange(2 * 3 * 2 * 2, dtype=torch.float32).reshape(2, 3, 2, 2).contiguous(
        memory_format=torch.channels_last)
    (got,) = bufs.write((nhwc,))
    assert got.is_contiguous(memory_format=torch.channels_last) and torch.equal(got, nhwc)


def test_runtime_options_from_parameters():
    assert RuntimeOptions.from_parameters({}) == RuntimeOptions(False, False, False)
    assert RuntimeOptions.from_parameters({"channels_last": "true", "cuda_graphs": "False"}) == RuntimeOptions(True, False)
    assert RuntimeOptions.from_parameters({"optimize_for_inference": "yes"}) == RuntimeOptions(optimize_for_inference=True)
    with pytest.raises(ValueError, match="expected 1/0, true/false, yes/no or on/off, got 'maybe'"):
        RuntimeOptions.from_parameters({"cuda_graphs": "maybe"})
    with pytest.raises(ValueError, match="cuda_graphs needs a GPU"):
        TorchNetwork(__file__, torch.device("cpu"), [[3, 8, 8]], 4, RuntimeOptions(cuda_graphs=True))
    with pytest.raises(ValueError, match="optimize_for_inference is for GPU"):
        TorchNetwork(__file__, torch.device("cpu"), [[3, 8, 8]], 4, RuntimeOptions(optimize_for_inference=True))


def test_channels_last_rpn_equals_the_plain_trace(small_traces):
    """Same trace, channels-last weights and input: the same numbers up to convolution order."""
    settings, paths = small_traces
    args = _rpn_inputs(settings, 3)
    dims = [list(a.shape[1:]) for a in args]
    path = str(paths[canvas_key(*LANDSCAPE)])
    plain = TorchNetwork(path, torch.device("cpu"), dims, 4)
    nhwc = TorchNetwork(path, torch.device("cpu"), dims, 4, RuntimeOptions(channels_last=True))
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


# --- the rpn per canvas: each batch on its own canvas's trace ------------------------------------

def _canvas_networks(settings, paths, device="cpu", options=RuntimeOptions(), max_batch=4):
    return CanvasNetworks.load({c: paths[canvas_key(*c)] for c in settings.canvases}, torch.device(device),
                               max_batch, options)


def test_canvas_networks_run_each_batch_on_its_canvas_s_trace(small_model, small_traces):
    """A batch's (H, W) selects that canvas's trace; its outputs have that canvas's shapes (nothing
    cropped or padded) and are the eager network's; a size that is no canvas is an error."""
    settings, paths = small_traces
    nets = _canvas_networks(settings, paths)
    eager = RpnNetwork(small_model, settings).eval()
    for canvas in settings.canvases:
        args = _rpn_inputs(settings, 2, canvas=canvas)
        got = nets(args)
        with torch.no_grad():
            want = eager(*args)
        assert [tuple(m.shape[1:3]) for m in got[1:]] == [(canvas[0] // s, canvas[1] // s) for s in (4, 8, 16, 32)]
        assert got[0].shape == (2, settings.num_proposals, 6)
        assert_same_rpn_outputs(want, got, args[1], dict(rtol=1e-4, atol=1e-3))
    assert nets.calls == {c: 1 for c in settings.canvases}
    with pytest.raises(ValueError, match=r"images on a 320x320 canvas \(height x width\); this rpn is traced for "
                                         r"256x256, 256x320, 320x256"):
        nets([torch.zeros(1, 3, 320, 320), torch.tensor([[320.0, 320.0]])])


# --- the rpn without extent masks, for batches that fill their canvas -----------------------------

def test_fills_canvas_rounds_each_size_up_to_32():
    assert fills_canvas([[256.0, 320.0], [230.0, 300.0]], (256, 320))  # 230 -> 256, 300 -> 320
    assert not fills_canvas([[256.0, 320.0], [224.0, 320.0]], (256, 320))  # 224 stays 224
    assert not fills_canvas([[256.0, 288.0]], (256, 320))
    assert not fills_canvas(np.zeros((0, 2), np.float32), (256, 320))


def _masked_inputs(canvas, sizes, seed=0):
    """Noise images zero beyond each size (as preprocess pads) and their sizes."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(len(sizes), 3, *canvas, generator=g)
    for i, (h, w) in enumerate(sizes):
        x[i, :, h:] = 0
        x[i, :, :, w:] = 0
    return x, torch.tensor(sizes, dtype=torch.float32)


def test_unmasked_rpn_gives_the_same_bits_where_every_image_fills_its_canvas(small_model, small_export):
    """Without the extent masks the rpn is exact where each image's padded extent is the canvas
    (every mask is ones), and wrong where one is not (the masks matter there)."""
    settings, _ = small_export
    masked = RpnNetwork(small_model, settings).eval()
    unmasked = RpnNetwork(small_model, settings, extent_masks=False).eval()
    canvas = (256, 320)
    with torch.no_grad():
        args = _masked_inputs(canvas, [(256, 320), (230, 300)])
        assert fills_canvas(args[1], canvas)
        for a, b in zip(masked(*args), unmasked(*args)):
            assert torch.equal(a, b)
        args = _masked_inputs(canvas, [(256, 320), (200, 320)])  # the second pads to 224 rows, not 256
        assert not fills_canvas(args[1], canvas)
        want, got = masked(*args), unmasked(*args)
        assert torch.equal(want[1][0], got[1][0])  # the image that fills is unchanged
        assert not torch.equal(want[1][1, :200 // 4], got[1][1, :200 // 4])  # the other's own rows differ


def test_canvas_networks_run_the_unmasked_trace_for_batches_that_fill_their_canvas(small_traces):
    settings, paths = small_traces
    nets = CanvasNetworks.load({c: paths[canvas_key(*c)] for c in settings.canvases}, torch.device("cpu"), 4,
                               RuntimeOptions(), {c: paths[canvas_key(*c, unmasked=True)] for c in settings.canvases})
    canvas = (256, 320)
    filling = _masked_inputs(canvas, [(256, 320), (230, 300)])
    short = _masked_inputs(canvas, [(256, 320), (200, 320)])
    with torch.no_grad():
        for got, want in zip(nets(list(filling), filling[1].numpy()), nets.networks[canvas](list(filling))):
            assert torch.equal(got, want)  # the unmasked trace's bits are the masked trace's there
        assert nets.unmasked_calls == {canvas: 1}
        for got, want in zip(nets(list(short), short[1].numpy()), nets.networks[canvas](list(short))):
            assert torch.equal(got, want)  # the masked trace ran
        nets(list(filling))  # no sizes given: the masked trace
    assert nets.unmasked_calls == {canvas: 1} and nets.calls == {canvas: 3}
    with pytest.raises(ValueError, match=r"unmasked rpn traces for the canvases \[\(256, 320\)\], expected every canvas"):
        CanvasNetworks(nets.networks, {canvas: nets.unmasked[canvas]})


def test_unmasked_rpn_repository_and_runner(small_model, small_traces, tmp_path, monkeypatch):
    """``torch_unmasked_rpn``: the rpn folder holds both traces per canvas, the config says
    ``unmasked_rpn``, and the runner (model.py over triton_fake) answers a request that fills its
    canvas with the unmasked trace and one that does not with the masked, each as the eager network."""
    settings, paths = small_traces
    options = RepositoryOptions(target="torch", max_batch_size=4, torch_unmasked_rpn=True)
    repo = write_repository(tmp_path / "repo", settings, {}, options, torch_models=paths, link=True)
    cfg = read_config(repo / names.RPN / "config.pbtxt")
    assert cfg.parameters["unmasked_rpn"].string_value == "true"
    assert sorted(p.name for p in (repo / names.RPN / "1").glob("*.pt")) == sorted(
        [canvas_file(*c) for c in settings.canvases] + [canvas_file(*c, unmasked=True) for c in settings.canvases])
    with pytest.raises(ValueError, match="missing .*rpn_256x256_unmasked"):
        write_repository(tmp_path / "repo2", settings, {}, options,
                         torch_models={k: v for k, v in paths.items() if not k.endswith("_unmasked")}, link=True)
    instance = fake.load_model(repo / names.RPN / "1" / "model.py", monkeypatch)()
    instance.initialize(fake.model_args(cfg, kind="CPU", repository=repo / names.RPN))
    eager = RpnNetwork(small_model, settings).eval()
    canvas = (256, 320)
    for shape, unmasked_calls in (((230, 320), 1), ((200, 300), 1), ((400, 500), 2)):  # 230->256; 213->224; 256
        x, sizes, _ = preprocess_batch([textured_image(*shape, seed=7)], settings)
        assert tuple(x.shape[-2:]) == canvas
        (response,) = instance.execute([fake.Request(**{names.IMAGES: x, names.IMAGE_SIZES: sizes})])
        assert not response.has_error(), response.error().message()
        assert instance.net.unmasked_calls == {canvas: unmasked_calls}, shape
        with torch.no_grad():
            want = eager(torch.from_numpy(x), torch.from_numpy(sizes))
        got = [torch.from_numpy(response.output(n)) for n in (names.PROPOSALS, *names.FEATURES)]
        assert_same_rpn_outputs(want, got, torch.from_numpy(sizes), dict(rtol=1e-4, atol=1e-3))


def assert_same_rpn_outputs(want, got, image_sizes, tol):
    """Outputs of one batch on two canvases: each image's proposals of each level, and its map cells
    inside its padded extent.  Convolutions at another width sum in another order, so values agree
    to ``tol``, and random weights give near-tied objectness, so a few rows of a level may swap
    places in the top-k: nearly every row must be found (all but 1%, or one on a level of fewer
    than 100 rows), in the same number per level."""
    proposals_want, proposals_got = want[0], got[0]
    assert proposals_got.shape == proposals_want.shape
    for i in range(proposals_want.shape[0]):
        for level in range(5):
            a = proposals_want[i][proposals_want[i][:, 5] == level]
            b = proposals_got[i][proposals_got[i][:, 5] == level]
            assert b.shape == a.shape, f"image {i} level {level}: {b.shape[0]} proposals, want {a.shape[0]}"
            lost = int((~torch.isclose(b[:, None, :], a[None, :, :], **tol).all(-1).any(1)).sum())
            assert lost <= max(1, len(a) // 100), f"image {i} level {level}: {lost} of {len(a)} proposals not found"
    for name, stride, a, b in zip(names.FEATURES, (4, 8, 16, 32), want[1:], got[1:]):
        assert b.shape == a.shape and b.dtype == a.dtype, name
        for i, (h, w) in enumerate(image_sizes.tolist()):
            eh, ew = -(-int(h) // 32) * 32 // stride, -(-int(w) // 32) * 32 // stride
            torch.testing.assert_close(b[i, :eh, :ew], a[i, :eh, :ew], **tol, msg=lambda m: f"{name} image {i}: {m}")


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_canvas_networks_with_graphs_equal_eager_calls(small_model, small_export, tmp_path, precision):
    """As served on the GPU (graphs in one shared pool; fp16: channels last and the fused
    convolutions): the largest canvas is captured first, every canvas's graphs share its pool, and
    each batch's replay gives what its canvas's trace gives eagerly."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    settings, _ = small_export
    paths = torch_export.export_torch(small_model, settings, tmp_path, device="gpu", precision=precision)
    fp16 = precision == "fp16"
    options = RuntimeOptions(channels_last=fp16, cuda_graphs=True, optimize_for_inference=fp16)
    tol = dict(rtol=1e-2, atol=5e-2) if fp16 else dict(rtol=1e-4, atol=1e-3)
    with torch_export._tf32_off():
        nets = _canvas_networks(settings, paths, "cuda", options, max_batch=3)
        order = []
        for canvas, net in nets.networks.items():  # record the order of the warm-ups
            net.warm_up = (lambda warm: lambda memory=None, c=canvas: (order.append(c), warm(memory=memory)))(net.warm_up)
        nets.warm_up()
        assert order[0] in ((256, 320), (320, 256)) and sorted(order) == sorted(settings.canvases)  # largest first
        memories = {id(net._memory) for net in nets.networks.values()}
        assert len(memories) == 1 and all(sorted(net._graphs) == [1, 2, 3] for net in nets.networks.values())
        # one input and one output buffer per position, shared: every graph's tensors are views of them
        memory = next(iter(nets.networks.values()))._memory
        for net in nets.networks.values():
            for _, static_in, static_out in net._graphs.values():
                for bufs, tensors in ((memory.inputs.buffers, static_in), (memory.outputs.buffers, static_out)):
                    assert [t.untyped_storage().data_ptr() for t in tensors] == [b.data_ptr() for b in bufs]
        same = RuntimeOptions(channels_last=fp16, optimize_for_inference=fp16)
        plain = _canvas_networks(settings, paths, "cuda", same, max_batch=3)  # the same modules, without graphs
        for canvas in settings.canvases:
            for batch in (1, 3):
                args = _rpn_inputs(settings, batch, "cuda", canvas)
                assert_same_rpn_outputs(plain(args), nets(args), args[1], tol)
    assert nets.calls == {c: 2 for c in settings.canvases}


@pytest.mark.gpu
def test_unmasked_fp16_rpn_with_graphs_as_served(small_model, small_export, tmp_path):
    """The fp16 rpn as served on the GPU with unmasked traces: both traces of every canvas capture
    their graphs in one shared memory, and a batch that fills its canvas replays the unmasked
    graph, giving what the masked trace gives eagerly (to the fp16 graphs' tolerance)."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    settings, _ = small_export
    paths = torch_export.export_torch(small_model, settings, tmp_path, device="gpu", precision="fp16", unmasked=True)
    options = RuntimeOptions(channels_last=True, cuda_graphs=True, optimize_for_inference=True)
    canvases = settings.canvases
    with torch_export._tf32_off():
        nets = CanvasNetworks.load({c: paths[canvas_key(*c)] for c in canvases}, torch.device("cuda"), 3, options,
                                   {c: paths[canvas_key(*c, unmasked=True)] for c in canvases})
        nets.warm_up()
        all_nets = [*nets.networks.values(), *nets.unmasked.values()]
        assert len({id(n._memory) for n in all_nets}) == 1 and all(sorted(n._graphs) == [1, 2, 3] for n in all_nets)
        plain = _canvas_networks(settings, paths, "cuda", RuntimeOptions(channels_last=True,
                                                                          optimize_for_inference=True), max_batch=3)
        canvas = (256, 320)
        x, sizes = (t.cuda() for t in _masked_inputs(canvas, [(256, 320), (230, 300), (250, 320)]))
        assert_same_rpn_outputs(plain([x, sizes]), nets([x, sizes], sizes.cpu().numpy()), sizes,
                                dict(rtol=1e-2, atol=5e-2))
    assert nets.unmasked_calls == {canvas: 1}


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_cuda_graph_rpn_equals_eager_calls(small_model, small_export, tmp_path, precision):
    """The runner's graphs (one per batch size, 1..4, in shared memory) give what the trace gives
    eagerly, for every batch size and in any order, and the outputs the runner returns survive
    the next replay."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    settings, _ = small_export
    dev = torch.device("cuda")
    paths = torch_export.export_torch(small_model, settings, tmp_path, device="gpu", precision=precision)
    dims = [[3, *LANDSCAPE], [2]]
    options = RuntimeOptions(channels_last=True, cuda_graphs=True)
    graphed = TorchNetwork(str(paths[canvas_key(*LANDSCAPE)]), dev, dims, 4, options)
    graphed.warm_up()
    eager = TorchNetwork(str(paths[canvas_key(*LANDSCAPE)]), dev, dims, 4, RuntimeOptions(channels_last=True))
    assert sorted(graphed._graphs) == [1, 2, 3, 4]
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
def test_warmed_header_serves_any_roi_count_without_growing(small_model, small_export, tmp_path):
    """After warm_up, header calls of any RoI count up to the largest reuse the cached blocks: the
    process's reserved GPU memory stays within a few small-block segments of where warm_up left it
    (without the warm-up's last, largest call, the soak's header step grew in steps: docs/benchmarks.md,
    "Soak memory").  Control: the same calls after dropping the cache grow it by more than that slack."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    settings, _ = small_export
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
def test_optimized_fp16_rpn_is_as_close_to_fp32_as_the_plain_fp16(small_model, small_export, tmp_path):
    """optimize_for_inference (cuDNN's fused convolution + bias + ReLU, in a CUDA graph) against the
    fp32 trace of the same weights, next to the plain fp16 trace: its FPN maps and proposals must
    be no further from fp32 than the plain fp16 ones.  (Fused, a convolution's output is rounded to
    float16 once instead of after each of conv, bias and ReLU; with random weights, objectness
    near-ties let either fp16 path swap a few top-k rows, so proposals are compared as fractions.)"""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    settings, _ = small_export
    dev = torch.device("cuda")
    dims = [[3, *LANDSCAPE], [2]]
    key = canvas_key(*LANDSCAPE)
    p16 = torch_export.export_torch(small_model, settings, tmp_path / "fp16", device="gpu", precision="fp16")
    p32 = torch_export.export_torch(small_model, settings, tmp_path / "fp32", device="gpu", precision="fp32")
    fused = TorchNetwork(str(p16[key]), dev, dims, 3, RuntimeOptions(True, True, True))
    fused.warm_up()
    assert "aten::cudnn_convolution_relu" in str(fused.module.inlined_graph)  # the fusion happened
    plain = TorchNetwork(str(p16[key]), dev, dims, 3, RuntimeOptions(channels_last=True))
    ref = TorchNetwork(str(p32[key]), dev, dims, 3)
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
@pytest.mark.parametrize("shapes, canvas", [
    ([(512, 512)], None),  # square: 256x256
    ([(300, 400), (12, 20), (256, 320)], None),  # landscape: 256x320
    ([(400, 240), (1000, 333)], None),  # portrait: 320x256
    ([(300, 400), (400, 240)], (320, 320)),  # a canvas given outright
])
def test_gpu_preprocess_equals_torchvision_on_the_gpu(small_export, shapes, canvas):
    """The GPU preprocess gives the pixels torchvision's transform computes on CUDA, bit for bit
    (python_backend/torch_image.py), and the NumPy reference's within 1e-5 (the kernels round
    differently); sizes exactly."""
    cp = _cupy_or_skip()
    from python_backend.cuda.image import preprocess_batch as gpu_preprocess_batch

    settings, _ = small_export
    images = [textured_image(h, w, seed=i) for i, (h, w) in enumerate(shapes)]
    want = preprocess_batch(images, settings, canvas)
    got = gpu_preprocess_batch(images, settings, canvas)
    assert all(isinstance(b, cp.ndarray) for b in got)
    np.testing.assert_array_equal(cp.asnumpy(got[1]), want[1])
    np.testing.assert_array_equal(cp.asnumpy(got[2]), want[2])
    np.testing.assert_allclose(cp.asnumpy(got[0]), want[0], rtol=0, atol=1e-5)
    transform = GeneralizedRCNNTransform(settings.min_size, settings.max_size, list(settings.image_mean),
                                         list(settings.image_std)).eval()
    with torch.no_grad():
        tv, _ = transform([torch.from_numpy(im).cuda().permute(2, 0, 1).float() / 255 for im in images])
    for i, (h, w) in enumerate(tv.image_sizes):
        np.testing.assert_array_equal(cp.asnumpy(got[0][i, :, :h, :w]), tv.tensors[i, :, :h, :w].cpu().numpy())


@pytest.mark.gpu
def test_gpu_preprocess_rejects_what_no_canvas_holds(small_export):
    import dataclasses

    _cupy_or_skip()
    from python_backend.cuda.image import preprocess_batch as gpu_preprocess_batch
    from python_backend.reference.image import BadImageError

    settings, _ = small_export
    landscape_only = dataclasses.replace(settings, canvases=((256, 320),))
    with pytest.raises(BadImageError, match=r"image of 400x240 pixels \(height x width\) resizes to 320x192 and "
                                            r"pads to 320x192: none of the canvases 256x320 holds it"):
        gpu_preprocess_batch([textured_image(400, 240, seed=0)], landscape_only)
    with pytest.raises(BadImageError, match="each fits a canvas alone"):
        gpu_preprocess_batch([textured_image(400, 240, seed=0), textured_image(240, 400, seed=1)], settings)


@pytest.mark.gpu
def test_gpu_path_matches_torchvision_on_a_flat_logo(tmp_path):
    """The torch target in fp32 as served (the traced rpn with CUDA graphs, CuPy roi and postprocess
    steps, the traced header) against torchvision on the same GPU with TF32 off, on an image whose
    scores come in near-ties (evaluation.payloads.flat_logo) at torchvision's default sizes, where
    the served path once matched 90 of 100 detections (a preprocess that rounded otherwise than
    torchvision's CUDA resize; python_backend/torch_image.py)."""
    cp = _cupy_or_skip()
    from exporters.loading import random_model, read_class_names, settings_from_model
    from evaluation.payloads import flat_logo
    from python_backend.backends import get_backend

    model = random_model(num_classes=91, seed=0)
    image = flat_logo()
    settings = settings_from_model(model, canvases=((800, 1088),), class_names=read_class_names(None, 91))
    paths = torch_export.export_torch(model, settings, tmp_path, device="gpu", precision="fp32")
    gpu = get_backend("gpu")
    with torch_export._tf32_off():
        ref = torchvision_detect(model.cuda().eval(), image)
        rpn = _canvas_networks(settings, paths, "cuda", RuntimeOptions(cuda_graphs=True), max_batch=1)
        rpn.warm_up()
        header = TorchNetwork(str(paths[names.HEADER]), torch.device("cuda"),
                              [[settings.roi_output_size, settings.roi_output_size, settings.fpn_channels], [4]], 0)
        x, sizes, originals = gpu.preprocess_batch([image], settings)
        proposals, *maps = rpn([torch.from_dlpack(x), torch.from_dlpack(sizes)])
        batch = gpu.roi_step(cp.from_dlpack(proposals), [cp.from_dlpack(m) for m in maps], sizes, settings)
        scores, boxes = header([torch.from_dlpack(batch.features), torch.from_dlpack(batch.rois)])
        torch.cuda.synchronize()
        packed = gpu.postprocess_batch(cp.from_dlpack(scores), cp.from_dlpack(boxes), gpu.to_host(batch.counts),
                                       sizes, originals, settings)
    assert len(ref.scores) >= 50
    assert_parity(ref, from_packed(*(cp.asnumpy(p[0]) for p in packed)), "flat logo on the GPU path")


@pytest.mark.parametrize("flag, unmasked", [("--unmasked-rpn", True), ("--no-unmasked-rpn", False)])
def test_cli_unmasked_rpn_writes_both_traces_per_canvas(tmp_path, flag, unmasked):
    out = tmp_path / "repo"
    assert cli_main(["export", "--target", "torch", flag, "--canvases", "64x64,64x96",
                     "--min-size", "64", "--max-size", "96", "--num-classes", "5", "--repository", str(out)]) == 0
    assert read_config(out / names.RPN / "config.pbtxt").parameters["unmasked_rpn"].string_value == str(unmasked).lower()
    assert sorted(p.name for p in (out / names.RPN / "1").glob("*.pt")) == (
        ["model_64x64.pt", "model_64x64_unmasked.pt", "model_64x96.pt", "model_64x96_unmasked.pt"] if unmasked
        else ["model_64x64.pt", "model_64x96.pt"])


def test_tf32_torch_target_serves_float32_traces_with_tf32_on(tmp_path):
    """--precision tf32 for the torch target: the traces are fp32's (TF32 is a run-time switch, not
    part of a trace) and the configs say tf32, which the runner reads to turn TF32 on."""
    out = tmp_path / "repo"
    assert cli_main(["export", "--target", "torch", "--precision", "tf32", "--canvases", "64x64",
                     "--min-size", "64", "--max-size", "96", "--num-classes", "5", "--repository", str(out)]) == 0
    for model in (names.RPN, names.HEADER):
        params = {k: v.string_value for k, v in read_config(out / model / "config.pbtxt").parameters.items()}
        assert params["precision"] == "tf32"
    rpn = torch.jit.load(str(out / names.RPN / "1" / "model_64x64.pt"))
    assert {p.dtype for p in rpn.parameters()} == {torch.float32}
    assert params.get("channels_last") is None  # the header's; the rpn keeps fp32's NCHW
    rpn_params = {k: v.string_value for k, v in read_config(out / names.RPN / "config.pbtxt").parameters.items()}
    assert rpn_params["channels_last"] == "false" and rpn_params["optimize_for_inference"] == "false"

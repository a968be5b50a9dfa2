"""Every config.pbtxt parses with model_config_pb2 and agrees with the ONNX I/O and the ensemble maps."""
from __future__ import annotations

import errno
import os

import onnx
import pytest
from tritonclient.grpc import model_config_pb2 as mc

from exporters.repository import RepositoryOptions, postprocess_count, read_config, rpn_count, write_repository
from python_backend import names

ONNX_TYPES = {onnx.TensorProto.FLOAT: mc.TYPE_FP32, onnx.TensorProto.INT32: mc.TYPE_INT32}


def _onnx_dims(value) -> list[int]:
    """An ONNX input's or output's dims as a Triton config writes them: -1 where dynamic."""
    return [d.dim_value if d.HasField("dim_value") else -1 for d in value.type.tensor_type.shape.dim]


@pytest.fixture(scope="module")
def repo(small_export, tmp_path_factory):
    settings, paths = small_export
    out = tmp_path_factory.mktemp("repo")
    write_repository(out, settings, paths, RepositoryOptions(target="python", max_batch_size=4), link=True)
    return out, settings, paths


def _configs(out):
    return {p.parent.name: read_config(p) for p in sorted(out.glob("*/config.pbtxt"))}


def test_every_model_has_a_config_and_version(repo):
    out, _, _ = repo
    cfgs = _configs(out)
    expected = {names.ENSEMBLE, names.ENSEMBLE_RAW, names.PREPROCESS_RAW, *names.STEPS}
    assert set(cfgs) == expected
    for name, cfg in cfgs.items():
        assert cfg.name == name
        assert (out / name / "1").is_dir()
        if cfg.backend == "python":
            assert (out / name / "1" / "model.py").is_file()


@pytest.mark.parametrize("model", [names.RPN, names.HEADER])
def test_network_configs_match_onnx_io(repo, model):
    out, _, paths = repo
    cfg = _configs(out)[model]
    graph = onnx.load(str(out / model / "1" / "model.onnx")).graph
    for proto_list, values in ((cfg.input, graph.input), (cfg.output, graph.output)):
        assert [t.name for t in proto_list] == [v.name for v in values]
        for t, v in zip(proto_list, values):
            dims = _onnx_dims(v)
            assert dims[0] == -1 and list(t.dims) == dims[1:], f"{model}.{t.name}: config {list(t.dims)}, ONNX {dims}"
            assert t.data_type == ONNX_TYPES[v.type.tensor_type.elem_type]
    assert cfg.max_batch_size >= 4


def test_canvas_dims_are_dynamic_where_the_canvas_is(repo):
    """Images and FPN maps have the canvas's height and width (-1: one of the settings' canvases per
    batch) at every step that carries them; the proposals per image are one constant."""
    out, settings, _ = repo
    cfgs = _configs(out)
    dims = lambda model, kind: {t.name: list(t.dims) for t in getattr(cfgs[model], kind)}  # noqa: E731
    maps = {name: [-1, -1, settings.fpn_channels] for name in names.FEATURES}
    assert dims(names.RPN, "input")[names.IMAGES] == [3, -1, -1]
    assert dims(names.RPN, "output") == {names.PROPOSALS: [settings.num_proposals, 6], **maps}
    for pre in (names.PREPROCESS, names.PREPROCESS_RAW):
        assert dims(pre, "output")[names.IMAGES] == [3, -1, -1]
    assert {n: d for n, d in dims(names.ROI, "input").items() if n in maps} == maps
    params = {k: v.string_value for k, v in cfgs[names.ENSEMBLE].parameters.items()}
    assert params["canvases"] == "256x256,256x320,320x256"


def test_encoded_image_input_is_uint8_bytes(repo):
    """``fasterrcnn`` and its preprocess take the encoded file as UINT8 [-1] (one image per request),
    not TYPE_STRING, which the python backend's stub garbles under numpy 2."""
    out, _, _ = repo
    cfgs = _configs(out)
    for model in (names.ENSEMBLE, names.PREPROCESS):
        (image,) = cfgs[model].input
        assert (image.name, image.data_type, list(image.dims)) == (names.IMAGE_BYTES, mc.TYPE_UINT8, [-1]), model
    (raw,) = cfgs[names.ENSEMBLE_RAW].input
    assert (raw.name, raw.data_type, list(raw.dims)) == (names.IMAGE_RAW, mc.TYPE_UINT8, [-1, -1, 3])


def test_header_batch_holds_every_roi_of_a_full_batch(repo):
    out, settings, _ = repo
    cfg = _configs(out)
    assert cfg[names.HEADER].max_batch_size == 4 * settings.rpn_post_nms_top_n
    assert all(cfg[n].max_batch_size >= cfg[names.ENSEMBLE].max_batch_size
               for n in (names.PREPROCESS, names.RPN, names.ROI, names.HEADER))


@pytest.mark.parametrize("ensemble", [names.ENSEMBLE, names.ENSEMBLE_RAW])
def test_ensemble_maps_agree_with_step_configs(repo, ensemble):
    out, _, _ = repo
    cfgs = _configs(out)
    ens = cfgs[ensemble]
    assert ens.platform == "ensemble"
    produced = {t.name: (t.data_type, "ensemble input") for t in ens.input}
    for step in ens.ensemble_scheduling.step:
        cfg = cfgs[step.model_name]
        inputs = {t.name: t for t in cfg.input}
        outputs = {t.name: t for t in cfg.output}
        assert set(step.input_map) == set(inputs), f"{step.model_name}: every input mapped"
        for model_tensor, ens_tensor in step.input_map.items():
            assert ens_tensor in produced, f"{step.model_name}.{model_tensor} reads {ens_tensor!r}, which nothing produced yet"
            assert produced[ens_tensor][0] == inputs[model_tensor].data_type, f"{ens_tensor} dtype"
        for model_tensor, ens_tensor in step.output_map.items():
            assert model_tensor in outputs, f"{step.model_name} has no output {model_tensor!r}"
            produced[ens_tensor] = (outputs[model_tensor].data_type, step.model_name)
    for t in ens.output:
        assert t.name in produced, f"ensemble output {t.name!r} is produced by no step"
        assert produced[t.name][0] == t.data_type


def test_step_parameters_carry_the_model_settings(repo):
    from python_backend.settings import DetectorSettings

    out, settings, _ = repo
    for name in (names.PREPROCESS, names.ROI, names.POSTPROCESS):
        cfg = _configs(out)[name]
        params = {k: v.string_value for k, v in cfg.parameters.items()}
        assert DetectorSettings.from_parameters(params) == settings


def test_repository_errors_are_clear(small_export, tmp_path):
    settings, paths = small_export
    with pytest.raises(ValueError, match="target must be one of"):
        RepositoryOptions(target="tflite")
    with pytest.raises(ValueError, match="needs engines"):
        write_repository(tmp_path / "r", settings, paths, RepositoryOptions(target="tensorrt"), link=True)
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(OSError, match="cannot write the model repository"):
        write_repository(blocker / "repo", settings, paths, RepositoryOptions(), link=True)


def test_repository_copies_its_networks_unless_asked_to_link(small_export, tmp_path, monkeypatch):
    """By default a repository holds its own copy of each network, so a later export into the same
    work folder cannot change it; ``link=True`` hard-links them (the tests' many repositories of one
    export), and copies where the file system refuses the link."""
    settings, paths = small_export
    copied = write_repository(tmp_path / "copied", settings, paths, RepositoryOptions())
    linked = write_repository(tmp_path / "linked", settings, paths, RepositoryOptions(), link=True)

    def refuse(src, dst):
        raise OSError(errno.EXDEV, "Invalid cross-device link", str(src))

    monkeypatch.setattr(os, "link", refuse)
    fallback = write_repository(tmp_path / "fallback", settings, paths, RepositoryOptions(), link=True)
    for name in (names.RPN, names.HEADER):
        source = paths[name]
        for repo in (copied, fallback):
            placed = repo / name / "1" / "model.onnx"
            assert placed.read_bytes() == source.read_bytes() and not placed.samefile(source), (repo.name, name)
        assert (linked / name / "1" / "model.onnx").samefile(source), name


@pytest.mark.parametrize("device, instances, postprocess, want", [
    ("cpu", 1, 0, 1), ("cpu", 2, 0, 2), ("cpu", 1, 3, 3), ("gpu", 1, 0, 2), ("gpu", 3, 0, 4), ("gpu", 1, 1, 1)])
def test_postprocess_instances(small_export, tmp_path, device, instances, postprocess, want):
    """postprocess (no batcher) gets its own instance count (0: one more than the rpn's on the GPU,
    else ``instances``); every other step keeps ``instances``."""
    settings, paths = small_export
    write_repository(tmp_path, settings, paths, RepositoryOptions(device=device, instances=instances,
                                                                  postprocess_instances=postprocess), link=True)
    counts = {name: [g.count for g in cfg.instance_group] for name, cfg in _configs(tmp_path).items()
              if name not in (names.ENSEMBLE, names.ENSEMBLE_RAW)}
    assert counts.pop(names.POSTPROCESS) == [want]
    assert counts and all(c == [instances] for c in counts.values()), counts


@pytest.mark.parametrize("device, decoder, want", [("gpu", "gpu", "gpu"), ("gpu", "pillow", "pillow"),
                                                   ("cpu", "gpu", "pillow")])
def test_jpeg_decoder_parameter(small_export, tmp_path, device, decoder, want):
    """preprocess's jpeg_decoder: nvJPEG only where its instances are on a GPU; preprocess_raw
    decodes nothing and has none."""
    settings, paths = small_export
    write_repository(tmp_path, settings, paths, RepositoryOptions(device=device, jpeg_decoder=decoder), link=True)
    cfgs = _configs(tmp_path)
    assert cfgs[names.PREPROCESS].parameters["jpeg_decoder"].string_value == want
    assert "jpeg_decoder" not in cfgs[names.PREPROCESS_RAW].parameters
    with pytest.raises(ValueError, match="jpeg_decoder must be one of"):
        RepositoryOptions(jpeg_decoder="nvdec")


@pytest.mark.parametrize("target", ["python", "onnxruntime"])
@pytest.mark.parametrize("instances, rpn, want", [(1, 0, 1), (2, 0, 2), (1, 2, 2), (3, 1, 1)])
def test_rpn_instances(small_export, tmp_path, target, instances, rpn, want):
    """The rpn gets its own instance count (0: ``instances``); every other batching step keeps
    ``instances``, for a python-backend rpn and an engine's alike."""
    settings, paths = small_export
    write_repository(tmp_path, settings, paths, RepositoryOptions(target=target, device="gpu", instances=instances,
                                                                  rpn_instances=rpn, postprocess_instances=5),
                     link=True)
    counts = {name: [g.count for g in cfg.instance_group] for name, cfg in _configs(tmp_path).items()
              if name not in (names.ENSEMBLE, names.ENSEMBLE_RAW)}
    assert counts.pop(names.RPN) == [want] and counts.pop(names.POSTPROCESS) == [5]
    assert counts and all(c == [instances] for c in counts.values()), counts


@pytest.mark.parametrize("target, precision, device, instances, rpn, want_rpn, want_postprocess", [
    ("torch", "fp16", "gpu", 1, 0, 2, 3),  # the automatic counts of the one measured case
    ("torch", "fp16", "gpu", 3, 0, 3, 4), ("torch", "fp16", "gpu", 1, 1, 1, 2), ("torch", "fp16", "cpu", 1, 0, 1, 1),
    ("torch", "fp32", "gpu", 1, 0, 1, 2), ("torch", "tf32", "gpu", 1, 0, 1, 2), ("tensorrt", "fp32", "gpu", 1, 0, 1, 2)])
def test_automatic_instance_counts(target, precision, device, instances, rpn, want_rpn, want_postprocess):
    """0 is automatic: two rpn instances for the torch target's fp16 rpn on the GPU (one saturates
    under load; fp32's second would not fit 20 GiB), else ``instances``; on the GPU postprocess
    gets one more than the rpn."""
    options = RepositoryOptions(target=target, device=device, instances=instances, rpn_instances=rpn,
                                torch_precision=precision)
    assert (rpn_count(options), postprocess_count(options)) == (want_rpn, want_postprocess)


def test_instance_counts_are_checked():
    with pytest.raises(ValueError, match="instances must be >= 1, postprocess_instances and rpn_instances >= 0"):
        RepositoryOptions(postprocess_instances=-1)
    with pytest.raises(ValueError, match="got 1, 0 and -1"):
        RepositoryOptions(rpn_instances=-1)
    with pytest.raises(ValueError, match="instances must be >= 1"):
        RepositoryOptions(instances=0)


# --- instance groups over several GPUs ----------------------------------------------------------

GPU_STEPS = (names.PREPROCESS, names.PREPROCESS_RAW, names.RPN, names.ROI, names.HEADER, names.POSTPROCESS)


@pytest.mark.parametrize("gpus", [(0, 1), (1, 3)])
def test_gpu_instances_are_placed_on_the_chosen_gpus(small_export, tmp_path, gpus):
    """With gpus, every step's KIND_GPU group lists them, with ``count`` instances on each GPU
    (Triton's rule for a group with a gpus list); the ensembles have no instances."""
    settings, paths = small_export
    write_repository(tmp_path, settings, paths, RepositoryOptions(device="gpu", instances=2, gpus=gpus), link=True)
    cfgs = _configs(tmp_path)
    for name in GPU_STEPS:
        (group,) = cfgs[name].instance_group
        assert group.kind == mc.ModelInstanceGroup.KIND_GPU, name
        assert list(group.gpus) == list(gpus), name
        assert group.count == (3 if name == names.POSTPROCESS else 2), name  # postprocess: one more than the rpn
    assert not cfgs[names.ENSEMBLE].instance_group and not cfgs[names.ENSEMBLE_RAW].instance_group


def test_without_gpus_triton_places_instances_on_every_gpu(small_export, tmp_path):
    settings, paths = small_export
    write_repository(tmp_path, settings, paths, RepositoryOptions(device="gpu"), link=True)
    for name in GPU_STEPS:
        (group,) = _configs(tmp_path)[name].instance_group
        assert group.kind == mc.ModelInstanceGroup.KIND_GPU and not group.gpus, name


def test_network_gpus_for_the_platform_targets(small_export):
    """tensorrt and onnxruntime networks are KIND_GPU whatever --device says, so they take the gpus
    list too; with --device cpu the python steps stay KIND_CPU without one."""
    from exporters.repository import all_configs

    settings, _ = small_export
    cfgs = all_configs(settings, RepositoryOptions(target="tensorrt", device="cpu", gpus=(0, 1)))
    for name in (names.RPN, names.HEADER):
        (group,) = cfgs[name].instance_group
        assert group.kind == mc.ModelInstanceGroup.KIND_GPU and list(group.gpus) == [0, 1]
    for name in (names.PREPROCESS, names.ROI, names.POSTPROCESS):
        (group,) = cfgs[name].instance_group
        assert group.kind == mc.ModelInstanceGroup.KIND_CPU and not group.gpus


@pytest.mark.parametrize("kw, message", [
    (dict(device="gpu", gpus=(0, 0)), "gpus must be distinct GPU ids >= 0, got \\(0, 0\\)"),
    (dict(device="gpu", gpus=(-1,)), "gpus must be distinct GPU ids >= 0"),
    (dict(device="cpu", gpus=(0,)), "every step runs on the CPU"),
])
def test_bad_gpus_are_rejected(kw, message):
    with pytest.raises(ValueError, match=message):
        RepositoryOptions(**kw)

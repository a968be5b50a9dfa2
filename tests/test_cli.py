"""The fasterrcnn command: options from flags and from Docker's variables, export, errors, help,
the console scripts, the demo's closing statement and the launcher's arguments."""
from __future__ import annotations

import argparse
import importlib.metadata
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from exporters.loading import CheckpointError, checkpoint_model, random_model
from exporters.repository import read_config
from exporters.tensorrt.gpus import GpuInfo
from fasterrcnn.__main__ import build_parser, main
from fasterrcnn.options import HelpFormatter, Options, OptionsError
from python_backend import names

ROOT = Path(__file__).resolve().parent.parent
SMALL = ["--min-size", "224", "--max-size", "320"]  # default canvases of this resize: 224x224, 224x320, 320x224

_ONNX_EXPORTS: dict[str, dict[str, Path]] = {}


@pytest.fixture(autouse=True)
def onnx_export_once_per_model(monkeypatch, tmp_path_factory):
    """The export tests here differ in their options, mostly not in their model (random weights, 3
    classes): each distinct model and settings is exported to ONNX once (the real export, checked
    TensorRT-ready), and a later export of the same gets copies of those files."""
    import hashlib
    import shutil

    from exporters import onnx_export

    real = onnx_export.export_all

    def export_all(model, settings, out_dir):
        h = hashlib.sha256(repr(settings).encode())
        for k, v in model.state_dict().items():
            h.update(k.encode())
            h.update(v.detach().cpu().numpy().tobytes())
        key = h.hexdigest()
        if key not in _ONNX_EXPORTS:
            _ONNX_EXPORTS[key] = real(model, settings, tmp_path_factory.mktemp("onnx_once"))
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        return {name: Path(shutil.copy(path, Path(out_dir) / path.name)) for name, path in _ONNX_EXPORTS[key].items()}

    monkeypatch.setattr(onnx_export, "export_all", export_all)
DIST = "fasterrcnn-triton"


def test_export_writes_the_repository(tmp_path, small_model, caplog):
    ckpt = tmp_path / "model.pt"
    torch.save(small_model.state_dict(), ckpt)
    repo = tmp_path / "repo"
    caplog.set_level("INFO")
    assert main(["export", "--weights", str(ckpt), "--repository", str(repo), *SMALL]) == 0
    for name in (names.ENSEMBLE, *names.STEPS):
        assert (repo / name / "config.pbtxt").is_file()
    assert (repo / names.RPN / "1" / "model.onnx").is_file()
    assert "[3/3]" in caplog.text  # progress shown


def test_checkpoint_class_count_comes_from_the_checkpoint(tmp_path):
    ckpt = tmp_path / "seven.pt"
    torch.save(random_model(num_classes=7, seed=1).state_dict(), ckpt)
    assert checkpoint_model(ckpt).roi_heads.box_predictor.cls_score.out_features == 7


def test_bad_checkpoint_wrong_keys(tmp_path, capsys):
    ckpt = tmp_path / "bad.pt"
    torch.save({"conv.weight": torch.zeros(3, 3)}, ckpt)
    assert main(["export", "--weights", str(ckpt), "--repository", str(tmp_path / "r"), *SMALL]) == 2
    err = capsys.readouterr().err
    assert "looks like a model that is not a Faster R-CNN (top-level modules ['conv'])" in err
    assert err.count("\n") == 1 and "fasterrcnn_resnet50_fpn" in err  # one sentence naming what is expected


def test_bad_checkpoint_wrong_class_count(tmp_path):
    state = random_model(num_classes=5).state_dict()
    state["roi_heads.box_predictor.bbox_pred.weight"] = torch.zeros(4 * 9, 1024)
    ckpt = tmp_path / "mismatch.pt"
    torch.save(state, ckpt)
    with pytest.raises(CheckpointError, match=r"bbox_pred has 36 outputs, expected 4 x 5 classes"):
        checkpoint_model(ckpt)


def test_bad_checkpoint_extra_keys(tmp_path):
    state = random_model(num_classes=5).state_dict()
    state["roi_heads.mask_head.weight"] = torch.zeros(1)
    ckpt = tmp_path / "extra.pt"
    torch.save(state, ckpt)
    with pytest.raises(CheckpointError, match="looks like a Mask or Keypoint R-CNN"):
        checkpoint_model(ckpt)


def test_not_a_checkpoint(tmp_path):
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a zip or pickle")
    with pytest.raises(CheckpointError, match="is a text file, not a PyTorch checkpoint"):
        checkpoint_model(junk)
    with pytest.raises(CheckpointError, match="does not exist"):
        checkpoint_model(tmp_path / "missing.pt")


def test_unwritable_output(tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    assert main(["export", "--repository", str(blocker / "repo"), "--num-classes", "3", *SMALL]) == 2
    assert "cannot write the model repository" in capsys.readouterr().err


@pytest.mark.parametrize("args, message", [
    (["--canvases", "800x1000"], "multiple of 32"), (["--canvases", "800x800,32x64"], "at least 64"),
    (["--canvases", "big"], "HEIGHTxWIDTH"), (["--gpus", "0,0"], "distinct GPU ids"),
    (["--gpus", "first"], "'all' or GPU ids"),
    (["--precision", "fp16"], "--precision fp16 does not apply to --target python: choose one of fp32"),
    (["--target", "onnxruntime-trt", "--precision", "tf32"], "choose one of fp32, fp16"),
    (["--gpus", "0,1"], "with device 'cpu' and target 'python' every step runs on the CPU"),
    (["--peaky", "50"], "unrecognized arguments: --peaky"),  # a test knob, not a product option
    (["--jpeg-decoder", "nvdec"], "invalid choice: 'nvdec'"),
    (["--target", "torch", "--rpn-memory-gib", "0"], "--rpn-memory-gib must be > 0, got 0.0"),
])
def test_bad_options_are_usage_errors(args, message, capsys):
    with pytest.raises(SystemExit) as info:
        main(["export", *args])
    assert info.value.code == 2
    assert message in capsys.readouterr().err


# --- one options object, from flags and from Docker's variables -------------------------------

def test_environment_and_flags_build_the_same_options():
    env = {"MODEL": "random", "NUM_CLASSES": "5", "CANVASES": "320x320,256x320", "TARGET": "tensorrt",
           "PRECISION": "tf32",
           "MAX_BATCH_SIZE": "2", "INSTANCES": "3", "GPUS": "0,1", "WORKSPACE_GIB": "2", "CUDA_POOL_BYTES": "1024",
           "REBUILD": "1", "JPEG_DECODER": "pillow", "UNRELATED": "x"}
    flags = ["serve", "--weights", "random", "--num-classes", "5", "--canvases", "256x320,320x320", "--target",
             "tensorrt",
             "--precision", "tf32", "--max-batch-size", "2", "--instances", "3", "--gpus", "0,1", "--workspace-gib",
             "2", "--cuda-pool-bytes", "1024", "--rebuild", "--device", "gpu", "--jpeg-decoder", "pillow"]
    from_env = Options.from_env(env)
    assert from_env == Options.from_args(build_parser().parse_args(flags))
    repo = from_env.repository_options()
    assert (repo.target, repo.trt_precision, repo.gpus, repo.instances) == ("tensorrt", "tf32", (0, 1), 3)
    assert repo.trt_workspace_bytes == 2 << 30 and repo.jpeg_decoder == "pillow"
    assert from_env.model_options().canvases == ((256, 320), (320, 320))


def test_rpn_memory_cap_reaches_the_rpn_config():
    """--rpn-memory-gib is the rpn process's cap (model parameter gpu_memory_gib); the header keeps its own."""
    from exporters.repository import python_step_config
    from python_backend import names
    from python_backend.settings import DetectorSettings

    opts = Options.from_args(build_parser().parse_args(["export", "--target", "torch", "--device", "gpu",
                                                        "--precision", "fp16", "--rpn-memory-gib", "6.5"]))
    repo = opts.repository_options()
    settings = DetectorSettings(num_classes=3, canvases=((800, 800),))
    caps = {n: python_step_config(n, settings, repo).parameters["gpu_memory_gib"].string_value
            for n in (names.RPN, names.HEADER)}
    assert caps == {names.RPN: "6.5", names.HEADER: "4"}


def test_canvas_of_older_deployments_is_a_set_of_one():
    """CANVAS (the variable before the canvas set) still reads, as one canvas, where CANVASES is unset."""
    assert Options.from_env({"CANVAS": "800x1344"}).canvases == ((800, 1344),)
    assert Options.from_env({"CANVAS": "800x1344", "CANVASES": "auto"}).canvases == "auto"
    with pytest.raises(OptionsError, match="CANVAS: canvas 'big' is not HEIGHTxWIDTH"):
        Options.from_env({"CANVAS": "big"})


def test_docker_defaults_differ_where_the_image_needs_them():
    image, cli = Options.from_env({}), Options.from_args(build_parser().parse_args(["export"]))
    assert (image.weights, image.target, image.device, image.precision) == ("coco", "tensorrt", "gpu", "fp16")
    assert (cli.weights, cli.target, cli.device, cli.precision) == ("random", "python", "cpu", "fp32")
    assert image.canvases == cli.canvases == "auto" and image.gpus is cli.gpus is None


@pytest.mark.parametrize("env, message", [
    ({"CANVASES": "800x800,big"}, "CANVASES: canvas 'big' is not HEIGHTxWIDTH"),
    ({"TARGET": "tflite"}, "TARGET must be one of"),
    ({"GPUS": "0,x"}, "GPUS: gpus must be 'all'"), ({"MAX_BATCH_SIZE": "eight"}, "MAX_BATCH_SIZE: invalid literal"),
    ({"REBUILD": "maybe"}, "REBUILD: expected 1/0"),
    ({"TARGET": "python", "PRECISION": "fp16"}, "PRECISION fp16 does not apply to TARGET python"),
])
def test_bad_environment_names_the_variable(env, message):
    with pytest.raises(OptionsError, match=message):
        Options.from_env(env)


A100 = GpuInfo(0, "NVIDIA A100-SXM4-80GB", "8.0")
H100 = GpuInfo(1, "NVIDIA H100 80GB HBM3", "9.0")


def _fake_build_plans_per_gpu(calls):
    """Records what the build gets; writes a stand-in plan per target and model."""
    def build(onnx_paths, out_dir, settings, max_batch_size, targets, precision="fp16", workspace_bytes=0, **kw):
        calls.append(dict(precision=precision, workspace_bytes=workspace_bytes, max_batch_size=max_batch_size,
                          devices=[t.device_index for t in targets]))
        plans = {}
        for t in targets:
            for name in (names.RPN, names.HEADER):
                path = Path(out_dir) / f"cc{t.compute_capability}" / f"{name}.plan"
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(f"{name} for {t.compute_capability}".encode())
                plans.setdefault(name, {})[t.filename] = path
        return plans
    return build


@pytest.mark.parametrize("gpus, devices, want", [
    ("all", [H100], {"model.plan": "9.0"}),
    ("all", [A100, H100], {"model_cc8.0.plan": "8.0", "model_cc9.0.plan": "9.0"}),
    ("1", [A100, H100], {"model.plan": "9.0"}),
])
def test_engines_are_built_for_the_gpus_that_serve(tmp_path, monkeypatch, gpus, devices, want):
    """--workspace-gib and --precision are what the TensorRT build gets; one engine per distinct
    compute capability of the chosen GPUs, mapped in the config when there are several."""
    import exporters.export as export_mod
    import exporters.tensorrt.build as tb

    calls = []
    monkeypatch.setattr(tb, "build_plans_per_gpu", _fake_build_plans_per_gpu(calls))
    monkeypatch.setattr(export_mod, "cuda_devices", lambda: devices)
    repo = tmp_path / "repo"
    assert main(["export", "--target", "tensorrt", "--device", "gpu", "--precision", "tf32", "--workspace-gib", "0.5",
                 "--gpus", gpus, "--max-batch-size", "2", "--num-classes", "3", "--repository", str(repo),
                 *SMALL]) == 0
    assert [(c["precision"], c["workspace_bytes"], c["max_batch_size"]) for c in calls] == [("tf32", 1 << 29, 2)]
    for name in (names.RPN, names.HEADER):
        files = {p.name: p.read_bytes().decode().split()[-1] for p in (repo / name / "1").iterdir()}
        assert files == want
        cfg = read_config(repo / name / "config.pbtxt")
        assert dict(cfg.cc_model_filenames) == ({cc: f for f, cc in want.items()} if len(want) > 1 else {})


def test_export_names_a_missing_gpu(tmp_path, monkeypatch, capsys):
    import exporters.export as export_mod

    monkeypatch.setattr(export_mod, "cuda_devices", lambda: [A100])
    assert main(["export", "--target", "tensorrt", "--device", "gpu", "--gpus", "0,3", "--num-classes", "3",
                 "--repository", str(tmp_path / "repo"), *SMALL]) == 2
    assert "GPU ids [3] are not among the visible CUDA devices [0]" in capsys.readouterr().err


def test_workspace_reaches_onnxruntime_tensorrt(tmp_path):
    repo = tmp_path / "repo"
    assert main(["export", "--target", "onnxruntime-trt", "--device", "gpu", "--workspace-gib", "2",
                 "--num-classes", "3", "--repository", str(repo), *SMALL]) == 0
    acc = read_config(repo / names.RPN / "config.pbtxt").optimization.execution_accelerators
    params = acc.gpu_execution_accelerator[0].parameters
    assert params["max_workspace_size_bytes"] == str(2 << 30) and params["precision_mode"] == "FP16"


def test_export_places_gpu_instances_on_the_chosen_gpus(tmp_path):
    repo = tmp_path / "repo"
    assert main(["export", "--device", "gpu", "--gpus", "1,0", "--instances", "2", "--num-classes", "3",
                 "--repository", str(repo), *SMALL]) == 0
    for name in (names.PREPROCESS, names.RPN, names.ROI, names.HEADER, names.POSTPROCESS):
        (group,) = read_config(repo / name / "config.pbtxt").instance_group
        # postprocess: one more than the rpn's (exporters/repository.py postprocess_count)
        assert list(group.gpus) == [1, 0] and group.count == (3 if name == names.POSTPROCESS else 2), name


# --- help ---------------------------------------------------------------------------------------

def _subparsers(parser):
    (action,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return action.choices


@pytest.mark.parametrize("command", ["export", "serve", "demo"])
def test_every_option_has_help_and_shows_its_default(command):
    sub = _subparsers(build_parser())[command]
    formatter = HelpFormatter(prog="fasterrcnn")
    for action in sub._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        assert action.help, f"{command} {action.option_strings} has no help"
        text = formatter._get_help_string(action)
        assert "(default" in text, f"{command} {action.option_strings}: no default in {text!r}"
    assert "--peaky" not in sub.format_help()


def test_top_level_help_is_plain_text():
    text = build_parser().format_help()
    for marker in ("``", ":class:", ":func:", ".. "):
        assert marker not in text
    for command in ("export", "serve", "demo", "detect", "prepare"):
        assert f"    {command} " in text


def _console_scripts() -> dict[str, str]:
    eps = importlib.metadata.distribution(DIST).entry_points
    return {ep.name: ep.value for ep in eps if ep.group == "console_scripts"}


def test_pyproject_lists_the_installed_scripts():
    import tomllib

    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert declared == {"fasterrcnn": "fasterrcnn.__main__:main"}
    assert _console_scripts() == declared, "the venv's install is stale: pip install -e '.[dev]' (make venv)"


@pytest.mark.parametrize("script", sorted(_console_scripts()) or ["fasterrcnn"])
@pytest.mark.parametrize("args, expect", [(["--help"], "usage: fasterrcnn [-h] COMMAND"),
                                          (["serve", "--help"], "--gpus all|0,1,..."),
                                          (["prepare", "--help"], "--lease-fd"),
                                          (["detect", "--help"], "usage: fasterrcnn detect")])
def test_console_script_runs(script, args, expect):
    """Every console script, as installed next to this Python (pip install -e puts it there)."""
    exe = Path(sys.executable).parent / script
    assert exe.is_file(), f"{exe} is not installed: pip install -e '.[dev]' (make venv)"
    proc = subprocess.run([str(exe), *args], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert expect in proc.stdout


# --- the demo's closing statement ------------------------------------------------------------

def test_demo_statement_says_what_random_weights_mean():
    from fasterrcnn.demo import weights_statement

    text = weights_statement("random", "fasterrcnn demo")
    assert "RANDOM weights" in text and "meaningless" in text and "only show that every step" in text
    assert "fasterrcnn demo --weights coco" in text and "--weights path/to/checkpoint.pt" in text


@pytest.mark.parametrize("weights, expect, absent", [
    ("coco", "real detections of COCO's classes", "meaningless"),
    ("/data/mine.pt", "your checkpoint /data/mine.pt", "meaningless"),
])
def test_demo_statement_for_trained_weights(weights, expect, absent):
    from fasterrcnn.demo import weights_statement

    text = weights_statement(weights)
    assert expect in text and absent not in text


def test_demo_prints_the_statement_last(tmp_path, monkeypatch, capsys):
    """The demo's output ends with the statement for the weights it used (server and client faked)."""
    import client.detect as detect
    import fasterrcnn.demo as demo_mod

    class FakeServer:
        grpc_url = "127.0.0.1:1"
        stopped = False

        def start(self):
            return self

        def stop(self):
            FakeServer.stopped = True

    monkeypatch.setattr(demo_mod, "ensure_repository", lambda options, rebuild=False: options.repository)
    monkeypatch.setattr(demo_mod, "make_server", lambda options: FakeServer())
    monkeypatch.setattr(detect, "sample_images", lambda folder: [folder / "a.jpg"])
    monkeypatch.setattr(detect, "run", lambda url, images, **kw: [
        {"image": str(images[0]), "detections": [{"label": "kite", "score": 0.9, "box": [0, 0, 1, 1]}]}])
    options = Options(weights="random", repository=tmp_path / "repo")
    assert demo_mod.demo(options, tmp_path / "out", command="fasterrcnn demo") == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out[0] == "a.jpg: 1 detections; top: kite 0.90"
    assert out[-1].startswith("For real detections: fasterrcnn demo --weights coco")
    assert "meaningless" in out[-2] and FakeServer.stopped


def test_demo_auto_weights(monkeypatch):
    import fasterrcnn.demo as demo_mod
    from exporters import loading

    monkeypatch.setattr(loading, "coco_weights_cached", lambda: None)
    assert demo_mod.choose_weights("auto") == "random"
    monkeypatch.setattr(loading, "coco_weights_cached", lambda: Path("/cache/coco.pth"))
    assert demo_mod.choose_weights("auto") == "coco"
    assert demo_mod.choose_weights("random") == "random"


# --- the launcher -----------------------------------------------------------------------------

def test_launcher_sets_a_memory_pool_on_every_gpu(tmp_path, monkeypatch):
    import fasterrcnn.server as server_mod
    from fasterrcnn.serve import make_server
    from fasterrcnn.server import TritonBinary, TritonServer

    binary = TritonBinary(Path("/opt/tritonserver/bin/tritonserver"), None)
    cmd = TritonServer(tmp_path, cuda_pool_bytes=1 << 30, gpus=(0, 1)).command(binary)
    assert [a for a in cmd if a.startswith("--cuda-memory-pool")] == [
        f"--cuda-memory-pool-byte-size=0:{1 << 30}", f"--cuda-memory-pool-byte-size=1:{1 << 30}"]
    # --gpus all: every CUDA device the driver shows (two here)
    monkeypatch.setattr(server_mod, "cuda_devices", lambda: [GpuInfo(0, H100.name, "9.0"), H100])
    server = make_server(Options(device="gpu", cuda_pool_bytes=4096, repository=tmp_path))
    assert [a for a in server.command(binary) if "pool" in a] == [
        "--cuda-memory-pool-byte-size=0:4096", "--cuda-memory-pool-byte-size=1:4096"]
    pinned = make_server(Options(device="gpu", cuda_pool_bytes=4096, gpus=(1,), repository=tmp_path))
    assert [a for a in pinned.command(binary) if "pool" in a] == ["--cuda-memory-pool-byte-size=1:4096"]
    # no GPU step: no pool
    cpu = make_server(Options(repository=tmp_path))
    assert not [a for a in cpu.command(binary) if "pool" in a]


def test_mps_without_its_control_binary_is_a_clear_error(monkeypatch, tmp_path):
    """``serve --mps`` on a machine without ``nvidia-cuda-mps-control`` names what is missing,
    before any server process starts."""
    import fasterrcnn.server as server_mod

    monkeypatch.setattr(server_mod.shutil, "which", lambda name: None)
    with pytest.raises(server_mod.ServerError, match="nvidia-cuda-mps-control is not on PATH"):
        server_mod.MpsDaemon().start()


def test_mps_daemon_environment_and_stop(monkeypatch, tmp_path):
    """The daemon gets its own pipe and log folders, the server gets them through the environment,
    and stop() sends ``quit`` to the same pipe folder and removes the folders."""
    import fasterrcnn.server as server_mod

    calls = []

    def fake_run(cmd, **kw):
        calls.append((cmd, kw.get("input"), kw["env"]["CUDA_MPS_PIPE_DIRECTORY"]))
        return server_mod.subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(server_mod.shutil, "which", lambda name: "/usr/bin/nvidia-cuda-mps-control")
    monkeypatch.setattr(server_mod.subprocess, "run", fake_run)
    daemon = server_mod.MpsDaemon().start()
    env = daemon.env()
    assert sorted(env) == ["CUDA_MPS_LOG_DIRECTORY", "CUDA_MPS_PIPE_DIRECTORY"]
    assert all(Path(v).is_dir() for v in env.values())
    daemon.stop()
    assert [c[0][-1] for c in calls] == ["-d", "/usr/bin/nvidia-cuda-mps-control"]
    assert calls[1][1] == "quit\n" and calls[0][2] == calls[1][2] == env["CUDA_MPS_PIPE_DIRECTORY"]
    assert not Path(env["CUDA_MPS_PIPE_DIRECTORY"]).exists()

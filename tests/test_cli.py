"""The exporter CLI: progress, artifacts in the repository layout, clear errors."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from exporters.__main__ import main
from exporters.loading import CheckpointError, checkpoint_model, random_model
from python_backend import names

SMALL = ["--canvas", "256x320", "--min-size", "224", "--max-size", "320"]


def test_export_writes_the_repository(tmp_path, small_model, capsys, caplog):
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
    assert "not a fasterrcnn_resnet50_fpn state_dict" in capsys.readouterr().err


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
    with pytest.raises(CheckpointError, match="unexpected keys"):
        checkpoint_model(ckpt)


def test_not_a_checkpoint(tmp_path):
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a zip or pickle")
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        checkpoint_model(junk)
    with pytest.raises(CheckpointError, match="does not exist"):
        checkpoint_model(tmp_path / "missing.pt")


def test_unwritable_output(tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    assert main(["export", "--repository", str(blocker / "repo"), "--num-classes", "3", *SMALL]) == 2
    assert "cannot write the model repository" in capsys.readouterr().err


@pytest.mark.parametrize("canvas, message", [("800x1000", "multiple of 32"), ("32x64", "at least 64"),
                                             ("big", "HEIGHTxWIDTH")])
def test_impossible_canvas(canvas, message, capsys):
    with pytest.raises(SystemExit):
        main(["export", "--canvas", canvas])
    assert message in capsys.readouterr().err


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

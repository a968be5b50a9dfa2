"""tf32 on the torch target: the traces carry TF32 convolutions, fp32's do not.

A TorchScript trace keeps cuDNN's flags of the moment in every ``aten::_convolution`` it records
(benchmark, deterministic, cudnn_enabled, allow_tf32), and the run-time switch does not reach
them: traces recorded with TF32 off served ``--precision tf32`` at fp32's speed.  The flags are
read back from the traced graphs here (on the CPU; they are the same constants on a GPU).
"""
from __future__ import annotations

import pytest
import torch

from exporters import torch_export


@pytest.mark.parametrize("precision, tf32", [("fp32", False), ("tf32", True)])
def test_traced_convolutions_carry_the_precisions_tf32_flag(small_model, small_export, precision, tf32):
    settings, _ = small_export
    rpn = torch_export.rpn_module(small_model, settings, precision)
    images, sizes = torch_export.example_inputs(settings, torch.device("cpu"), settings.canvases[0])[0]
    # whatever the process's own flags are while tracing, the precision decides
    before = torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark
    torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark = (not tf32), True
    try:
        traced = torch_export.trace(rpn, (images, sizes), torch.device("cpu"), tf32=precision == "tf32")
        assert (torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark) == ((not tf32), True)  # restored
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark = before
    flags = torch_export.convolution_flags(traced)
    assert flags == {(False, tf32)}, f"{precision}: (benchmark, allow_tf32) of the traced convolutions: {flags}"


def test_export_torch_traces_tf32_with_tf32_convolutions(small_model, small_export, tmp_path):
    settings, _ = small_export
    one = type(settings)(**{**settings.__dict__, "canvases": (settings.canvases[0],)})
    paths = torch_export.export_torch(small_model, one, tmp_path, device="cpu", precision="tf32", unmasked=False)
    for name, path in paths.items():
        flags = torch_export.convolution_flags(torch.jit.load(str(path)))
        if name != "header":  # the header's dense layers are linear: matmul TF32 is the runner's switch
            assert flags == {(False, True)}, f"{name}: {flags}"

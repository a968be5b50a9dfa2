"""A stand-in for ``triton_python_backend_utils`` and the ``args`` Triton gives ``initialize``, so
the python-backend adapters run without a tritonserver.

Only what the adapters use: ``Tensor`` (``as_numpy``, ``to_dlpack``, ``is_cpu``, ``from_dlpack``),
``InferenceResponse``, ``TritonError`` and ``get_input_tensor_by_name``.  Inputs are host tensors;
outputs made from GPU arrays are copied to the host.
"""
from __future__ import annotations

import importlib.util
import json
import sys
import types
from pathlib import Path

import numpy as np

from python_backend import triton_io


class Tensor:
    """A host tensor; ``via`` records how it was made ("numpy" or "dlpack")."""

    def __init__(self, name: str, array, via: str = "numpy"):
        self._name, self._array, self.via = name, np.asarray(array), via
        self.reads: list[str] = []  # how the adapter read it: "as_numpy" / "to_dlpack"

    @classmethod
    def from_dlpack(cls, name: str, obj):
        if type(obj).__name__ == "PyCapsule":  # a host capsule, taken and named as the stub does
            array = np.from_dlpack(triton_io.HostCapsule(obj)).copy()
            triton_io.rename_capsule(obj, triton_io.DLPACK_USED, triton_io.STUB_USED)
            return cls(name, array, via="dlpack")
        if hasattr(obj, "get"):  # CuPy: kept on the host here
            obj = obj.get()
        elif hasattr(obj, "cpu"):  # torch
            obj = obj.cpu()
        return cls(name, np.from_dlpack(obj).copy(), via="dlpack")

    def name(self) -> str:
        return self._name

    def is_cpu(self) -> bool:
        return True

    def as_numpy(self) -> np.ndarray:
        self.reads.append("as_numpy")
        return self._array

    def to_dlpack(self):
        self.reads.append("to_dlpack")
        return self._array.__dlpack__()


class TritonError:
    def __init__(self, message: str):
        self._message = message

    def message(self) -> str:
        return self._message


class InferenceResponse:
    def __init__(self, output_tensors=(), error=None):
        self._outputs, self._error = list(output_tensors), error

    def has_error(self) -> bool:
        return self._error is not None

    def error(self):
        return self._error

    def output_tensors(self) -> list:
        return self._outputs

    def output(self, name: str) -> np.ndarray:
        """(test helper) The output ``name`` as an array."""
        for t in self._outputs:
            if t.name() == name:
                return t._array
        raise KeyError(f"no output {name!r}; outputs: {[t.name() for t in self._outputs]}")


class Request:
    def __init__(self, **arrays):
        self.tensors = {name: Tensor(name, a) for name, a in arrays.items()}


def get_input_tensor_by_name(request: Request, name: str):
    return request.tensors.get(name)


def pb_utils_module() -> types.ModuleType:
    """A module object named ``triton_python_backend_utils`` with the stand-ins above."""
    mod = types.ModuleType("triton_python_backend_utils")
    mod.Tensor, mod.TritonError, mod.InferenceResponse = Tensor, TritonError, InferenceResponse
    mod.get_input_tensor_by_name = get_input_tensor_by_name
    return mod


def model_args(config, kind: str = "CPU", device_id: int = 0, repository: str | Path = "",
               version: str = "1") -> dict:
    """What Triton passes to ``initialize`` for an instance of ``config`` (a ModelConfig proto)."""
    # imported here: the stand-in itself runs in the image's serving Python too
    # (tests/serving_env_child.py), which has no reason to hold protobuf
    from google.protobuf import json_format

    as_json = json.dumps(json_format.MessageToDict(config, preserving_proto_field_name=True))
    return {"model_config": as_json, "model_name": config.name, "model_instance_kind": kind,
            "model_instance_device_id": str(device_id), "model_repository": str(repository),
            "model_version": version}


def load_model(path: Path, monkeypatch):
    """Import a ``model.py`` file (with this stand-in as ``triton_python_backend_utils``) and
    return its ``TritonPythonModel`` class."""
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", pb_utils_module())
    spec = importlib.util.spec_from_file_location(f"model_under_test_{abs(hash(str(path)))}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.TritonPythonModel

"""Triton model: run rpn or header ONNX with ONNX Runtime inside the python backend.

The stand-in for the TensorRT/ONNX Runtime backends on a tritonserver that has only the
python backend (the nvidia-pytriton wheel).  ONNX Runtime runs on the CPU, so inputs are read
to the host.  The requests of one ``execute`` run as one session call, split back per request
along the batch axis (images for rpn, RoIs for header).
"""
import os

import triton_python_backend_utils as pb_utils

from python_backend.onnx_session import THREADS_PARAMETER, open_session
from python_backend.triton_models.adapter import StepAdapter, rows, split


class TritonPythonModel:
    def initialize(self, args):
        self.adapter = StepAdapter(args, pb_utils, arrays="numpy")
        path = os.path.join(args["model_repository"], args["model_version"],
                            self.adapter.params.get("onnx_file", "model.onnx"))
        self.session = open_session(path, self.adapter.params.get(THREADS_PARAMETER))

    def execute(self, requests):
        return self.adapter.execute(requests, self._run)

    def _run(self, items):
        a = self.adapter
        feeds = {n: a.join(items, n) for n in a.input_names}
        a.check_values(feeds)
        return split(self.session.run(a.output_names, feeds), rows(items, a.input_names[0]))

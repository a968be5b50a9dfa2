"""Triton model: run rpn or header ONNX with ONNX Runtime inside the python backend.

The stand-in for the TensorRT/ONNX Runtime backends on a tritonserver that has only the
python backend (the nvidia-pytriton wheel).  Requests of one batch run as one session call.
"""
import os

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils

from python_backend.triton_io import model_parameters, output, to_numpy


class TritonPythonModel:
    def initialize(self, args):
        params = model_parameters(args)
        path = os.path.join(args["model_repository"], args["model_version"], params.get("onnx_file", "model.onnx"))
        self.session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        self.inputs = [i.name for i in self.session.get_inputs()]
        self.outputs = [o.name for o in self.session.get_outputs()]

    def execute(self, requests):
        feeds = {n: [to_numpy(pb_utils.get_input_tensor_by_name(r, n)) for r in requests] for n in self.inputs}
        counts = [a.shape[0] for a in feeds[self.inputs[0]]]
        results = self.session.run(self.outputs, {n: np.concatenate(a, axis=0) for n, a in feeds.items()})
        responses, start = [], 0
        for c in counts:
            responses.append(pb_utils.InferenceResponse(output_tensors=[
                output(pb_utils, n, r[start:start + c]) for n, r in zip(self.outputs, results)]))
            start += c
        return responses

"""CuPy RawKernel fast path: the GPU twin of :mod:`python_backend.reference`.

Everything here takes and returns CuPy arrays and imports CuPy at import time, so only GPU
instances import this package (the Triton models import it lazily).  The CUDA C sources live
beside the Python as ``.cu`` files and are compiled once per process by :mod:`._modules`.

``steps``: ``roi_step`` / ``postprocess_step`` with the signatures of ``python_backend.steps``.
``nms``: grouped bitmask NMS over sorted segments, and a ``batched_nms`` on top of it.
``proposals``, ``roi_align``, ``detection``: the stages the steps are made of.
"""

"""CuPy RawKernel fast path: the GPU twin of :mod:`python_backend.reference`.

Everything here takes and returns CuPy arrays and imports CuPy at import time, so only GPU
instances import this package (:func:`python_backend.backends.get_backend` imports it lazily).
The CUDA C sources live beside the Python as ``.cu`` files and are compiled once per process
by :mod:`._modules`.

``ops``: the operator set, with the names and signatures of :mod:`python_backend.reference.ops`.
``nms``: grouped bitmask NMS over sorted segments, and a ``batched_nms`` on top of it.
``proposals``, ``roi_align``, ``detection``, ``image``: the operators.
``warm_up``: the roi step's warm-up at load (kernels compiled, memory pool sized).
"""

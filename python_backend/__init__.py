"""Triton-free core of the Faster R-CNN serving pipeline.

``reference``: NumPy implementations, used by CPU instances and as the reference for every
fast path.  ``cuda``: CuPy RawKernel implementations with the same signatures.
``triton_models``: thin ``model.py`` adapters copied into the model repository.
"""

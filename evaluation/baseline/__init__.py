"""The torchvision baseline served by Triton: ``eager.py`` (Triton-free) under the ``model.py`` adapter
that ``evaluation.repositories`` copies into the benchmark's model repository."""

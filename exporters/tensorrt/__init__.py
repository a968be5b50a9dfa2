"""TensorRT engines for the rpn and header networks, one stage per module (like TensorRT's
``samples/python``):

  profiles   optimization profiles (pure)
  precision  which layers stay fp32 in an fp16 engine (pure policy over layer records)
  gpus       the CUDA devices (driver API probe) and one plan per distinct compute capability
  progress   the builder's progress, phase by phase
  build      parse the ONNX, build and serialize engines (TensorRT imported lazily)
  cache      the engine cache key, plan reuse check, atomic timing-cache files
  run        run an engine once with torch or CuPy buffers
  compare    compare engines with ONNX Runtime; CLI ``python -m exporters.tensorrt.compare``

Importing this package imports no module above (and no TensorRT), so the pure parts load on
machines without TensorRT.
"""

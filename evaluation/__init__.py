"""Evaluation library: how the served detector is checked and measured.

Triton-free where it can be; the scripts in ``benchmarks/`` and the tests in ``tests/`` call it.

- ``parity``: the accuracy criteria (fp32 parity per image, fp16 over all detections) and matching;
- ``accuracy``: torchvision eager and served detections side by side, judged by ``parity``;
- ``onnx_pipeline``: the whole detector through ONNX Runtime and the NumPy steps (CPU reference);
- ``payloads``: test images and request payloads (photographs, synthetic, decoded, bad inputs);
- ``synthetic`` and ``training``: generated shape scenes and a brief from-scratch trainer on them;
- ``repositories``: the model repositories of a benchmark run (ensemble + torchvision baseline per
  serving variant);
- ``baseline``: the torchvision baseline served as a Triton python model; ``eager_bench``:
  torchvision eager alone, no server;
- ``server``: a tritonserver for one benchmark run (start on free ports, warm up, keep its log);
- ``bench``: the stages of a run on one server (memory, warm-up, accuracy, sweeps, statistics);
- ``goals``: the performance goals judged from a run's measurements (pure);
- ``perf_analyzer``: the perf_analyzer driver; ``triton_stats``: per-step times from Triton's statistics;
- ``soak``: requests sent in a loop with each outcome counted; ``memory``: GPU memory and RSS samples;
- ``kernels``, ``timing`` and ``profiling``: inputs, timers and kernel-time profiles of the kernel
  and dense-network benchmarks;
- ``report`` and ``plots``: CSV, markdown summary, and matplotlib figures.
"""

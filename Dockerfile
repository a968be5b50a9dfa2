# fasterrcnn_resnet50_fpn on Triton with TensorRT engines built for the GPU it starts on.
#
# Base: Triton 24.10 (server 2.51.0, the version of the nvidia-pytriton 0.7.0 wheel used in the
# tests): Ubuntu 22.04, Python 3.10, CUDA 12.6.2, TensorRT 10.5 (release notes 24.10).
# Two Pythons, on purpose:
#   /usr/bin/python3 (3.10)  runs the python-backend steps (the stub is built for it):
#                            numpy, Pillow, CuPy and this package without its heavy deps;
#   /opt/export (3.11 venv)  exports ONNX and builds engines at first start: torch (CPU build),
#                            onnxsim 0.8.1 (needs Python >= 3.11), ONNX Runtime, TensorRT bindings.
# The TensorRT bindings are the PyPI wheel tensorrt-cu12-bindings 10.5.0, which links the
# image's own libnvinfer 10.5 (the tensorrt-cu12 meta package would pull a second copy of the
# libraries from NVIDIA's index).
# Build and run: docs/docker.md.
FROM nvcr.io/nvidia/tritonserver:24.10-py3

SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1

# Ubuntu 22.04's python3.11 (universe); the base image tag pins the rest of the system.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3.11 python3.11-venv \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/fasterrcnn
COPY pyproject.toml ./
COPY exporters ./exporters
COPY python_backend ./python_backend
COPY client ./client
COPY fasterrcnn ./fasterrcnn
COPY docker/entrypoint.sh ./docker/entrypoint.sh

# Serving Python (3.10): what the python-backend models import.  cupy-cuda12x uses the image's
# CUDA 12.6 runtime and NVRTC; onnxruntime only serves TARGET=python.
RUN python3 -m pip install --no-cache-dir \
        numpy==1.26.4 pillow==11.0.0 cupy-cuda12x==13.3.0 onnxruntime==1.20.1 \
    && python3 -m pip install --no-cache-dir --no-deps .

# Exporter venv (3.11): the versions the test suite runs with; torch's CPU build (the export
# runs on the CPU, and it saves the ~3 GB of CUDA wheels).
RUN python3.11 -m venv /opt/export \
    && /opt/export/bin/pip install --no-cache-dir --index-url https://download.pytorch.org/whl/cpu \
        torch==2.14.1+cpu torchvision==0.29.1+cpu \
    && /opt/export/bin/pip install --no-cache-dir \
        numpy==1.26.4 onnx==1.23.2 onnxruntime==1.32.0 onnxsim==0.8.1 onnx-graphsurgeon==0.6.1 \
        "tritonclient[grpc]==2.73.0" pillow==13.0.0 cupy-cuda12x==13.3.0 tensorrt-cu12-bindings==10.5.0 \
    && /opt/export/bin/pip install --no-cache-dir . \
    && so=$(/opt/export/bin/python -c "import importlib.util as u; print(u.find_spec('tensorrt_bindings').submodule_search_locations[0])")/tensorrt.so \
    && if ldd "$so" | grep -v libcuda | grep "not found"; then echo "TensorRT bindings: libraries missing from the image" >&2; exit 1; fi

# Non-root; /cache holds engines, ONNX, timing caches and torchvision's weights (a volume).
RUN useradd --create-home --uid 10001 --user-group fasterrcnn \
    && mkdir -p /cache \
    && chown fasterrcnn:fasterrcnn /cache \
    && chmod 0755 /opt/fasterrcnn/docker/entrypoint.sh
USER 10001:10001
VOLUME ["/cache"]
ENV CACHE_DIR=/cache

EXPOSE 8000 8001 8002
# The first start builds engines (minutes); later starts reuse them from /cache.
HEALTHCHECK --start-period=30m --interval=30s --timeout=5s \
    CMD ["python3", "-c", "import urllib.request; urllib.request.urlopen('http://localhost:8000/v2/health/ready', timeout=4)"]

# NVIDIA's entrypoint first (CUDA forward-compatibility libraries on older drivers), then ours.
ENTRYPOINT ["/opt/nvidia/nvidia_entrypoint.sh", "/opt/fasterrcnn/docker/entrypoint.sh"]
CMD []

# fasterrcnn_resnet50_fpn on Triton with TensorRT engines built for the GPU it starts on.
#
# Base: Triton 25.10 (release notes 25.10): Ubuntu 24.04, Python 3.12, CUDA 13.0.2, TensorRT 10.13.3.
# Its CUDA is the one PyPI's torch 2.14.1 wheels are built for (cu130), so the serving Python gets
# the torch the tests run (docs/docker.md, "Base, CUDA and torch", says why and what is verified).
# One Python, two layers:
#   /usr/bin/python3 (3.12)  runs the python-backend steps (Triton's stub embeds it): numpy, Pillow,
#                            CuPy, ONNX Runtime, torch and torchvision (CUDA 13.0 builds), this package;
#   /opt/export (venv over it, --system-site-packages)  exports ONNX and builds engines at first
#                            start: adds onnx, onnxsim 0.8.1, onnx-graphsurgeon, tritonclient, the
#                            TensorRT bindings.
# The TensorRT bindings are the PyPI wheel tensorrt-cu13-bindings 10.13.3.9, which links the
# image's own libnvinfer 10.13.3 (the tensorrt-cu13 meta package would pull a second copy of the
# libraries from NVIDIA's index); the build checks the two versions agree.
# Build and run: docs/docker.md.
FROM nvcr.io/nvidia/tritonserver:25.10-py3

SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1

WORKDIR /opt/fasterrcnn
COPY pyproject.toml ./
COPY exporters ./exporters
COPY python_backend ./python_backend
COPY client ./client
COPY fasterrcnn ./fasterrcnn
COPY docker/entrypoint.sh ./docker/entrypoint.sh

# Serving Python: the image's python3 (3.12), which Triton's python-backend stub embeds, with what
# the python-backend models import (tests/test_serving_env.py loads every model with these pins).
# torch and torchvision are PyPI's default Linux wheels: CUDA 13.0 builds whose CUDA libraries come
# as nvidia-* wheels, for the base's CUDA 13.0 driver requirements; cupy-cuda13x likewise (CuPy 14
# needs numpy >= 2).  onnxruntime serves TARGET=python.  --break-system-packages: Ubuntu 24.04
# marks its Python as managed by apt.
RUN python3 -m pip install --no-cache-dir --break-system-packages \
        numpy==2.4.6 pillow==13.0.0 cupy-cuda13x==14.2.0 onnxruntime==1.32.0 \
        torch==2.14.1 torchvision==0.29.1 \
    && python3 -m pip install --no-cache-dir --break-system-packages --no-deps .

# Exporter: a venv over the serving Python (the same torch, numpy and ONNX Runtime) with what only
# the export and the engine build use; pip runs from the serving Python into the venv.  The build
# fails when a library of the TensorRT bindings is missing from the image (the CUDA driver excepted:
# it exists only at run time) or when the image's libnvinfer is not the bindings' version.
RUN python3 -c "import sys; assert sys.version_info >= (3, 11), 'onnxsim 0.8.1 needs Python >= 3.11'" \
    && python3 -m venv --system-site-packages --without-pip /opt/export \
    && /opt/export/bin/python -m pip install --no-cache-dir \
        onnx==1.23.2 onnxsim==0.8.1 onnx-graphsurgeon==0.6.1 "tritonclient[grpc]==2.73.0" \
        tensorrt-cu13-bindings==10.13.3.9 \
    && /opt/export/bin/python -m pip install --no-cache-dir . \
    && so=$(/opt/export/bin/python -c "import importlib.util as u; print(u.find_spec('tensorrt_bindings').submodule_search_locations[0])")/tensorrt.so \
    && if ldd "$so" | grep -v libcuda | grep "not found"; then echo "TensorRT bindings: libraries missing from the image" >&2; exit 1; fi \
    && lib=$(readlink -f "$(ldd "$so" | awk '$1 == "libnvinfer.so.10" {print $3}')") \
    && want=$(/opt/export/bin/python -c "import importlib.metadata as m; print('.'.join(m.version('tensorrt-cu13-bindings').split('.')[:3]))") \
    && case "$lib" in *"libnvinfer.so.$want"*) ;; *) echo "TensorRT bindings $want, image library $lib: pin the bindings to the image's TensorRT" >&2; exit 1 ;; esac

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

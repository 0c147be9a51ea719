# Cloud worker image with onnxruntime-gpu. Build from the repository root:
#   docker build -f docker/cloud-gpu.Dockerfile -t splitinfer-cloud-gpu .
#   docker run --gpus all … splitinfer-cloud-gpu
# onnxruntime-gpu 1.31 on PyPI is built for CUDA 13 and cuDNN 9; the [cuda,cudnn] extras
# bring both as wheels, so a slim Python base will do (the driver comes from the host
# through the NVIDIA container toolkit). The worker preloads those libraries
# (onnxruntime.preload_dlls) and prefers CUDAExecutionProvider when it is available.
# Checked on an H200 with onnxruntime-gpu 1.31.1: docs/cloud.md, "GPU tails".
FROM python:3.12-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY splitinfer splitinfer
COPY cloud_service cloud_service
COPY edge_agent edge_agent
COPY splitter splitter
COPY simulators simulators
RUN pip install --no-cache-dir ".[cloud]" && pip uninstall -y onnxruntime \
    && pip install --no-cache-dir "onnxruntime-gpu[cuda,cudnn]>=1.31,<2"
USER 65534:65534
ENV SPLITINFER_BROKER=mqtt://mosquitto:1883 SPLITINFER_ARTIFACTS=/artifacts
ENTRYPOINT ["splitinfer", "cloud", "serve"]

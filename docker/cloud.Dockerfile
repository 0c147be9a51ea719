# Cloud worker image (CPU onnxruntime). Build from the repository root:
#   docker build -f docker/cloud.Dockerfile -t splitinfer-cloud .
# For GPU workers use docker/cloud-gpu.Dockerfile.
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY splitinfer splitinfer
COPY cloud_service cloud_service
COPY edge_agent edge_agent
COPY splitter splitter
COPY simulators simulators
RUN pip install --no-cache-dir ".[cloud]"
USER 65534:65534
# Artifacts (split directories) are mounted at /artifacts.
ENV SPLITINFER_BROKER=mqtt://mosquitto:1883 SPLITINFER_ARTIFACTS=/artifacts
ENTRYPOINT ["splitinfer", "cloud", "serve"]

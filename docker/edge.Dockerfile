# Edge agent image (arm64 or amd64): onnxruntime + MQTT, never onnx or torch.
#   docker buildx build --platform linux/arm64 -f docker/edge.Dockerfile -t splitinfer-edge .
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY splitinfer splitinfer
COPY edge_agent edge_agent
COPY cloud_service cloud_service
COPY splitter splitter
COPY simulators simulators
RUN pip install --no-cache-dir ".[edge]" && ! python -c "import onnx" 2>/dev/null
USER 65534:65534
ENTRYPOINT ["splitinfer", "edge"]

# Cloud worker image with onnxruntime-gpu (CUDA 12). Same entry point as the CPU image;
# the tail sessions pick CUDAExecutionProvider when it is available.
FROM nvidia/cuda:12.6.3-cudnn-runtime-ubuntu24.04
RUN apt-get update && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/* && python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /app
COPY pyproject.toml README.md ./
COPY splitinfer splitinfer
COPY cloud_service cloud_service
COPY edge_agent edge_agent
COPY splitter splitter
COPY simulators simulators
RUN pip install --no-cache-dir ".[cloud]" && pip uninstall -y onnxruntime \
    && pip install --no-cache-dir onnxruntime-gpu
ENV SPLITINFER_BROKER=mqtt://mosquitto:1883 SPLITINFER_ARTIFACTS=/artifacts
ENTRYPOINT ["splitinfer", "cloud", "serve"]

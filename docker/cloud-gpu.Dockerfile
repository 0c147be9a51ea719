# Cloud worker image with onnxruntime-gpu: the contract (splitinfer/) and the worker
# (cloud_service/) only, as docker/cloud.Dockerfile, with onnxruntime swapped for
# onnxruntime-gpu. Built here (2.77 GB, 185 s; docs/deploy.md) but not run on a GPU: on
# a machine without one it serves on the CPU after a warning. Build from the repository
# root and run through the NVIDIA container toolkit:
#   docker build --network host -f docker/cloud-gpu.Dockerfile -t splitinfer-cloud-gpu .
#   docker run --gpus all --network host -v $PWD/artifacts:/artifacts:ro splitinfer-cloud-gpu
# BASE: onnxruntime-gpu 1.31+ on PyPI is built for CUDA 13 and cuDNN 9, and its
# [cuda,cudnn] extras bring both as wheels, so the Debian base of docker/make-base.sh
# will do (the driver comes from the host). With a CUDA base image instead, e.g.
#   --build-arg BASE=nvidia/cuda:13.0.1-cudnn-runtime-ubuntu24.04 --build-arg ORT_GPU_EXTRAS=
# the libraries come from the image (it needs python3 and python3-venv installed).
# The worker preloads the wheel libraries (onnxruntime.preload_dlls) and prefers
# CUDAExecutionProvider when it is available. Checked on an H200 with onnxruntime-gpu
# 1.31.1 outside a container: docs/cloud.md, "GPU tails".
ARG BASE=splitinfer-base:bookworm
FROM ${BASE}
ARG ORT_GPU_EXTRAS="[cuda,cudnn]"
ENV PATH=/opt/splitinfer/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY splitinfer splitinfer
COPY cloud_service cloud_service
# A TLS-intercepting proxy's CA (a build secret, never a layer):
#   --secret id=pip_cert,src=/etc/ssl/certs/ca-certificates.crt
RUN --mount=type=secret,id=pip_cert,required=false \
    if [ -s /run/secrets/pip_cert ]; then export PIP_CERT=/run/secrets/pip_cert; fi \
    && python3 -m venv /opt/splitinfer \
    && pip install --no-cache-dir ".[cloud]" \
    && pip uninstall -q -y onnxruntime \
    && pip install --no-cache-dir "onnxruntime-gpu${ORT_GPU_EXTRAS}>=1.31,<2" \
    && pip uninstall -q -y pip setuptools \
    && cd / && rm -rf /src \
    && python3 -c "import onnxruntime as o; assert 'CUDAExecutionProvider' in o.get_available_providers()"
WORKDIR /
USER 65534:65534
ENV SPLITINFER_BROKER=mqtt://mosquitto:1883 SPLITINFER_ARTIFACTS=/artifacts \
    SPLITINFER_METRICS_PORT=9100 SPLITINFER_METRICS_HOST=0.0.0.0
EXPOSE 9100
STOPSIGNAL SIGTERM
ENTRYPOINT ["splitinfer", "cloud", "serve"]

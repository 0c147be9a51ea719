# Cloud worker image (CPU onnxruntime): the contract (splitinfer/) and the worker
# (cloud_service/), nothing else. Build from the repository root, on a base made by
# docker/make-base.sh (Debian bookworm, python3 3.11, no registry needed):
#   docker build --network host -f docker/cloud.Dockerfile -t splitinfer-cloud .
#   docker run --rm --network host -v $PWD/artifacts:/artifacts:ro \
#       -e SPLITINFER_BROKER=mqtt://127.0.0.1:1883 splitinfer-cloud
# Any Debian/Ubuntu image with python3 and python3-venv works as BASE (--build-arg BASE=…).
# For GPU workers use docker/cloud-gpu.Dockerfile. Sizes and times: docs/deploy.md.
ARG BASE=splitinfer-base:bookworm
FROM ${BASE}
ENV PATH=/opt/splitinfer/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY splitinfer splitinfer
COPY cloud_service cloud_service
# A non-editable install into a venv; the sources, pip and setuptools go once it is in.
# A TLS-intercepting proxy's CA (a build secret, never a layer):
#   --secret id=pip_cert,src=/etc/ssl/certs/ca-certificates.crt
RUN --mount=type=secret,id=pip_cert,required=false \
    if [ -s /run/secrets/pip_cert ]; then export PIP_CERT=/run/secrets/pip_cert; fi \
    && python3 -m venv /opt/splitinfer \
    && pip install --no-cache-dir ".[cloud]" \
    && pip uninstall -q -y pip setuptools \
    && cd / && rm -rf /src \
    && splitinfer cloud serve --help > /dev/null
WORKDIR /
USER 65534:65534
# Artifacts (split directories) are mounted at /artifacts. /metrics, /healthz and /readyz
# on 9100 for the orchestrator's probes and a Prometheus scrape (deploy/k8s/).
ENV SPLITINFER_BROKER=mqtt://mosquitto:1883 SPLITINFER_ARTIFACTS=/artifacts \
    SPLITINFER_METRICS_PORT=9100 SPLITINFER_METRICS_HOST=0.0.0.0
EXPOSE 9100
STOPSIGNAL SIGTERM
ENTRYPOINT ["splitinfer", "cloud", "serve"]

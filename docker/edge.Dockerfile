# Edge agent image (linux/amd64 or linux/arm64; 64-bit only: onnxruntime has no armv7
# wheel): the contract (splitinfer/) and the device side (edge_agent/) only, with
# onnxruntime + MQTT from the [edge] extra; never onnx, torch, the worker or the splitter.
# No architecture-specific step: every dependency is a wheel for both platforms.
#   docker build --network host -f docker/edge.Dockerfile -t splitinfer-edge .
#   docker buildx build --platform linux/arm64 --build-arg BASE=<an arm64 base> \
#       -f docker/edge.Dockerfile -t splitinfer-edge:arm64 .
# (an arm64 base: ARCH=arm64 docker/make-base.sh, or any Debian arm64 image with python3
# and python3-venv). Sizes: docs/deploy.md.
ARG BASE=splitinfer-base:bookworm
FROM ${BASE}
# Extra requirements or pins for pip, e.g. --build-arg EXTRA_PIP=onnxruntime==1.27.0 for an
# arm64 build under qemu-user emulation: onnxruntime 1.28-1.32 die with SIGSEGV on import
# under Debian 12's qemu-user 7.2 (1.22.1-1.27.0 import fine; measured, docs/deploy.md).
ARG EXTRA_PIP=""
ENV PATH=/opt/splitinfer/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY splitinfer splitinfer
COPY edge_agent edge_agent
# The checks fail the build if the device image could reach the cloud or offline side.
# A TLS-intercepting proxy's CA (a build secret, never a layer):
#   --secret id=pip_cert,src=/etc/ssl/certs/ca-certificates.crt
RUN --mount=type=secret,id=pip_cert,required=false \
    if [ -s /run/secrets/pip_cert ]; then export PIP_CERT=/run/secrets/pip_cert; fi \
    && python3 -m venv /opt/splitinfer \
    && pip install --no-cache-dir ".[edge]" ${EXTRA_PIP} \
    && pip uninstall -q -y pip setuptools \
    && cd / && rm -rf /src \
    && splitinfer edge run --help > /dev/null \
    && python3 -c "import onnxruntime, edge_agent, splitinfer" \
    && for m in onnx torch cloud_service splitter simulators bench; do \
         if python3 -c "import $m" 2>/dev/null; then echo "edge image has $m" >&2; exit 1; fi; \
       done
WORKDIR /
USER 65534:65534
STOPSIGNAL SIGTERM
ENTRYPOINT ["splitinfer", "edge"]

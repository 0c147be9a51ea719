# Workstation tools in a container: the splitter (inspect, quantize, split, bundle), the
# fleet simulator and the demo, i.e. every package with the [cloud,edge,splitter] extras
# (onnx included; never for a device or a worker). docker/compose.yaml runs its one-shot
# 'prepare' (quantize + split the bundled digits CNN) and 'fleet' steps with it.
#   docker build --network host -f docker/tools.Dockerfile -t splitinfer-tools .
#   docker run --rm -v $PWD:/work -w /work splitinfer-tools split model.onnx --at CUT -o out/
ARG BASE=splitinfer-base:bookworm
FROM ${BASE}
ENV PATH=/opt/splitinfer/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY splitinfer splitinfer
COPY edge_agent edge_agent
COPY cloud_service cloud_service
COPY splitter splitter
COPY simulators simulators
COPY bench bench
# A TLS-intercepting proxy's CA (a build secret, never a layer):
#   --secret id=pip_cert,src=/etc/ssl/certs/ca-certificates.crt
RUN --mount=type=secret,id=pip_cert,required=false \
    if [ -s /run/secrets/pip_cert ]; then export PIP_CERT=/run/secrets/pip_cert; fi \
    && python3 -m venv /opt/splitinfer \
    && pip install --no-cache-dir ".[cloud,edge,splitter]" \
    && cd / && rm -rf /src \
    && splitinfer split --help > /dev/null && splitinfer fleet --help > /dev/null
WORKDIR /
USER 65534:65534
ENTRYPOINT ["splitinfer"]

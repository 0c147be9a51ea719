#!/bin/sh
# The compose demo end to end: broker, prepare (quantize + split), two workers, a fleet of
# 8 virtual devices over the labelled digits test set, then one device in the edge image;
# prints the fleet's report (accuracy, latency, lost), each worker's share and the edge
# image's accuracy, and removes the containers and the volume. From the repository root:
#   docker/compose-demo.sh
# Needs docker, docker-compose (v1.29) or the compose v2 plugin, and the images
# (built here when missing, on splitinfer-base:bookworm from docker/make-base.sh).
# PIP_CERT=/path/ca.pem passes a TLS-intercepting proxy's CA to the builds (a secret).
set -eu
cd "$(dirname "$0")/.."
if docker compose version > /dev/null 2>&1; then COMPOSE="docker compose"
elif command -v docker-compose > /dev/null; then COMPOSE="docker-compose"
else echo "compose-demo: neither 'docker compose' nor docker-compose is installed" >&2; exit 3
fi
free() {  # is 127.0.0.1:$1 free?
    python3 -c "import socket,sys; s=socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.bind(('127.0.0.1', $1))" 2>/dev/null
}
# The broker's port: 18830 unless something listens there, then a free one.
if [ -z "${SPLITINFER_DEMO_PORT:-}" ]; then
    if free 18830; then SPLITINFER_DEMO_PORT=18830
    else SPLITINFER_DEMO_PORT=$(python3 -c "import socket; s=socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")
    fi
fi
export SPLITINFER_DEMO_PORT
for port in 19101 19102 18470; do
    free $port || { echo "compose-demo: 127.0.0.1:$port (a worker's metrics or the edge service's port) is in use" >&2; exit 3; }
done
docker image inspect splitinfer-base:bookworm > /dev/null 2>&1 || {
    echo "compose-demo: no splitinfer-base:bookworm image; run docker/make-base.sh first" >&2; exit 3; }
secret=""
[ -z "${PIP_CERT:-}" ] || secret="--secret id=pip_cert,src=$PIP_CERT"
for img in broker cloud edge tools; do
    docker image inspect splitinfer-$img > /dev/null 2>&1 && continue
    echo "compose-demo: building splitinfer-$img" >&2
    # shellcheck disable=SC2086
    DOCKER_BUILDKIT=1 docker build -q --network host $secret \
        -f docker/$img.Dockerfile -t splitinfer-$img . > /dev/null
done
project="splitinfer-demo"
trap '$COMPOSE -p $project -f docker/compose.yaml down -v --remove-orphans > /dev/null 2>&1' EXIT
echo "compose-demo: broker on 127.0.0.1:$SPLITINFER_DEMO_PORT" >&2
status=0
$COMPOSE -p $project -f docker/compose.yaml run --rm fleet || status=$?
# The edge image on the same split and workers: one device, the 360 test images.
[ "$status" != 0 ] || $COMPOSE -p $project -f docker/compose.yaml run --rm --no-deps edge || status=$?
# The edge image as the device service, and an app calling its local HTTP API.
if [ "$status" = 0 ]; then
    # --no-deps: the workers serve already, and 'prepare' must not run again under them
    $COMPOSE -p $project -f docker/compose.yaml up -d --no-deps edge-serve > /dev/null 2>&1
    python3 - <<'PY' || status=$?
import time, urllib.request
for _ in range(120):
    try:
        urllib.request.urlopen("http://127.0.0.1:18470/healthz", timeout=2)
        break
    except OSError:
        time.sleep(0.5)
else:
    raise SystemExit("compose-demo: edge-serve never answered /healthz")
PY
    [ "$status" != 0 ] || $COMPOSE -p $project -f docker/compose.yaml run --rm --no-deps app \
        || status=$?
fi
# Each worker's share of the answers, from its own /metrics (the $share group at work).
for port in 19101 19102; do
    python3 - "$port" <<'PY' || true
import sys, urllib.request
port = sys.argv[1]
text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=3).read().decode()
answered = [line.split()[-1] for line in text.splitlines()
            if line.startswith("splitinfer_worker_answered_total ")]
print(f"worker on :{port} answered {float(answered[0]) if answered else 0:.0f}")
PY
done
$COMPOSE -p $project -f docker/compose.yaml logs --no-color prepare worker-1 worker-2 \
    > "${COMPOSE_DEMO_LOGS:-/tmp/splitinfer-compose-demo.log}" 2>&1 || true
echo "compose-demo: fleet exit $status; prepare and worker logs in" \
     "${COMPOSE_DEMO_LOGS:-/tmp/splitinfer-compose-demo.log}" >&2
exit $status

#!/bin/bash
# The multi-arch check of the edge image: the same digits split, one amd64 worker, and the
# edge image for amd64 and for arm64 (under qemu-user emulation unless the host is arm64)
# each pushing the 360 test images through it; prints both devices' runs and whether the
# answers are bit-identical. Needs splitinfer-broker, splitinfer-cloud, splitinfer-edge and
# splitinfer-edge:arm64 (docs/deploy.md, "Multi-arch"), qemu-user-static with binfmt for a
# foreign arch, and the venv's python (splitter) to prepare the split. From the repo root:
#   docker/edge-arm64-check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
work=$(mktemp -d /tmp/splitinfer-arch.XXXXXX)
python3 docker/compose_prepare.py "$work/digits" > /dev/null
mkdir "$work/out" && chmod -R a+rwX "$work"
port=$(python3 -c "import socket; s=socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")
metrics=$(python3 -c "import socket; s=socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")
cleanup() { docker stop si-arch-worker si-arch-broker > /dev/null 2>&1 || true; rm -rf "$work"; }
trap cleanup EXIT
docker run -d --rm --name si-arch-broker --network host --entrypoint sh splitinfer-broker -c \
    "grep -v '^listener ' /etc/mosquitto/splitinfer.conf > /tmp/m.conf &&
     echo 'listener $port 127.0.0.1' >> /tmp/m.conf && exec mosquitto -c /tmp/m.conf" > /dev/null
sleep 1
docker run -d --rm --name si-arch-worker --network host -e "SPLITINFER_BROKER=mqtt://127.0.0.1:$port" \
    -e "SPLITINFER_METRICS_PORT=$metrics" -e SPLITINFER_METRICS_HOST=127.0.0.1 \
    -v "$work/digits/split:/artifacts/digits:ro" splitinfer-cloud > /dev/null
for _ in $(seq 1 60); do
    [ "$(curl -s -o /dev/null -w '%{http_code}' "127.0.0.1:$metrics/readyz")" = 200 ] && break
    sleep 0.5
done
for arch in amd64 arm64; do
    tag=splitinfer-edge
    [ "$arch" = amd64 ] || tag=splitinfer-edge:$arch
    start=$(date +%s.%N)
    docker run --rm --platform "linux/$arch" --network host -v "$work/digits:/artifacts:ro" \
        -v "$work/out:/out" "$tag" run --broker "mqtt://127.0.0.1:$port" \
        --artifacts /artifacts/split --input /artifacts/digits_images.npz \
        --output "/out/$arch.npz" --device-id "arch-$arch" --concurrency 4 2>&1 | tail -1
    echo "$arch: $(docker run --rm --platform "linux/$arch" --entrypoint sh "$tag" -c \
        'uname -m; python3 -c "import onnxruntime as o; print(\"onnxruntime\", o.__version__)" 2>/dev/null' \
        | tr '\n' ' ')$(echo "$(date +%s.%N) - $start" | bc) s"
done
python3 - "$work" <<'PY'
import sys
import numpy as np
work = sys.argv[1]
a, b = np.load(f"{work}/out/amd64.npz"), np.load(f"{work}/out/arm64.npz")
labels = np.load(f"{work}/digits/digits_test.npz")["label"]
for k in a.files:
    x, y = a[k], b[k]
    same = "bit-identical" if np.array_equal(x, y) else f"max |diff| {np.abs(x - y).max():.3g}"
    print(f"{k} {x.shape} {x.dtype}: amd64 vs arm64 {same}; top-1 agreement "
          f"{(x.argmax(-1) == y.argmax(-1)).mean():.2%}; accuracy "
          f"{(x.argmax(-1) == labels).mean():.2%} / {(y.argmax(-1) == labels).mean():.2%}")
PY

#!/bin/sh
# Benchmark of the images (heavy; not part of the test run): build each image from
# scratch on the Debian base, print its size and build time, then run the compose demo
# and print its accuracy and latency lines. From the repository root:
#   docker/bench-images.sh            # NO_CACHE=0 reuses the layer cache; GPU=1 adds cloud-gpu
# Needs docker with BuildKit, docker-compose or compose v2, splitinfer-base:bookworm
# (docker/make-base.sh) and the package registry; PIP_CERT=/path/ca.pem passes a proxy's
# CA to pip as a build secret. Figures measured here: docs/deploy.md.
set -eu
cd "$(dirname "$0")/.."
docker image inspect splitinfer-base:bookworm > /dev/null 2>&1 || {
    echo "bench-images: no splitinfer-base:bookworm image; run docker/make-base.sh first" >&2
    exit 3; }
nocache="--no-cache"
[ "${NO_CACHE:-1}" = "1" ] || nocache=""
secret=""
[ -z "${PIP_CERT:-}" ] || secret="--secret id=pip_cert,src=$PIP_CERT"
log=$(mktemp /tmp/splitinfer-bench-images.XXXXXX)
printf '%-22s %10s %10s\n' image "size MB" "build s"
mb() { docker image inspect --format '{{.Size}}' "$1" | awk '{printf "%.1f", $1 / 1e6}'; }
printf '%-22s %10s %10s\n' splitinfer-base:bookworm "$(mb splitinfer-base:bookworm)" "-"
images="broker cloud edge tools"
[ "${GPU:-0}" = "0" ] || images="$images cloud-gpu"  # GPU=1: ~2.8 GB of CUDA wheels
for img in $images; do
    start=$(date +%s.%N)
    # shellcheck disable=SC2086
    DOCKER_BUILDKIT=1 docker build $nocache --network host $secret \
        -f docker/$img.Dockerfile -t splitinfer-$img . > "$log" 2>&1 \
        || { echo "bench-images: building splitinfer-$img failed:" >&2; tail -20 "$log" >&2; exit 1; }
    end=$(date +%s.%N)
    printf '%-22s %10s %10.1f\n' splitinfer-$img "$(mb splitinfer-$img)" \
        "$(echo "$end - $start" | bc)"
done
start=$(date +%s.%N)
docker/compose-demo.sh > "$log" 2>&1 || { echo "bench-images: the compose demo failed:" >&2;
                                          tail -30 "$log" >&2; exit 1; }
end=$(date +%s.%N)
grep -E '^(sent|[0-9]+ |e2e|  tail|accuracy|worker on|edge image|edge serve|[0-9]+/[0-9]+ requests ok)' \
    "$log" || true
printf 'compose demo: %.1f s from up to down\n' "$(echo "$end - $start" | bc)"
rm -f "$log"

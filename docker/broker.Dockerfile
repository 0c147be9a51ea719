# mosquitto 2 from Debian on the same base (no registry needed; eclipse-mosquitto:2 from
# Docker Hub is the same broker). The config is docker/mosquitto/mosquitto.conf (tuned,
# DEVELOPMENT: anonymous, loopback port 18830); mount another at
# /etc/mosquitto/splitinfer.conf for production (docker/mosquitto/mosquitto.prod.conf).
#   docker build --network host -f docker/broker.Dockerfile -t splitinfer-broker .
ARG BASE=splitinfer-base:bookworm
FROM ${BASE}
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends mosquitto \
    && rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin /usr/share/doc/* /usr/share/man/* \
    && mosquitto -h | head -1
COPY docker/mosquitto/mosquitto.conf /etc/mosquitto/splitinfer.conf
USER mosquitto
EXPOSE 18830
ENTRYPOINT ["mosquitto", "-c", "/etc/mosquitto/splitinfer.conf"]

"""``splitinfer cloud serve``: one flag per :class:`~cloud_service.config.Config` field.

Every flag also reads an environment variable (``--max-batch`` ↔ ``SPLITINFER_MAX_BATCH``).
Cheap to import: the server, onnxruntime and paho load only when the command runs.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

from splitinfer.cli import env_default
from splitinfer.ort_config import SPINNING
from splitinfer.topics import DEFAULT_GROUP, DEFAULT_PREFIX

if TYPE_CHECKING:
    from cloud_service.config import Config

__all__ = ["register", "config_from_args"]


def _env(flag: str, default: object) -> str | None:
    return env_default(flag, None if default is None else str(default))


_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


def _flag_bool(value: bool | str | None, flag: str, default: bool) -> bool:
    """A --flag/--no-flag value: the flag's bool, or its environment variable's text."""
    if value is None:
        return default
    if isinstance(value, bool):
        return value
    if value.strip().lower() in _TRUE:
        return True
    if value.strip().lower() in _FALSE:
        return False
    from splitinfer.errors import BadInputError

    name = "SPLITINFER_" + flag.lstrip("-").replace("-", "_").upper()
    raise BadInputError(f"{name}={value!r}: expected one of {', '.join(_TRUE + _FALSE)}")


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    cloud = sub.add_parser("cloud", help="cloud workers that run split tails")
    commands = cloud.add_subparsers(dest="cloud_command", metavar="COMMAND")
    serve = commands.add_parser(
        "serve", help="serve every split under --artifacts from an MQTT broker",
        description="Load every split directory under --artifacts, join the worker group "
        "on the broker, batch requests dynamically and answer each device. Each flag can "
        "also be set with an environment variable SPLITINFER_<FLAG> (e.g. "
        "SPLITINFER_MAX_BATCH). Exit codes: 0 after a clean drain, 2 bad input, 3 failed "
        "start (broker unreachable, no splits).")
    artifacts = env_default("--artifacts")
    serve.add_argument("--artifacts", default=artifacts, required=artifacts is None,
                       help="a split directory or a folder of them (written by "
                       "'splitinfer split') [SPLITINFER_ARTIFACTS]")
    serve.add_argument("--broker", default=_env("--broker", "mqtt://127.0.0.1:1883"),
                       help="mqtt[s]://[user[:password]@]HOST[:PORT][?options] "
                       "[SPLITINFER_BROKER]")
    group = serve.add_mutually_exclusive_group()
    group.add_argument("--group", default=_env("--group", DEFAULT_GROUP),
                       help="shared-subscription group; replicas in one group split the "
                       "load (default %(default)s) [SPLITINFER_GROUP]")
    group.add_argument("--no-group", dest="group", action="store_const", const="",
                       help="plain subscription, for brokers without $share (amqtt, "
                       "RabbitMQ, NATS); without it the worker probes the group and falls "
                       "back to this with a warning where $share does not deliver")
    serve.add_argument("--prefix", default=_env("--prefix", DEFAULT_PREFIX),
                       help="topic prefix (default %(default)s) [SPLITINFER_PREFIX]")
    serve.add_argument("--max-batch", type=int, default=_env("--max-batch", 32),
                       help="most samples per tail run (default %(default)s; 1 disables "
                       "batching) [SPLITINFER_MAX_BATCH]")
    serve.add_argument("--max-delay-ms", type=float, default=_env("--max-delay-ms", 2.0),
                       help="longest a request waits for company (default %(default)s) "
                       "[SPLITINFER_MAX_DELAY_MS]")
    serve.add_argument("--queue-size", type=int, default=_env("--queue-size", 1024),
                       help="requests waiting, beyond which the worker answers OVERLOADED "
                       "(default %(default)s) [SPLITINFER_QUEUE_SIZE]")
    serve.add_argument("--threads", type=int, default=_env("--threads", 0),
                       help="onnxruntime intra-op threads per tail; 0 = measured per tail "
                       "at load: one per usable CPU where that is faster, else 1 "
                       "[SPLITINFER_THREADS]")
    serve.add_argument("--spinning", choices=SPINNING, default=_env("--spinning", "run"),
                       help="when the tails' pool threads spin for work: run (only during "
                       "a run), always (onnxruntime's default: also tens of ms after each "
                       "run, a core busy meanwhile), off (never: each op wakes them) "
                       "(default %(default)s) [SPLITINFER_SPINNING]")
    serve.add_argument("--tail-workers", type=int, default=_env("--tail-workers", 1),
                       help="tail runs at once (default %(default)s) [SPLITINFER_TAIL_WORKERS]")
    serve.add_argument("--inline", action=argparse.BooleanOptionalAction,
                       default=env_default("--inline"),
                       help="run a lone request at low load on the event loop that received "
                       "it, not on a tail thread (two thread wake-ups fewer); under load "
                       "requests queue and batch as always (default on) "
                       "[SPLITINFER_INLINE=1|0]")
    serve.add_argument("--providers", default=_env("--providers", ""),
                       help="comma-separated onnxruntime execution providers (default: CUDA "
                       "when available, else CPU) [SPLITINFER_PROVIDERS]")
    serve.add_argument("--max-payload", type=int, default=_env("--max-payload", None),
                       help="largest request in bytes (default 8 MiB) [SPLITINFER_MAX_PAYLOAD]")
    serve.add_argument("--drain-timeout", type=float, default=_env("--drain-timeout", 30.0),
                       help="seconds to finish the queue on SIGTERM [SPLITINFER_DRAIN_TIMEOUT]")
    serve.add_argument("--metrics-interval", type=float,
                       default=_env("--metrics-interval", 30.0),
                       help="seconds between metric log lines at INFO, 0 = never "
                       "[SPLITINFER_METRICS_INTERVAL]")
    serve.add_argument("--client-id", default=_env("--client-id", None),
                       help="MQTT client id (default: unique per process) "
                       "[SPLITINFER_CLIENT_ID]")
    serve.add_argument("--worker-id", default=_env("--worker-id", ""),
                       help="stable identity: the MQTT client id, and a persistent session "
                       "(MQTT 5 clean_start=false + session expiry; 3.1.1 clean_session="
                       "false) so a restart within --session-expiry gets what the broker "
                       "queued; default: a random client id, clean session "
                       "[SPLITINFER_WORKER_ID]")
    serve.add_argument("--session-expiry", type=float, default=_env("--session-expiry", 60.0),
                       help="seconds the broker keeps the session of a worker that went "
                       "away (with --worker-id; default %(default)s) [SPLITINFER_SESSION_EXPIRY]")
    serve.add_argument("--heartbeat", type=float, default=_env("--heartbeat", 1.0),
                       help="seconds between retained heartbeats on {prefix}/v1/workers/ID, "
                       "0 = none (default %(default)s) [SPLITINFER_HEARTBEAT]")
    serve.add_argument("--fence-after", type=float, default=_env("--fence-after", 3.0),
                       help="fence a peer worker silent for this long: take over its client "
                       "id so the broker drops its connection and share; 0 = never "
                       "(default %(default)s) [SPLITINFER_FENCE_AFTER]")
    serve.add_argument("--dedupe", type=int, default=_env("--dedupe", 4096),
                       help="recent results kept to answer a retried request id again "
                       "without running it twice, 0 = none (default %(default)s) "
                       "[SPLITINFER_DEDUPE]")
    serve.add_argument("--metrics-port", type=int, default=_env("--metrics-port", 0),
                       help="serve /metrics (Prometheus), /healthz and /readyz over HTTP on "
                       "this port, 0 = off (default %(default)s) [SPLITINFER_METRICS_PORT]")
    serve.add_argument("--metrics-host", default=_env("--metrics-host", "127.0.0.1"),
                       help="address the metrics endpoint binds (default %(default)s; "
                       "0.0.0.0 for a scraper on another host) [SPLITINFER_METRICS_HOST]")
    serve.add_argument("--reload", action=argparse.BooleanOptionalAction,
                       default=env_default("--reload"),
                       help="follow --artifacts while serving: a split directory that "
                       "appears, changes or goes is loaded, swapped in or removed without "
                       "dropping a request (default on) [SPLITINFER_RELOAD=1|0]")
    serve.add_argument("--reload-interval", type=float,
                       default=_env("--reload-interval", 1.0),
                       help="seconds between scans of --artifacts (default %(default)s) "
                       "[SPLITINFER_RELOAD_INTERVAL]")
    serve.add_argument("--reload-settle", type=float, default=_env("--reload-settle", 1.0),
                       help="seconds a changed split directory must stay unchanged before it "
                       "is loaded: a copy still being written is never loaded (default "
                       "%(default)s) [SPLITINFER_RELOAD_SETTLE]")
    serve.set_defaults(func=_serve)

    def usage(_args: argparse.Namespace) -> int:
        cloud.print_help()
        return 2

    cloud.set_defaults(func=usage)


def config_from_args(args: argparse.Namespace) -> Config:
    """The :class:`~cloud_service.config.Config` the flags describe."""
    from cloud_service.config import Config

    fields: dict[str, Any] = dict(
        artifacts=args.artifacts, broker=args.broker, group=args.group, prefix=args.prefix,
        max_batch=args.max_batch, max_delay_ms=args.max_delay_ms, queue_size=args.queue_size,
        threads=args.threads, spinning=args.spinning, tail_workers=args.tail_workers,
        inline=_flag_bool(args.inline, "--inline", True),
        providers=tuple(p.strip() for p in args.providers.split(",") if p.strip()),
        drain_timeout_s=args.drain_timeout, metrics_interval_s=args.metrics_interval,
        worker_id=args.worker_id or "", session_expiry_s=args.session_expiry,
        heartbeat_s=args.heartbeat, fence_after_s=args.fence_after, dedupe_size=args.dedupe,
        metrics_port=args.metrics_port, metrics_host=args.metrics_host,
        reload=_flag_bool(args.reload, "--reload", True), reload_interval_s=args.reload_interval,
        reload_settle_s=args.reload_settle,
    )
    if args.max_payload is not None:
        fields["max_payload"] = args.max_payload
    if args.client_id:
        fields["client_id"] = args.client_id
    return Config(**fields)


def _serve(args: argparse.Namespace) -> int:
    from cloud_service.server import Server
    from splitinfer.errors import StartupError

    def ready(server: Server) -> None:
        # stdout, without -v: the one sign for a person or a script that it is serving
        print(server.ready_line(), flush=True)

    config = config_from_args(args)
    server = Server(config, on_started=ready, tune_gc=True)
    http = None
    if config.metrics_port:
        from cloud_service.http import MetricsHTTP

        try:
            http = MetricsHTTP(server.metrics.registry, server.readiness,
                               host=config.metrics_host, port=config.metrics_port).start()
        except OSError as exc:
            raise StartupError(f"cannot serve metrics on {config.metrics_host}:"
                               f"{config.metrics_port}: {exc}") from exc
    try:
        server.run()
    finally:
        if http is not None:
            http.stop()
    return 0 if server.drained_cleanly is not False else 1

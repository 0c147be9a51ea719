"""MQTT topic names. One place, so a broker ACL and the code agree.

=========================================  ===========================================
``{prefix}/v1/req/{model}/{device_id}``    a device's requests (device: publish only)
``{prefix}/v1/res/{device_id}``            its results (device: subscribe only)
``{prefix}/v1/status/{device_id}``         presence, retained; last will = offline
``$share/{group}/{prefix}/v1/req/{model}/+``  what a worker group subscribes to
``{prefix}/v1/workers/{worker_id}``        a worker's heartbeat, retained (workers only)
=========================================  ===========================================

A mosquitto ACL that confines each device to its own topics (``%c`` = client id = device id)::

    pattern write splitinfer/v1/req/+/%c
    pattern read  splitinfer/v1/res/%c
    pattern write splitinfer/v1/status/%c

Every level we put in a topic (prefix levels, model, device id, group) is letters, digits,
``_`` and ``-`` only (:func:`check_level`); names that come from elsewhere (a model file's
name, ``digits_cnn.int8``) go through :func:`topic_name` first. NATS' MQTT gateway, for
one, refuses a ``.`` in a topic.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from splitinfer.errors import BadInputError

__all__ = ["Topics", "check_level", "topic_name", "DEFAULT_PREFIX", "DEFAULT_GROUP"]

DEFAULT_PREFIX = "splitinfer"
DEFAULT_GROUP = "splitinfer-workers"
# What every broker takes in a topic level. MQTT itself allows almost anything, but NATS'
# MQTT gateway maps '/' to '.' and so refuses '.', ' ', '>' and '*' (its subject
# separators and wildcards); the portable set is letters, digits, '_' and '-'.
_LEVEL = re.compile(r"[A-Za-z0-9_-]+")
_NOT_LEVEL = re.compile(r"[^A-Za-z0-9_-]")


def topic_name(text: str) -> str:
    """``text`` as a topic level every broker accepts: other characters become ``_``.

    ``"digits_cnn.int8"`` → ``"digits_cnn_int8"``. The model level of the request topics
    is ``topic_name(manifest.model)`` on both sides (device and worker).
    """
    cleaned = _NOT_LEVEL.sub("_", text)
    return cleaned or "_"


def check_level(value: str, what: str) -> str:
    """A single topic level: non-empty, only letters, digits, '_' and '-'."""
    if not isinstance(value, str) or not _LEVEL.fullmatch(value):
        bad = sorted(set(_NOT_LEVEL.findall(value))) if isinstance(value, str) else []
        found = f" (it contains {''.join(bad)!r})" if bad else ""
        raise BadInputError(
            f"{what} {value!r} is not usable as an MQTT topic level{found}; expected a "
            "non-empty name of letters, digits, '_' and '-' (no '.', space, '/', '+', '#', "
            "'*', '>': NATS and others refuse them)")
    return value


@dataclass(frozen=True)
class Topics:
    prefix: str = DEFAULT_PREFIX

    def __post_init__(self) -> None:
        if not self.prefix or not all(_LEVEL.fullmatch(level)
                                      for level in self.prefix.split("/")):
            raise BadInputError(f"topic prefix {self.prefix!r}: expected one or more levels "
                                "of letters, digits, '_' and '-' separated by '/' (no "
                                "wildcards, no '.', no leading '$' or '/', no trailing '/')")

    def request(self, model: str, device_id: str) -> str:
        return (f"{self.prefix}/v1/req/{check_level(model, 'model name')}/"
                f"{check_level(device_id, 'device id')}")

    def result(self, device_id: str) -> str:
        return f"{self.prefix}/v1/res/{check_level(device_id, 'device id')}"

    def status(self, device_id: str) -> str:
        return f"{self.prefix}/v1/status/{check_level(device_id, 'device id')}"

    def worker_status(self, worker_id: str) -> str:
        """A worker's retained heartbeat (JSON; see cloud_service.heartbeat)."""
        return f"{self.prefix}/v1/workers/{check_level(worker_id, 'worker id')}"

    def worker_status_filter(self) -> str:
        return f"{self.prefix}/v1/workers/+"

    def parse_worker_status(self, topic: str) -> str | None:
        """The worker id of a heartbeat topic, or None if it is not one."""
        head = f"{self.prefix}/v1/workers/"
        if not topic.startswith(head):
            return None
        rest = topic[len(head):]
        return rest if _LEVEL.fullmatch(rest) else None

    def request_filter(self, model: str = "+") -> str:
        if model != "+":
            check_level(model, "model name")
        return f"{self.prefix}/v1/req/{model}/+"

    def shared_request_filter(self, group: str = DEFAULT_GROUP, model: str = "+") -> str:
        return f"$share/{check_level(group, 'group name')}/{self.request_filter(model)}"

    def parse_request(self, topic: str) -> tuple[str, str] | None:
        """(model, device_id) of a request topic, or None if it is not one."""
        head = f"{self.prefix}/v1/req/"
        if not topic.startswith(head):
            return None
        rest = topic[len(head):].split("/")
        if len(rest) != 2 or not all(rest):
            return None
        return rest[0], rest[1]

"""MQTT topic names. One place, so a broker ACL and the code agree.

=========================================  ===========================================
``{prefix}/v1/req/{model}/{device_id}``    a device's requests (device: publish only)
``{prefix}/v1/res/{device_id}``            its results (device: subscribe only)
``{prefix}/v1/status/{device_id}``         presence, retained; last will = offline
``$share/{group}/{prefix}/v1/req/{model}/+``  what a worker group subscribes to
=========================================  ===========================================

A mosquitto ACL that confines each device to its own topics (``%c`` = client id = device id)::

    pattern write splitinfer/v1/req/+/%c
    pattern read  splitinfer/v1/res/%c
    pattern write splitinfer/v1/status/%c
"""

from __future__ import annotations

from dataclasses import dataclass

from splitinfer.errors import BadInputError

__all__ = ["Topics", "check_level", "DEFAULT_PREFIX", "DEFAULT_GROUP"]

DEFAULT_PREFIX = "splitinfer"
DEFAULT_GROUP = "splitinfer-workers"
_BAD = set("/+#\0")


def check_level(value: str, what: str) -> str:
    """A single topic level: non-empty, no '/', '+', '#', NUL, not starting with '$'."""
    if not value or _BAD & set(value) or value.startswith("$"):
        raise BadInputError(f"{what} {value!r} is not usable as an MQTT topic level; expected a "
                            "non-empty name without '/', '+', '#' or a leading '$'")
    return value


@dataclass(frozen=True)
class Topics:
    prefix: str = DEFAULT_PREFIX

    def __post_init__(self) -> None:
        if not self.prefix or "+" in self.prefix or "#" in self.prefix or \
                self.prefix.startswith(("/", "$")) or self.prefix.endswith("/"):
            raise BadInputError(f"topic prefix {self.prefix!r}: expected levels without "
                                "wildcards, no leading '$' or '/', no trailing '/'")

    def request(self, model: str, device_id: str) -> str:
        return (f"{self.prefix}/v1/req/{check_level(model, 'model name')}/"
                f"{check_level(device_id, 'device id')}")

    def result(self, device_id: str) -> str:
        return f"{self.prefix}/v1/res/{check_level(device_id, 'device id')}"

    def status(self, device_id: str) -> str:
        return f"{self.prefix}/v1/status/{check_level(device_id, 'device id')}"

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

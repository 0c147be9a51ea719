"""``python -m simulators.shaper``: serve a shaping proxy, ``--selftest`` its fidelity,
``--load N`` its CPU cost. Kept apart from :mod:`simulators.shaper` (the library)."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import math
import random

from simulators.shaper import ShapingProxy
from splitinfer.errors import StartupError
from splitinfer.link import LinkProfile

__all__ = ["main"]


async def _one_way_times(profile: LinkProfile, nbytes: int, reps: int) -> tuple[float, float]:
    """Median up and down times of ``nbytes`` over ``profile`` against a local TCP peer."""
    loop = asyncio.get_running_loop()
    arrived: asyncio.Queue[float] = asyncio.Queue()
    sent: asyncio.Queue[float] = asyncio.Queue()
    peer_done = asyncio.Event()

    async def peer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            while True:
                await reader.readexactly(nbytes)
                arrived.put_nowait(loop.time())
                sent.put_nowait(loop.time())
                writer.write(bytes(nbytes))
        writer.close()
        peer_done.set()

    server = await asyncio.start_server(peer, "127.0.0.1", 0)
    ups: list[float] = []
    downs: list[float] = []
    async with server, ShapingProxy(profile, upstream=("127.0.0.1", server.sockets[0]
                                                       .getsockname()[1]), seed=0) as proxy:
        reader, writer = await asyncio.open_connection(proxy.host, proxy.port)
        for _ in range(reps):
            t0 = loop.time()
            writer.write(bytes(nbytes))
            await reader.readexactly(nbytes)
            t2 = loop.time()
            ups.append(await arrived.get() - t0)
            downs.append(t2 - await sent.get())
            await asyncio.sleep(profile.delay_s * 2 + 0.01)  # let the link go idle
        writer.close()
        await peer_done.wait()
    ups.sort()
    downs.sort()
    return ups[reps // 2], downs[reps // 2]


async def _mqtt_times(profile: LinkProfile, nbytes: int, reps: int,
                      broker: tuple[str, int]) -> tuple[float, float]:
    """Median times of an ``nbytes`` QoS1 publish from behind ``profile`` to a subscriber
    on the broker's side, and to one behind the same profile."""
    from splitinfer.mqtt import BrokerConfig
    from splitinfer.mqtt_client import MqttClient, open_client

    loop = asyncio.get_running_loop()

    async def arrival(client: MqttClient) -> float:
        async with contextlib.aclosing(client.messages()) as inbox:
            async for _ in inbox:
                return loop.time()
        return math.nan

    ups: list[float] = []
    rounds: list[float] = []
    async with ShapingProxy(profile, upstream=broker, seed=0) as link:
        clients = [await open_client(BrokerConfig(host=h, port=p), f"selftest-{i}")
                   for i, (h, p) in enumerate([link.address, broker, link.address])]
        device, direct, remote = clients
        try:
            for client in (direct, remote):
                await client.subscribe("selftest/act", qos=1)
            await asyncio.sleep(2 * profile.rtt_s + 0.01)
            for _ in range(reps):
                at_direct = loop.create_task(arrival(direct))
                at_remote = loop.create_task(arrival(remote))
                t0 = loop.time()
                await device.publish("selftest/act", bytes(nbytes), qos=1)
                ups.append(await at_direct - t0)
                rounds.append(await at_remote - t0)
                await asyncio.sleep(2 * profile.rtt_s + 0.01)
        finally:
            for client in clients:
                await client.disconnect()
    ups.sort()
    rounds.sort()
    return ups[reps // 2], rounds[reps // 2]


async def _selftest(nbytes: int, reps: int, mqtt: bool) -> int:
    from splitinfer.link import PROFILES

    broker = None
    if mqtt:
        from simulators.support.broker import MosquittoBroker

        broker = MosquittoBroker()
        await asyncio.to_thread(broker.start)
    print(f"{'profile':8} {'path':18} {'expected ms':>12} {'measured ms':>12} {'error':>7}")
    worst = 0.0
    try:
        for name, profile in PROFILES.items():
            up, down = await _one_way_times(profile, nbytes, reps)
            up_s, down_s = profile.transfer_s(nbytes, "up"), profile.transfer_s(nbytes, "down")
            rows = [("tcp up", up_s, up), ("tcp down", down_s, down)]
            if broker is not None:
                m_up, m_both = await _mqtt_times(profile, nbytes, reps,
                                                 (broker.host, broker.port))
                rows += [("mqtt up", up_s, m_up), ("mqtt up+down", up_s + down_s, m_both)]
            for path, expected, measured in rows:
                err = measured / expected - 1
                if expected > 0.01:  # a loopback's ~1 ms of noise swamps the lan figures
                    worst = max(worst, abs(err))
                print(f"{name:8} {path:18} {expected * 1e3:12.2f} {measured * 1e3:12.2f} "
                      f"{err:+7.1%}")
    finally:
        if broker is not None:
            broker.close()
    print(f"{nbytes} bytes, median of {reps}; worst error beyond lan {worst:.1%}")
    return 0 if worst <= 0.10 else 1


def _cpu_s(pid: int) -> float:
    import os

    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def _load(n: int, seconds: float, size: int, spec: str) -> int:
    """``n`` connections x 1 message/s of ``size`` bytes, echoed; the proxy in a child."""
    import sys

    loop = asyncio.get_running_loop()

    class Echo(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.transport: asyncio.Transport = transport  # type: ignore[assignment]

        def data_received(self, data: bytes) -> None:
            self.transport.write(data)

    rtts: list[float] = []

    class Device(asyncio.Protocol):
        def __init__(self) -> None:
            self.sent: collections.deque[float] = collections.deque()
            self.got = 0

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.transport: asyncio.Transport = transport  # type: ignore[assignment]

        def data_received(self, data: bytes) -> None:
            self.got += len(data)
            while self.got >= size:
                self.got -= size
                rtts.append(loop.time() - self.sent.popleft())

        def send(self) -> None:
            self.sent.append(loop.time())
            self.transport.write(bytes(size))

    server = await loop.create_server(Echo, "127.0.0.1", 0, backlog=4096)
    port = server.sockets[0].getsockname()[1]
    child = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "simulators.shaper", "--profile", spec, "--upstream",
        f"127.0.0.1:{port}", stdout=asyncio.subprocess.PIPE)
    assert child.stdout is not None
    line = (await child.stdout.readline()).decode().split()
    proxy_port = int(line[-1].rsplit(":", 1)[1])
    devices = []
    for _ in range(n):
        _, device = await loop.create_connection(Device, "127.0.0.1", proxy_port)
        devices.append(device)
    rng = random.Random(0)
    cpu0, t0 = _cpu_s(child.pid), loop.time()
    timers = []

    def tick(device: Device) -> None:
        device.send()
        timers.append(loop.call_later(1.0, tick, device))

    for device in devices:
        timers.append(loop.call_later(rng.random(), tick, device))
    await asyncio.sleep(seconds)
    cpu = _cpu_s(child.pid) - cpu0
    wall = loop.time() - t0
    for timer in timers:
        timer.cancel()
    child.terminate()
    await child.wait()
    server.close()
    rtts.sort()
    profile = LinkProfile.parse(spec)
    floor = profile.transfer_s(size, "up") + profile.transfer_s(size, "down")

    def pick(q: float) -> float:
        return rtts[min(len(rtts) - 1, int(q * len(rtts)))] * 1e3 if rtts else math.nan

    print(f"{n} connections x 1 msg/s x {size} B over {spec} for {wall:.1f} s: "
          f"{len(rtts)} echoes, proxy CPU {cpu / wall:.1%} of one core "
          f"({cpu / max(1, len(rtts)) * 1e6:.0f} us per echo, both directions)")
    print(f"echo RTT p50 {pick(0.5):.2f} ms, p99 {pick(0.99):.2f} ms, max {pick(1.0):.2f} ms; "
          f"floor {floor * 1e3:.2f} ms")
    return 0


async def _serve(spec: str, upstream: tuple[str, int], listen: tuple[str, int],
                 seed: int | None) -> None:
    import json
    import signal
    import sys

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with ShapingProxy(spec, upstream=upstream, host=listen[0], port=listen[1],
                            seed=seed) as proxy:
        print(f"{proxy.name} listening {proxy.host}:{proxy.port}", flush=True)
        await stop.wait()
        print(json.dumps(proxy.stats.as_dict()), file=sys.stderr)


def _hostport(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host or "127.0.0.1", int(port)


def main(argv: list[str] | None = None) -> int:
    import argparse

    from splitinfer.errors import BadInputError

    parser = argparse.ArgumentParser(prog="python -m simulators.shaper",
                                     description="Serve a shaping proxy, or check one.")
    parser.add_argument("--profile", default="4g", help="profile name or spec (default 4g)")
    parser.add_argument("--upstream", type=_hostport, help="HOST:PORT of the broker")
    parser.add_argument("--listen", type=_hostport, default=("127.0.0.1", 0),
                        help="HOST:PORT to listen on (default a free loopback port)")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--selftest", action="store_true",
                        help="measured against expected transfer times for each named profile")
    parser.add_argument("--bytes", type=int, default=100_000, help="selftest payload size")
    parser.add_argument("--reps", type=int, default=3, help="selftest repetitions")
    parser.add_argument("--no-mqtt", action="store_true",
                        help="selftest raw TCP only (no mosquitto round trips)")
    parser.add_argument("--load", type=int, metavar="N",
                        help="CPU cost of the proxy for N connections x 1 msg/s")
    parser.add_argument("--seconds", type=float, default=20.0, help="load test length")
    parser.add_argument("--size", type=int, default=1000, help="load test message size")
    args = parser.parse_args(argv)
    try:
        if args.selftest:
            return asyncio.run(_selftest(args.bytes, args.reps, not args.no_mqtt))
        if args.load:
            return asyncio.run(_load(args.load, args.seconds, args.size, args.profile))
        if not args.upstream:
            parser.error("--upstream HOST:PORT is needed to serve (or give --selftest)")
        asyncio.run(_serve(args.profile, args.upstream, args.listen, args.seed))
    except (BadInputError, StartupError) as exc:
        print(f"error: {exc}")
        return exc.exit_code
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

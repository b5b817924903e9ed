"""p2p_direct: a direct peer link against a plain TLS echo, each between two processes on loopback.

Ours: both ends are Twisted with p2pchat.tls (TLS 1.3, both sides present P-256 certificates,
each pins the other's key); the echo end parses every JSON line and sends it back re-encoded
with the codec of a peer's links (p2pchat.wire), as a peer parses every frame. Baseline: Python
C{ssl}, TLS 1.3 with client certificates too, the echo end returns the bytes it reads without
looking at them.

Run by bench.run: C{python -m bench.p2p serve-ours|serve-plain PORT DIR} is the echo end,
C{python -m bench.p2p CONFIG_JSON} the measuring end (mark protocol, see bench.loadgen).
"""

from __future__ import annotations

import json
import socket
import ssl
import sys
import threading
import time
from pathlib import Path
from typing import Any

from bench.codecs import latency_summary
from bench.procs import driver_mark, free_port
from bench.servers import Server

ECHO_NAME, CLIENT_NAME = "echo", "client"
# How a bulk frame starts, in the echo's re-encoding too (it keeps the order of the keys).
BULK_PREFIX = b'{"type":"bulk",'


def _frame(kind: str, number: int, size: int) -> bytes:
    """One JSON line of C{size} bytes or a little more, carrying its send time."""
    head = {"type": kind, "n": number, "t": time.perf_counter_ns()}
    return json.dumps({**head, "body": "x" * max(0, size - 48)}, separators=(",", ":")).encode() + b"\n"


# -- ours: Twisted and p2pchat.tls ---------------------------------------------------------


def serve_ours(port: int, directory: Path) -> None:
    from twisted.internet import reactor
    from twisted.internet.protocol import Factory
    from twisted.protocols.basic import LineOnlyReceiver
    from twisted.protocols.tls import TLSMemoryBIOFactory

    from p2pchat.crypto import load_or_create_identity
    from p2pchat.tls import peer_listener_options
    from p2pchat.wire import dumps_line, loads_line

    class Echo(LineOnlyReceiver):
        delimiter = b"\n"
        MAX_LENGTH = 1 << 20

        def connectionMade(self) -> None:
            self.transport.setTcpNoDelay(True)

        def lineReceived(self, line: bytes) -> None:
            self.transport.write(dumps_line(loads_line(line)))

    identity = load_or_create_identity(str(directory), ECHO_NAME, "bench echo")
    factory = TLSMemoryBIOFactory(peer_listener_options(identity), False, Factory.forProtocol(Echo))
    reactor.listenTCP(port, factory, interface="127.0.0.1")
    reactor.run()


def client_ours(config: dict) -> None:
    from twisted.internet import reactor
    from twisted.internet.defer import Deferred
    from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol, wrapClientTLS
    from twisted.internet.stdio import StandardIO
    from twisted.logger import (
        FilteringLogObserver,
        LogLevel,
        LogLevelFilterPredicate,
        globalLogBeginner,
        textFileLogObserver,
    )
    from twisted.protocols.basic import LineOnlyReceiver

    from bench.loadgen import Control, bounded, cpu_s
    from p2pchat.crypto import load_or_create_identity
    from p2pchat.tls import peer_connector_creator

    class Measure(LineOnlyReceiver):
        delimiter = b"\n"
        MAX_LENGTH = 1 << 20

        def __init__(self, low_water: int) -> None:
            self.waiter: Deferred | None = None
            self.rtts: list[int] = []
            self.echoed = 0
            self.sent = 0
            self.low_water = low_water

        def connectionMade(self) -> None:
            self.transport.setTcpNoDelay(True)

        def lineReceived(self, line: bytes) -> None:
            # Bulk echoes are counted, not parsed, as the baseline's client does.
            bulk = line.startswith(BULK_PREFIX)
            if bulk:
                self.echoed += len(line) + 1
                self.sent -= 1
            else:
                self.rtts.append(time.perf_counter_ns() - json.loads(line)["t"])
            # Bulk: refill once half the window has come back, in one write.
            if not bulk or self.sent <= self.low_water:
                waiter, self.waiter = self.waiter, None
                if waiter is not None:
                    waiter.callback(None)

        def wait(self) -> Deferred:
            self.waiter = Deferred()
            return self.waiter

    async def run(control: Control) -> dict:
        directory = config["dir"]
        identity = load_or_create_identity(directory, CLIENT_NAME, "bench client")
        echo = load_or_create_identity(directory, ECHO_NAME, "bench echo")
        endpoint = wrapClientTLS(
            peer_connector_creator(identity, echo.fingerprint),
            TCP4ClientEndpoint(reactor, "127.0.0.1", config["port"]),
        )
        link = await bounded(connectProtocol(endpoint, Measure(config["window"] // 2)), 30)
        await control.mark("rtt_start")
        for number in range(config["round_trips"]):
            done = link.wait()
            link.transport.write(_frame("rtt", number, 64))
            await bounded(done, 30)
        await control.mark("bulk_start")
        started = time.monotonic()
        total, window, size = config["bulk_messages"], config["window"], config["size"]
        queued = 0
        while queued < total or link.sent:
            burst = []
            while link.sent < window and queued < total:
                burst.append(_frame("bulk", queued, size))
                link.sent += 1
                queued += 1
            if burst:
                link.transport.writeSequence(burst)
            await bounded(link.wait(), 30)
        bulk_s = time.monotonic() - started
        await control.mark("bulk_end")
        link.transport.loseConnection()
        return {**_rtt(link.rtts), "bulk_s": bulk_s, "bulk_bytes": link.echoed, "client_cpu_s": cpu_s()}

    globalLogBeginner.beginLoggingTo([
        FilteringLogObserver(textFileLogObserver(sys.stderr), [LogLevelFilterPredicate(LogLevel.warn)])
    ])
    control = Control()
    StandardIO(control)

    async def main() -> None:
        try:
            outcome = {"result": await run(control)}
        except Exception as e:
            outcome = {"error": f"{type(e).__name__}: {e}"}
        control.finish(outcome)

    reactor.callWhenRunning(lambda: Deferred.fromCoroutine(main()))
    reactor.callLater(config.get("deadline_s", 600), reactor.stop)
    reactor.run()


# -- baseline: Python ssl ------------------------------------------------------------------


def _plain_context(directory: Path, server: bool) -> ssl.SSLContext:
    own, other = (ECHO_NAME, CLIENT_NAME) if server else (CLIENT_NAME, ECHO_NAME)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server else ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.load_cert_chain(directory / f"{own}-cert.pem", directory / f"{own}-key.pem")
    # Each side trusts exactly the other's self-signed certificate: mutual authentication.
    context.load_verify_locations(directory / f"{other}-cert.pem")
    context.verify_mode = ssl.CERT_REQUIRED
    context.check_hostname = False
    return context


def serve_plain(port: int, directory: Path) -> None:
    context = _plain_context(directory, server=True)
    listener = socket.create_server(("127.0.0.1", port))

    def echo(raw: socket.socket) -> None:
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            with context.wrap_socket(raw, server_side=True) as conn:
                while data := conn.recv(65536):
                    conn.sendall(data)
        except OSError:  # ssl.SSLError included: bench.run's readiness probe speaks no TLS
            pass

    while True:
        raw, _ = listener.accept()
        threading.Thread(target=echo, args=(raw,), daemon=True).start()


def client_plain(config: dict) -> None:
    context = _plain_context(Path(config["dir"]), server=False)
    raw = socket.create_connection(("127.0.0.1", config["port"]), timeout=30)
    raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    conn = context.wrap_socket(raw)
    reader = conn.makefile("rb")
    driver_mark("rtt_start")
    rtts = []
    for number in range(config["round_trips"]):
        conn.sendall(_frame("rtt", number, 64))
        frame = json.loads(reader.readline())
        rtts.append(time.perf_counter_ns() - frame["t"])
    driver_mark("bulk_start")
    total, window, size = config["bulk_messages"], config["window"], config["size"]
    low_water = window // 2
    echoed = [0, 0]  # messages, bytes
    drained = threading.Condition()

    def read_all() -> None:
        for _ in range(total):
            line = reader.readline()
            with drained:
                echoed[0] += 1
                echoed[1] += len(line)
                drained.notify()

    started = time.monotonic()
    thread = threading.Thread(target=read_all, daemon=True)
    thread.start()
    queued = 0
    # The same pacing as ours: refill the window in one write once half of it has come back.
    while queued < total:
        with drained:
            if not drained.wait_for(lambda: queued - echoed[0] <= low_water, timeout=30):
                raise RuntimeError("no echo for 30 s")
            room = min(window - (queued - echoed[0]), total - queued)
        conn.sendall(b"".join(_frame("bulk", queued + i, size) for i in range(room)))
        queued += room
    thread.join(60)
    bulk_s = time.monotonic() - started
    driver_mark("bulk_end")
    conn.close()
    result = {**_rtt(rtts), "bulk_s": bulk_s, "bulk_bytes": echoed[1], "client_cpu_s": time.process_time()}
    print(json.dumps({"result": result}), flush=True)


def _rtt(rtts: list[int]) -> dict:
    summary = latency_summary(rtts)
    return {"rtt_p50_ms": summary["p50_ms"], "rtt_p99_ms": summary["p99_ms"], "rtt_max_ms": summary["max_ms"]}


# -- bench.run's side ----------------------------------------------------------------------


def run_p2p(bench: Any, side: str, p: dict) -> dict:
    """One p2p_direct run: start the echo end, drive the measuring end, compute the metrics."""
    directory = bench.workdir / bench.name(f"p2p-{side}")
    directory.mkdir()
    if side == "ours":
        from p2pchat.crypto import load_or_create_identity

        load_or_create_identity(str(directory), ECHO_NAME, "bench echo")
        load_or_create_identity(str(directory), CLIENT_NAME, "bench client")
    else:
        from bench.certs import write_certificate

        write_certificate(directory, ECHO_NAME)
        write_certificate(directory, CLIENT_NAME)
    port = free_port()
    mode = "serve-ours" if side == "ours" else "serve-plain"
    server = Server(bench.procs, [sys.executable, "-m", "bench.p2p", mode, str(port), str(directory)],
                    port, bench.workdir / f"{directory.name}-echo.log", directory)
    server.start()
    try:
        config = {**p, "side": side, "port": port, "dir": str(directory)}
        readings, result = bench.drive("bench.p2p", config, server, timeout=600)
    finally:
        server.stop()
    from bench.run import between

    _, echo_cpu, _ = between(readings, "bulk_start", "bulk_end")
    messages = p["bulk_messages"]
    return {
        "bulk_mb_per_s": result["bulk_bytes"] / result["bulk_s"] / 1e6,
        "bulk_msgs_per_s": messages / result["bulk_s"],
        "rtt_p50_ms": result["rtt_p50_ms"],
        "rtt_p99_ms": result["rtt_p99_ms"],
        "rtt_max_ms": result["rtt_max_ms"],
        "echo_cpu_per_msg_us": echo_cpu / messages * 1e6,
        "client_cpu_s": result["client_cpu_s"],
        "bulk_bytes": result["bulk_bytes"],
    }


def main(argv: list[str]) -> None:
    if argv[1] == "serve-ours":
        serve_ours(int(argv[2]), Path(argv[3]))
    elif argv[1] == "serve-plain":
        serve_plain(int(argv[2]), Path(argv[3]))
    else:
        config = json.loads(argv[1])
        (client_ours if config["side"] == "ours" else client_plain)(config)


if __name__ == "__main__":
    main(sys.argv)

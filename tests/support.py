"""Test helpers: real twistd processes, and a small client that speaks PROTOCOL.md."""

from __future__ import annotations

import base64
import os
import re
import sys
from collections import deque

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from twisted.internet import defer, reactor
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.protocol import Factory, ProcessProtocol
from twisted.protocols.basic import LineOnlyReceiver

from p2pchat.wire import Event, decode_frame, encode_request

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT = 30.0


def twistd_argv() -> list[str]:
    """How to run the real twistd of this Python installation."""
    script = os.path.join(os.path.dirname(sys.executable), "twistd")
    if os.path.exists(script):
        return [sys.executable, script]
    return [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]


def subprocess_env(**extra: str) -> dict[str, str]:
    """The environment for a child process that runs this tree's code."""
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO_ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra)
    return env


def fake_keys() -> tuple[str, str]:
    """A (fingerprint, envelope_key) pair as a peer would publish it, for server-only tests."""
    raw = X25519PrivateKey.generate().public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )
    return os.urandom(32).hex(), base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def changes(*events: Event) -> list[tuple[str, str]]:
    """Presence events as (user, "online" or the offline reason) pairs, each event's online first."""
    return [
        pair for event in events
        for pair in [(user, "online") for user in event.fields["online"]] + list(event.fields["offline"].items())
    ]


def with_timeout(d: defer.Deferred, seconds: float = TIMEOUT, what: str = "") -> defer.Deferred:
    return d.addTimeout(seconds, reactor, onTimeoutCancel=lambda *_: _timed_out(what, seconds))


def _timed_out(what: str, seconds: float):
    raise defer.TimeoutError(f"{what or 'waiting'}: nothing after {seconds} s")


class Watcher:
    """Lines of text arriving over time, and Deferreds that fire when a matching one comes."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self._waiting: list[tuple[re.Pattern, int, defer.Deferred]] = []

    def add(self, line: str) -> None:
        self.lines.append(line)
        for entry in list(self._waiting):
            pattern, start, d = entry
            if pattern.search(line):
                self._waiting.remove(entry)
                d.callback(line)

    def wait_for(self, pattern: str, after: int = 0, timeout: float = TIMEOUT) -> defer.Deferred:
        """Fire with the first line from index C{after} on that matches C{pattern}."""
        compiled = re.compile(pattern)
        for line in self.lines[after:]:
            if compiled.search(line):
                return defer.succeed(line)
        d = defer.Deferred()
        self._waiting.append((compiled, after, d))
        return with_timeout(d, timeout, f"line matching {pattern!r}")


class ProcessRunner(ProcessProtocol):
    """A child process whose stdout and stderr lines go to a L{Watcher}."""

    def __init__(self) -> None:
        self.output = Watcher()
        self.exit_code: int | None = None
        self.running = True
        self._end_waiters: list[defer.Deferred] = []
        self._partial = {1: b"", 2: b""}

    def when_ended(self) -> defer.Deferred:
        """A fresh Deferred that fires with the exit code once the process has ended."""
        if not self.running:
            return defer.succeed(self.exit_code)
        d = defer.Deferred()
        self._end_waiters.append(d)
        return d

    def childDataReceived(self, fd: int, data: bytes) -> None:
        buf = self._partial.get(fd, b"") + data
        *lines, self._partial[fd] = buf.split(b"\n")
        for line in lines:
            self.output.add(line.decode("utf-8", "replace"))

    def processEnded(self, reason) -> None:
        if reason.check(ProcessDone):
            self.exit_code = 0
        elif reason.check(ProcessTerminated):
            self.exit_code = reason.value.exitCode
        self.running = False
        waiters, self._end_waiters = self._end_waiters, []
        for d in waiters:
            d.callback(self.exit_code)

    def send_line(self, text: str) -> None:
        self.transport.write(text.encode("utf-8") + b"\n")

    def signal(self, name: str = "TERM") -> None:
        try:
            self.transport.signalProcess(name)
        except Exception:
            pass  # already gone


def start_process(testcase, argv: list[str], env=None, path=None, runner: ProcessRunner | None = None,
                  terminal: bool = False) -> ProcessRunner:
    """Spawn C{argv} (on a pseudo-terminal of its own if C{terminal}); the test kills it (TERM,
    then KILL) and waits for its end on cleanup."""
    runner = runner or ProcessRunner()
    reactor.spawnProcess(runner, argv[0], argv, env=env or subprocess_env(), path=path, usePTY=terminal)

    async def stop():
        if runner.running:
            runner.signal("TERM")
            kill = reactor.callLater(10, runner.signal, "KILL")
            await runner.when_ended()
            if kill.active():
                kill.cancel()

    testcase.addCleanup(lambda: defer.Deferred.fromCoroutine(stop()))
    return runner


class DiscoveryServer:
    """A real C{twistd -n p2pdiscovery} on a loopback ephemeral port."""

    def __init__(self, testcase, data_dir: str, *options: str) -> None:
        self.testcase = testcase
        self.data_dir = data_dir
        self.options = options
        self.process: ProcessRunner | None = None
        self.port: int | None = None
        self.fingerprint: str | None = None
        self.endpoint: str | None = None  # a --port description of the test's own, else loopback TCP
        self.launcher: list[str] = []  # a command twistd's command line is given to, such as a shell

    async def start(self, port: int = 0) -> "DiscoveryServer":
        argv = twistd_argv() + [
            "-n", "--pidfile=", "p2pdiscovery", "--port", self.endpoint or f"tcp:{port}:interface=127.0.0.1",
            "--data-dir", self.data_dir, *self.options,
        ]
        self.process = start_process(self.testcase, self.launcher + argv)
        ready = self.process.output.wait_for(r"p2pdiscovery listening on|cannot start|Traceback")
        ended = self.process.when_ended().addCallback(lambda code: f"exited with {code}")
        first = await defer.DeferredList([ready, ended], fireOnOneCallback=True, fireOnOneErrback=True)
        line = first[0]
        match = re.search(r"listening on 127\.0\.0\.1:(\d+)", line or "")
        if not match:
            raise AssertionError("server did not start:\n" + "\n".join(self.process.output.lines))
        self.port = int(match.group(1))
        fingerprints = [line for line in self.process.output.lines if "certificate fingerprint sha256:" in line]
        if fingerprints:  # logged before "listening"; absent when the server serves no certificate of its own
            self.fingerprint = fingerprints[-1].split("sha256:")[1].strip()
        return self

    async def kill(self, sig: str = "KILL") -> None:
        self.process.signal(sig)
        await with_timeout(self.process.when_ended(), what="server exit")


class LineClient(LineOnlyReceiver):
    """Speaks PROTOCOL.md: numbered requests, replies matched by id, events queued by name."""

    delimiter = b"\n"
    MAX_LENGTH = 1 << 20

    def __init__(self) -> None:
        self._next_id = 0
        self._pending: dict[int, defer.Deferred] = {}
        self.events: deque[Event] = deque()
        self._event_waiters: list[tuple[str, defer.Deferred]] = []
        self.connected_d = defer.Deferred()
        self.lost = defer.Deferred()
        self.raw_replies: list = []

    def connectionMade(self) -> None:
        self.connected_d.callback(self)

    def connectionLost(self, reason) -> None:
        for d in self._pending.values():
            d.errback(reason)
        self._pending.clear()
        if not self.lost.called:
            self.lost.callback(None)

    def lineReceived(self, line: bytes) -> None:
        frame = decode_frame(line)
        if isinstance(frame, Event):
            for entry in self._event_waiters:
                if entry[0] == frame.name:
                    self._event_waiters.remove(entry)
                    entry[1].callback(frame)
                    return
            self.events.append(frame)
        else:
            self.raw_replies.append(frame)
            d = self._pending.pop(frame.id, None)
            if d is not None:
                d.callback(frame)

    def request(self, op: str, **args) -> defer.Deferred:
        self._next_id += 1
        d = defer.Deferred()
        self._pending[self._next_id] = d
        self.transport.write(encode_request(self._next_id, op, **args))
        return with_timeout(d, TIMEOUT, f"reply to {op}")

    def send_raw(self, data: bytes) -> None:
        self.transport.write(data)

    def event(self, name: str, timeout: float = TIMEOUT) -> defer.Deferred:
        """The next event called C{name} (already queued or still to come)."""
        for frame in list(self.events):
            if frame.name == name:
                self.events.remove(frame)
                return defer.succeed(frame)
        d = defer.Deferred()
        self._event_waiters.append((name, d))
        return with_timeout(d, timeout, f"event {name}")

    def queued(self, name: str) -> list[Event]:
        return [f for f in self.events if f.name == name]


class LineClientFactory(Factory):
    protocol = LineClient

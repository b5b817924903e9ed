"""The load generator: one process driving ngircd (IRC), p2pdiscovery (PROTOCOL.md) or bench.relay over TLS.

bench.run starts it as C{python -m bench.loadgen CONFIG_JSON}. It talks to bench.run on stdout, one
JSON object a line: C{{"mark": NAME, ...}}, after which it waits for one JSON line on stdin (so that
bench.run can read the server's CPU time and RSS, or restart it), and at the end C{{"result": {...}}}
or C{{"error": "..."}}. Both servers get the same work: the same users, payloads, windows and pacing.
"""

from __future__ import annotations

import json
import os
import random
import resource
import secrets
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any, Callable

from twisted.internet import defer, reactor, ssl, stdio, task, tcp
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import SSL4ClientEndpoint, TCP4ClientEndpoint, connectProtocol
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.protocol import ProcessProtocol, Protocol
from twisted.logger import (
    FilteringLogObserver,
    Logger,
    LogLevel,
    LogLevelFilterPredicate,
    globalLogBeginner,
    textFileLogObserver,
)
from twisted.protocols.basic import LineOnlyReceiver
from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol
from zope.interface import implementer

from bench.codecs import (
    irc_command,
    irc_privmsg,
    irc_registration,
    latency_summary,
    parse_frame,
    parse_irc,
    parse_payload,
    payload,
    request,
)
from bench.certs import broadcast_signature, user_keys
from bench.ircd import CHANNEL
from p2pchat.discovery.protocol import PromptWrites
from p2pchat.discovery.tap import quiet_collector

log = Logger()

MAX_ACK = 1000
BROADCAST_SIGNATURE = broadcast_signature()

# Writes of at most 2048 bytes. ngircd reads 2048 bytes at a time from GnuTLS and then waits for
# the socket to turn readable again, so the rest of a larger record would sit in GnuTLS's buffer
# until the client writes again. Each write is a TLS record of its own only with the client
# writes "records" and "prompt" (see CLIENT_WRITES); by default Twisted's TLS layer joins the
# writes of one reactor pass into records of up to 16 KiB. (GnuTLS also reads whole records
# ahead; bench.run's keep-alive interval deals with that.)
MAX_RECORD = 2048

# How the load users' writes reach the servers (the same for both):
# - "coalesced": Twisted's client TLS as it comes; a connection's writes of one reactor pass go
#   out together in the next pass, in records of up to 16 KiB, and so do all connections' writes.
# - "records": each write (at most MAX_RECORD bytes) is a TLS record of its own, handed to the
#   socket in the next pass of the reactor, with every other connection's.
# - "prompt": as "records", and each goes to the socket at once, as it would from a client
#   process of its own (one process plays all the load users).
CLIENT_WRITES = ("coalesced", "records", "prompt")


def now_ns() -> int:
    return time.perf_counter_ns()


def password_for(user: str) -> str:
    return f"bench-password-{user}"


def cpu_s() -> float:
    """This process's CPU time, to the nanosecond (C{os.times} counts in ticks of 10 ms)."""
    return time.process_time()


async def sleep(seconds: float) -> None:
    await task.deferLater(reactor, seconds, lambda: None)


async def bounded(d: Deferred, seconds: float) -> Any:
    """Wait for C{d}, at most C{seconds}; C{defer.TimeoutError} after that."""
    return await d.addTimeout(seconds, reactor)


class LoginFailed(Exception):
    """
    The server refused the login, or closed the connection first.

    @ivar code: the server's error code, or C{None} when the connection closed first.
    """

    def __init__(self, code: str | None, message: str) -> None:
        super().__init__(message)
        self.code = code


class Link(Protocol):
    """One load user's connection. Subclasses speak one server's protocol."""

    def __init__(self, load: Load, user: str, password: bool, join: bool) -> None:
        self.load = load
        self.user = user
        self.index = load.index_of(user)
        self.password = password
        self.join = join
        self.online = False
        self._buffer = b""
        self._out: list[bytes] = []
        self._ready: Deferred = Deferred()

    def when_ready(self) -> Deferred:
        """Fires with this link once logged in, or fails with L{LoginFailed}."""
        return self._ready

    def connectionMade(self) -> None:
        self.transport.setTcpNoDelay(True)
        self.start()
        self.flush()

    def dataReceived(self, data: bytes) -> None:
        lines = (self._buffer + data).split(b"\n")
        self._buffer = lines.pop()
        for line in lines:
            self.line_received(line)
        self.after_read()
        self.load.on_after_read(self)
        self.flush()

    def connectionLost(self, reason=None) -> None:
        was_online, self.online = self.online, False
        if not self._ready.called:
            self._ready.errback(LoginFailed(None, f"connection lost before login: {reason.getErrorMessage()}"))
        self.load.link_lost(self, was_online)

    def queue(self, data: bytes) -> None:
        self._out.append(data)

    def flush(self) -> None:
        if self._out:
            data = b"".join(self._out)
            self._out.clear()
            for start in range(0, len(data), MAX_RECORD):
                self.transport.write(data[start : start + MAX_RECORD])

    def logged_in(self) -> None:
        self.online = True
        self.load.link_online(self)
        self._ready.callback(self)

    def login_failed(self, code: str) -> None:
        self.load.counts[f"login_failed_{code}"] += 1
        if not self._ready.called:
            self._ready.errback(LoginFailed(code, f"login refused: {code}"))
        self.transport.loseConnection()

    def after_read(self) -> None:
        """Per-protocol work after a batch of lines (acks)."""

    # Subclasses: start(), line_received(line), send_direct(to, text), send_broadcast(text), ping().


class IrcLink(Link):
    """RFC 2812 client: NICK/USER, PRIVMSG, JOIN, PING/PONG."""

    def start(self) -> None:
        self.queue(irc_registration(self.user))

    def line_received(self, line: bytes) -> None:
        source, command, params = parse_irc(line)
        if command == "PRIVMSG":
            target, text = params[0], params[-1]
            if target.startswith("#"):
                self.load.on_broadcast(self, source, text)
            else:
                self.load.on_direct(self, source, text)
        elif command == "PING":
            self.queue(irc_command("PONG", params[-1]))
        elif command == "JOIN":
            if source != self.user:
                self.load.on_presence(self, source)
        elif command in ("376", "422"):  # end of the MOTD: registered
            if self.join:
                self.queue(irc_command("JOIN", CHANNEL))
            else:
                self.logged_in()
        elif command == "366":  # end of NAMES: our JOIN is complete
            if not self.online:
                self.logged_in()
        elif command[0] in "45" and command.isdigit():
            self.load.counts[f"error_{command}"] += 1
            if not self.online:
                self.login_failed(command)

    def send_direct(self, to: str, text: str) -> None:
        self.queue(irc_privmsg(to, text))

    def send_broadcast(self, text: str) -> None:
        self.queue(irc_privmsg(CHANNEL, text))

    def ping(self) -> None:
        self.queue(b"PING :keepalive\r\n")


class OursLink(Link):
    """PROTOCOL.md client: hello, resume (login with the password when there is no token), send, ack, broadcast."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._next_id = 0
        self._ops: dict[int, str] = {}
        self._calls: dict[int, Deferred] = {}
        self._acks: list[int] = []
        self.anonymous = False

    def request(self, op: str, **arguments: Any) -> int:
        self._next_id += 1
        self._ops[self._next_id] = op
        self.queue(request(self._next_id, op, **arguments))
        return self._next_id

    def call(self, op: str, **arguments: Any) -> Deferred:
        """Send one request now; the Deferred fires with its reply frame (setup work only)."""
        d = Deferred()
        self._calls[self.request(op, **arguments)] = d
        self.flush()
        return d

    def start(self) -> None:
        self.request("hello", protocol=1)
        if self.anonymous:
            return
        token = self.load.tokens.get(self.user)
        if token and not self.password:
            self.request("resume", username=self.user, token=token, port=0)
        else:
            self._login()

    def _login(self) -> None:
        self.load.counts["password_logins"] += 1
        self.request("login", username=self.user, password=password_for(self.user), port=0)

    def line_received(self, line: bytes) -> None:
        frame = parse_frame(line)
        event = frame.get("event")
        if event is None:
            self._reply(frame)
        elif event == "envelope":
            self._acks.append(frame["seq"])
            self.load.on_direct(self, frame["from"], frame["envelope"])
        elif event == "broadcast":
            self.load.on_broadcast(self, frame["from"], frame["text"])
        elif event == "presence":
            for user in frame["online"]:
                self.load.on_presence(self, user)
        elif event == "bye":
            self.load.counts[f"bye_{frame.get('reason')}"] += 1

    def _reply(self, frame: dict) -> None:
        request_id = frame.get("id")
        op = self._ops.pop(request_id, None)
        waiter = self._calls.pop(request_id, None)
        if waiter is not None:
            waiter.callback(frame)
            return
        if frame.get("ok"):
            if op in ("login", "resume"):
                self.load.tokens[self.user] = frame["result"]["token"]
                if self.load.who_after_login:
                    self.request("who")
                self.logged_in()
            elif op == "hello" and self.anonymous:
                self.logged_in()
            else:
                self.load.on_reply(self, op)
            return
        code = frame.get("error", {}).get("code", "?")
        if op == "resume" and code == "invalid_token":
            self.load.counts["token_fallbacks"] += 1
            self._login()
            return
        self.load.counts[f"error_{op}_{code}"] += 1
        if op in ("hello", "login", "resume"):
            self.login_failed(code)
        else:
            self.load.on_error(self, op, code)

    def after_read(self) -> None:
        while self._acks:
            self.request("ack", seqs=self._acks[:MAX_ACK])
            del self._acks[:MAX_ACK]

    def send_direct(self, to: str, text: str) -> None:
        self.load.sent_ids += 1
        self.request("send", to=to, msg_id=f"{self.load.run_id}-{self.load.sent_ids}", envelope=text)

    def send_broadcast(self, text: str) -> None:
        self.request("broadcast", text=text, signature=BROADCAST_SIGNATURE)

    def ping(self) -> None:
        self.request("ping")


class RelayLink(Link):
    """The bare TLS relay's client (bench.relay): logged in once it answers C{ok} to our name."""

    def start(self) -> None:
        self.queue(self.user.encode() + b"\n")

    def line_received(self, line: bytes) -> None:
        if line.startswith(b"<"):
            sender, _, text = line[1:].partition(b" ")
            self.load.on_direct(self, sender.decode(), text.decode())
        elif line.startswith(b"?"):
            self.load.on_error(self, "send", "no_such_user")
        elif self.online:
            self.load.counts["echoes"] += 1
        elif line == b"ok":
            self.logged_in()

    def send_direct(self, to: str, text: str) -> None:
        self.queue(f"@{to} {text}\n".encode())

    def ping(self) -> None:
        # The bytes of our server's keep-alive, so that both carry the same records.
        self.queue(request(0, "ping"))


LINKS: dict[str, type[Link]] = {"irc": IrcLink, "ours": OursLink, "relay": RelayLink}


class RecordPerWriteTLSFactory(TLSMemoryBIOFactory):
    """Client TLS that makes each write a record of its own, at once (no joining of small writes)."""

    protocol = TLSMemoryBIOProtocol


class PromptClient(PromptWrites, tcp.Client):
    """A client connection's TCP transport that sends a write at once (L{PromptWrites})."""


class PromptConnector(tcp.Connector):
    def _makeTransport(self) -> PromptClient:
        return PromptClient(self.host, self.port, self.bindAddress, self, self.reactor)


class _PromptTCP:
    """The C{connectTCP} of L{TCP4ClientEndpoint}'s reactor, with L{PromptClient} transports."""

    def connectTCP(self, host, port, factory, timeout=30.0, bindAddress=None) -> PromptConnector:
        connector = PromptConnector(host, port, factory, timeout, bindAddress, reactor)
        connector.connect()
        return connector


@implementer(IStreamClientEndpoint)
class RecordPerWriteTLSEndpoint:
    """TLS to 127.0.0.1:C{port} with L{RecordPerWriteTLSFactory}, over L{PromptClient} if C{prompt}."""

    def __init__(self, port: int, tls, prompt: bool) -> None:
        self._tcp = TCP4ClientEndpoint(_PromptTCP() if prompt else reactor, "127.0.0.1", port)
        self._tls = tls

    def connect(self, factory) -> Deferred:
        connected = self._tcp.connect(RecordPerWriteTLSFactory(self._tls, True, factory))
        return connected.addCallback(lambda tls: tls.wrappedProtocol)


class Load:
    """
    The load users of one run and what happened to them. Scenarios set the C{on_*} hooks;
    links call them.
    """

    def __init__(
        self, server: str, port: int, tokens_path: str | None, concurrency: int = 10, prefix: str = "b",
        writes: str = "coalesced",
    ) -> None:
        if writes not in CLIENT_WRITES:
            raise ValueError(f"client writes must be one of {CLIENT_WRITES}, not {writes!r}")
        self.link_class = LINKS[server]
        self.port = port
        self.writes = writes
        self.prefix = prefix
        self.tokens_path = Path(tokens_path) if tokens_path else None
        self.tokens: dict[str, str] = (
            json.loads(self.tokens_path.read_text())
            if self.tokens_path and self.tokens_path.exists()
            else {}
        )
        # We measure the servers, not certificate checks: no verification on either side.
        self.tls = ssl.CertificateOptions(verify=False)
        self.counts: Counter[str] = Counter()
        self.online: dict[str, Link] = {}
        self.run_id = secrets.token_hex(4)
        self.sent_ids = 0
        self.closing = False
        # Our users ask who is online after each login, as a peer does (IRC clients here join no
        # channel, so they get no list of names).
        self.who_after_login = False
        self.keeper: task.LoopingCall | None = None
        # One machine plays thousands of clients: without a bound on connection attempts in
        # progress, a herd overflows the servers' listen backlogs (ngircd: 10, Twisted: 50) and
        # what gets measured is the kernel's SYN retransmission back-off (1 s, 3 s, 7 s, ...).
        # 10 at a time connects 2000 users to ngircd fastest here.
        self.attempts = defer.DeferredSemaphore(concurrency)
        self.on_direct: Callable[[Link, str, str], None] = lambda link, sender, text: None
        self.on_broadcast: Callable[[Link, str, str], None] = lambda link, sender, text: None
        self.on_presence: Callable[[Link, str], None] = lambda link, user: None
        self.on_reply: Callable[[Link, str], None] = lambda link, op: None
        self.on_error: Callable[[Link, str, str], None] = lambda link, op, code: None
        self.on_after_read: Callable[[Link], None] = lambda link: None
        self.on_lost: Callable[[Link], None] = lambda link: None

    def users(self, count: int, offset: int = 0) -> list[str]:
        return [f"{self.prefix}{i:05d}" for i in range(offset, offset + count)]

    def index_of(self, user: str) -> int:
        """The number in a load user's name; -1 for other connections (registration)."""
        digits = user[len(self.prefix) :]
        return int(digits) if user.startswith(self.prefix) and digits.isdigit() else -1

    async def connect(
        self, user: str, password: bool = False, join: bool = False, timeout: float = 60.0,
        anonymous: bool = False,
    ) -> Link:
        link = self.link_class(self, user, password, join)
        if anonymous:
            link.anonymous = True
        if self.writes == "coalesced":
            endpoint = SSL4ClientEndpoint(reactor, "127.0.0.1", self.port, self.tls)
        else:
            endpoint = RecordPerWriteTLSEndpoint(self.port, self.tls, prompt=self.writes == "prompt")
        await bounded(connectProtocol(endpoint, link), timeout)
        try:
            return await bounded(link.when_ready(), timeout)
        except BaseException:
            if link.transport is not None:
                link.transport.abortConnection()
            raise

    async def connect_limited(self, user: str, **kwargs: Any) -> Link:
        """L{connect} once one of the C{concurrency} slots for connection attempts is free."""
        return await self.attempts.run(lambda: Deferred.fromCoroutine(self.connect(user, **kwargs)))

    def leave(self, link: Link) -> None:
        """Close a link on purpose (not counted as lost)."""
        link.online = False
        if self.online.get(link.user) is link:
            del self.online[link.user]
        link.transport.loseConnection()

    async def connect_all(self, users: list[str], password: bool = False, join: bool = False) -> list[Link]:
        """Connect and log in every user; failures are counted."""
        results = await defer.DeferredList(
            [Deferred.fromCoroutine(self.connect_limited(user, password=password, join=join)) for user in users],
            consumeErrors=True,
        )
        links = []
        for ok, value in results:
            if ok:
                links.append(value)
            else:
                self.counts["connect_failed"] += 1
                log.warn("connect failed: {why}", why=value.getErrorMessage())
        return links

    def link_online(self, link: Link) -> None:
        self.online[link.user] = link

    def link_lost(self, link: Link, was_online: bool) -> None:
        if self.online.get(link.user) is link:
            del self.online[link.user]
        if was_online and not self.closing:
            self.counts["lost_online"] += 1
            self.on_lost(link)

    def keep_alive(self, interval: float) -> task.LoopingCall:
        """
        Every online link sends a keep-alive every C{interval} seconds, at a random phase of its
        own; returns the running loop.
        """
        due: dict[str, float] = {}

        def tick() -> None:
            now = time.monotonic()
            for user, link in list(self.online.items()):
                if due.setdefault(user, now + random.uniform(0, interval)) <= now:
                    due[user] = now + interval
                    link.ping()
                    link.flush()
                    self.counts["keepalives"] += 1

        loop = task.LoopingCall(tick)
        loop.start(0.25, now=False)
        return loop

    async def close_all(self) -> None:
        self.closing = True
        if self.keeper is not None:
            self.keeper.stop()
        for link in list(self.online.values()):
            link.transport.loseConnection()
        deadline = time.monotonic() + 5
        while self.online and time.monotonic() < deadline:
            await sleep(0.05)

    def save_tokens(self) -> None:
        if self.tokens_path and self.link_class is OursLink:
            scratch = self.tokens_path.with_suffix(".tmp")
            scratch.write_text(json.dumps(self.tokens))
            scratch.replace(self.tokens_path)


class Control(LineOnlyReceiver):
    """The conversation with bench.run over stdin/stdout."""

    delimiter = b"\n"

    def __init__(self) -> None:
        self._waiting: Deferred | None = None

    async def mark(self, name: str, timeout: float = 600.0, **info: Any) -> dict:
        """Report reaching C{name}; return bench.run's answer once it has taken its readings."""
        self._waiting = Deferred()
        self.send({"mark": name, "t": time.monotonic(), "loadgen_cpu_s": cpu_s(), **info})
        return await bounded(self._waiting, timeout)

    def send(self, message: dict) -> None:
        self.sendLine(json.dumps(message).encode())

    def finish(self, message: dict) -> None:
        """Send the last message; the reactor stops once it is written (L{connectionLost})."""
        self.send(message)
        self.transport.loseConnection()

    def lineReceived(self, line: bytes) -> None:
        waiting, self._waiting = self._waiting, None
        if waiting is not None:
            waiting.callback(json.loads(line) if line.strip() else {})

    def connectionLost(self, reason=None) -> None:
        # Our last word is out, or bench.run is gone: nobody is left to talk to.
        if reactor.running:
            reactor.stop()


# -- scenarios -----------------------------------------------------------------------------


class Traffic:
    """
    Timed messages between load users: what each sender has sent and has on the way (sent, not
    yet delivered), what arrived, the latencies. Scenarios bound what is on the way.
    """

    def __init__(self, load: Load, links: list[Link], size: int) -> None:
        self.load = load
        self.links = links
        self.size = size
        self.sent = Counter()
        self.in_flight = Counter()
        self.delivered = 0
        self.failed = 0
        self.latencies: list[int] = []
        self.sent_times: list[int] = []
        self.last_delivery_ns = 0
        self.first_send_ns = 0
        self.dirty: set[int] = set()
        self.done: Deferred | None = None
        self.expected = 0
        load.on_direct = self._delivered
        load.on_broadcast = self._delivered
        load.on_error = self.refused

    def target(self, position: int, number: int) -> Link:
        """Sender at C{position} sends its message C{number} to every other user in turn."""
        n = len(self.links)
        return self.links[(position + 1 + number % (n - 1)) % n]

    def send_direct(self, link: Link, to: str) -> None:
        self.sent[link.index] += 1
        self.in_flight[link.index] += 1
        sent_ns = now_ns()
        self.first_send_ns = self.first_send_ns or sent_ns
        link.send_direct(to, payload(link.index, self.sent[link.index], sent_ns, self.size))

    def record(self, sent_ns: int) -> None:
        """One delivery of a message sent at C{sent_ns}."""
        received = now_ns()
        self.latencies.append(received - sent_ns)
        self.sent_times.append(sent_ns)
        self.last_delivery_ns = received
        self.delivered += 1

    def _delivered(self, link: Link, sender: str, text: str) -> None:
        index, _, sent_ns = parse_payload(text)
        self.record(sent_ns)
        self.in_flight[index] -= 1
        self.dirty.add(index)
        self.check_done()

    def refused(self, link: Link, op: str, code: str) -> None:
        """The server refused a message: it will not arrive."""
        if op == "send":
            self.failed += 1
            self.in_flight[link.index] -= 1
            self.dirty.add(link.index)
            self.check_done()

    def check_done(self) -> None:
        if self.done is not None and not self.done.called and self.delivered + self.failed >= self.expected:
            self.done.callback(None)

    def rate_s(self) -> float:
        elapsed = (self.last_delivery_ns - self.first_send_ns) / 1e9
        return self.delivered / elapsed if elapsed > 0 else 0.0


async def connect_users(load: Load, p: dict, count: int, offset: int = 0, **kwargs) -> list[Link]:
    """Log in C{count} load users from the C{offset}th on; each keeps alive from its login on."""
    if load.keeper is None:
        load.keeper = load.keep_alive(p["keepalive_s"])
    links = await load.connect_all(load.users(count, offset), **kwargs)
    if len(links) < count:
        raise RuntimeError(f"only {len(links)} of {count} users could log in: {dict(load.counts)}")
    return links


async def idle_tls(load: Load, control: Control, p: dict) -> dict:
    await control.mark("start")
    started = time.monotonic()
    links = await connect_users(load, p, p["connections"])
    connect_s = time.monotonic() - started
    # Our server tells everyone of the last logins up to 0.3 ms per user online later (its
    # presence flushes are spaced so: 0.6 s with 2000, 3 s with 10 000): login work, not idling.
    # Both servers get the same pause, and a presence event heard in the idle window is counted.
    await sleep(p["settle_s"])

    def heard(link: Link, user: str) -> None:
        load.counts["presence_while_idle"] += 1

    load.on_presence = heard
    await control.mark("connected")
    await sleep(p["idle_s"])
    await control.mark("idle_end")
    return {"connections": len(links), "connect_s": connect_s, "still_online": len(load.online)}


async def dm_relay_tls(load: Load, control: Control, p: dict) -> dict:
    links = await connect_users(load, p, p["users"])
    traffic = Traffic(load, links, p["size"])
    per_sender, window = p["messages"], p["window"]
    traffic.expected = len(links) * per_sender
    traffic.done = Deferred()

    def refill(position: int) -> None:
        link = links[position]
        while traffic.in_flight[link.index] < window and traffic.sent[link.index] < per_sender:
            traffic.send_direct(link, traffic.target(position, traffic.sent[link.index]).user)
        link.flush()

    positions = {link.index: position for position, link in enumerate(links)}

    def after_read(link: Link) -> None:
        while traffic.dirty:
            refill(positions[traffic.dirty.pop()])

    load.on_after_read = after_read
    await control.mark("start")
    for position in range(len(links)):
        refill(position)
    await _wait_traffic(traffic, p["timeout_s"])
    await control.mark("end")
    return _traffic_result(traffic, "deliveries")


async def paced_latency_tls(load: Load, control: Control, p: dict) -> dict:
    links = await connect_users(load, p, p["users"])
    traffic = Traffic(load, links, p["size"])
    await control.mark("start")
    sends = await bounded(Deferred.fromCoroutine(_paced(traffic, links, p["rate"], p["duration_s"])),
                          p["duration_s"] + 30)
    traffic.expected = sends
    await _wait_traffic(traffic, 10.0)
    await control.mark("end")
    return {**_traffic_result(traffic, "deliveries"), "offered_per_s": sends / p["duration_s"]}


async def _paced(
    traffic: Traffic, senders: list[Link], rate: float, duration: float, until: Deferred | None = None
) -> int:
    """
    Every sender sends C{rate} messages a second on its own schedule, for C{duration} seconds
    and, when given, until C{until} has fired. Returns how many were sent.
    """
    interval = 1.0 / rate
    count = int(rate * duration)
    finished: Deferred = Deferred()
    active = [len(senders)]
    total = [0]

    def send(position: int, link: Link, number: int, due: float) -> None:
        if link.online:
            traffic.send_direct(link, traffic.target(position, number).user)
            link.flush()
            total[0] += 1
        if number + 1 < count or (until is not None and not until.called):
            next_due = due + interval
            reactor.callLater(max(0.0, next_due - time.monotonic()), send, position, link, number + 1, next_due)
        else:
            active[0] -= 1
            if not active[0]:
                finished.callback(None)

    start = time.monotonic()
    for position, link in enumerate(senders):
        due = start + random.uniform(0, interval)
        reactor.callLater(due - start, send, position, link, 0, due)
    await finished
    return total[0]


async def broadcast_tls(load: Load, control: Control, p: dict) -> dict:
    n = p["users"]
    # The phase ends once every two users have heard of each other. IRC tells each pair once (the
    # later JOIN, to the earlier member); ours tells both users who log in within the same presence
    # window about each other, so deliveries alone would end it early.
    presence = [0]
    pairs: set[tuple[str, str]] = set()
    presence_expected = n * (n - 1) // 2
    presence_done: Deferred = Deferred()

    def seen(link: Link, user: str) -> None:
        presence[0] += 1
        pairs.add((link.user, user) if link.user < user else (user, link.user))
        if len(pairs) >= presence_expected and not presence_done.called:
            presence_done.callback(None)

    load.on_presence = seen
    await control.mark("start")
    started = time.monotonic()
    links = await connect_users(load, p, n, join=True)
    try:
        await bounded(presence_done, p["timeout_s"])
    except defer.TimeoutError:
        load.counts["presence_timeout"] += 1
    presence_s = time.monotonic() - started
    await control.mark("presence_end")

    traffic = Traffic(load, links, p["size"])
    per_user = p["broadcasts"]
    traffic.expected = n * per_user * (n - 1)
    traffic.done = Deferred()
    window = p["window"]
    waiting = Counter()  # broadcast (sender, number) -> deliveries still to come
    queue = [(position, number) for number in range(per_user) for position in range(n)]
    queue.reverse()

    def launch() -> None:
        while queue and len(waiting) < window:
            position, number = queue.pop()
            link = links[position]
            traffic.sent[link.index] += 1
            sent_ns = now_ns()
            traffic.first_send_ns = traffic.first_send_ns or sent_ns
            waiting[(link.index, number + 1)] = n - 1
            link.send_broadcast(payload(link.index, number + 1, sent_ns, p["size"]))
            link.flush()

    def delivered(link: Link, sender: str, text: str) -> None:
        index, number, sent_ns = parse_payload(text)
        traffic.record(sent_ns)
        key = (index, number)
        waiting[key] -= 1
        if not waiting[key]:
            del waiting[key]
        traffic.check_done()

    load.on_broadcast = delivered
    load.on_after_read = lambda link: launch()
    # A refused broadcast would keep its window slot: the run then ends at its timeout, and the
    # deliveries it lacks count as lost (the server's limits that could refuse are off).
    load.on_error = lambda link, op, code: None
    launch()
    await _wait_traffic(traffic, p["timeout_s"])
    await control.mark("end")
    return {
        "presence_deliveries": presence[0],
        "presence_pairs": len(pairs),
        "presence_expected": presence_expected,
        "presence_s": presence_s,
        **_traffic_result(traffic, "deliveries"),
    }


async def reconnect_storm(load: Load, control: Control, p: dict) -> dict:
    n = p["users"]
    await connect_users(load, p, n)
    back: Deferred = Deferred()
    retry = p["retry_s"]

    def reconnect(user: str) -> None:
        async def attempt() -> None:
            try:
                await load.connect_limited(user, timeout=10)
            except Exception as e:
                load.counts["reconnect_retries"] += 1
                if isinstance(e, LoginFailed) and e.code is not None:
                    load.counts["failed_logins"] += 1
                reactor.callLater(random.uniform(retry / 2, retry), reconnect, user)
                return
            if len(load.online) >= n and not back.called:
                back.callback(time.monotonic())

        Deferred.fromCoroutine(attempt())

    load.on_lost = lambda link: reactor.callLater(random.uniform(0, retry), reconnect, link.user)
    load.who_after_login = True  # the reconnects and the storm's logins, as peers do
    restart = await control.mark("connected", restart=True)
    try:
        all_back_at = await bounded(back, p["timeout_s"])
    except defer.TimeoutError:
        all_back_at = float("nan")
    result = {
        "users": n,
        "back_online": len(load.online),
        "back_after_start_s": all_back_at - restart["spawned_at"],
        "back_after_ready_s": all_back_at - restart["ready_at"],
        "server_start_s": restart["ready_at"] - restart["spawned_at"],
        "failed_logins": load.counts["failed_logins"],
    }
    await control.mark("back")
    load.on_lost = lambda link: None
    result.update(await _login_storm(load, p))
    await control.mark("end")
    return result


async def _login_storm(load: Load, p: dict) -> dict:
    """
    A password-login storm of other users while the users of a probe process exchange paced
    messages. The probe is a process of its own, so that what the storm costs this process
    (thousands of connections to keep, and on our server their presence events to decrypt and
    parse) does not show up as latency: only what it costs the server does.
    """
    storm_users = load.users(p["storm_users"], offset=p["users"])
    probe_users = load.users(p["paced_users"], offset=p["users"] + p["storm_users"])
    probe = Probe(load, {**p, "offset": p["users"] + p["storm_users"]})
    await bounded(probe.reached("pacing"), p["timeout_s"])
    await sleep(p["calm_s"])
    window = {"start": now_ns()}
    storm_links = await bounded(Deferred.fromCoroutine(load.connect_all(storm_users, password=True)), p["timeout_s"])
    window["end"] = now_ns()
    probe.answer(window)
    result = await bounded(probe.result, p["storm_duration_s"] + 30)
    # Its timeouts and errors count as ours; its CPU time is not ours.
    load.counts.update(result.pop("counts"))
    del result["loadgen_cpu_s"]
    # The probe resumed its users' sessions: keep their new tokens when this process saves its own.
    if load.tokens_path is not None:
        saved = json.loads(load.tokens_path.read_text())
        load.tokens.update((user, saved[user]) for user in probe_users if user in saved)
    return {
        "storm_logins": len(storm_links),
        "storm_login_s": (window["end"] - window["start"]) / 1e9,
        **result,
    }


class Probe(ProcessProtocol):
    """A C{storm_probe} load generator, started and answered by this one as bench.run does."""

    def __init__(self, load: Load, params: dict) -> None:
        self._buffer = b""
        self._marks: dict[str, Deferred] = {}
        self.result: Deferred = Deferred()
        config = {
            "server": "irc" if load.link_class is IrcLink else "ours",
            "port": load.port,
            "tokens": str(load.tokens_path) if load.tokens_path else None,
            "scenario": "storm_probe",
            "params": params,
            "deadline_s": params["timeout_s"] + params["storm_duration_s"] + 60,
        }
        # Its log lines go where ours go.
        reactor.spawnProcess(
            self, sys.executable, [sys.executable, "-m", "bench.loadgen", json.dumps(config)],
            env=os.environ, childFDs={0: "w", 1: "r", 2: 2},
        )

    def reached(self, mark: str) -> Deferred:
        return self._marks.setdefault(mark, Deferred())

    def answer(self, message: dict) -> None:
        self.transport.write(json.dumps(message).encode() + b"\n")

    def outReceived(self, data: bytes) -> None:
        self._buffer += data
        *lines, self._buffer = self._buffer.split(b"\n")
        for line in lines:
            message = json.loads(line)
            if "mark" in message:
                self.reached(message["mark"]).callback(message)
            elif "result" in message:
                self.result.callback(message["result"])
            else:
                self._fail(f"storm probe: {message.get('error')} {message.get('counts', '')}")

    def processEnded(self, reason) -> None:
        self._fail(f"storm probe ended without a result: {reason.value}")

    def _fail(self, why: str) -> None:
        """Whatever still waits on the probe hears why it will not come."""
        for waiting in [*self._marks.values(), self.result]:
            if not waiting.called:
                waiting.errback(RuntimeError(why))


async def storm_probe(load: Load, control: Control, p: dict) -> dict:
    """The probe of L{_login_storm}: paced messages between its users, until told the storm is over."""
    links = await connect_users(load, p, p["paced_users"], offset=p["offset"])
    traffic = Traffic(load, links, p["size"])
    storm_over = Deferred.fromCoroutine(control.mark("pacing", timeout=p["timeout_s"] + p["calm_s"]))
    # Paced traffic goes on until the storm is over, however long it takes.
    pacing = Deferred.fromCoroutine(_paced(traffic, links, p["rate"], p["storm_duration_s"], until=storm_over))
    window = await storm_over
    traffic.expected = await bounded(pacing, p["storm_duration_s"] + 5)
    traffic.done = Deferred()
    traffic.check_done()
    await _wait_traffic(traffic, 10.0)
    calm, during = [], []
    for latency, sent_ns in zip(traffic.latencies, traffic.sent_times):
        if sent_ns < window["start"]:
            calm.append(latency)
        elif sent_ns <= window["end"]:
            during.append(latency)
    calm_summary, storm_summary = latency_summary(calm), latency_summary(during)
    return {
        "storm_p50_ms": storm_summary["p50_ms"],
        "storm_p99_ms": storm_summary["p99_ms"],
        "storm_messages": storm_summary["count"],
        "calm_p50_ms": calm_summary["p50_ms"],
        "calm_p99_ms": calm_summary["p99_ms"],
    }


async def offline_backlog(load: Load, control: Control, p: dict) -> dict:
    """C{senders} users store C{envelopes} for one offline user, who then logs in and takes them all."""
    recipient = load.users(1, offset=p["senders"])[0]
    links = await connect_users(load, p, p["senders"])
    per_sender = p["envelopes"] // len(links)
    total = per_sender * len(links)
    stored = [0]
    failed = [0]
    stored_done: Deferred = Deferred()
    in_flight = Counter()

    def refill(link: Link) -> None:
        while in_flight[link.index] < p["window"] and stored[0] + failed[0] + sum(in_flight.values()) < total:
            in_flight[link.index] += 1
            link.send_direct(recipient, payload(link.index, 0, now_ns(), p["size"]))
        link.flush()

    def replied(link: Link, op: str) -> None:
        if op == "send":
            stored[0] += 1
            in_flight[link.index] -= 1
            _finish_store()

    def error(link: Link, op: str, code: str) -> None:
        if op == "send":
            failed[0] += 1
            in_flight[link.index] -= 1
            _finish_store()

    def _finish_store() -> None:
        if stored[0] + failed[0] >= total and not stored_done.called:
            stored_done.callback(None)

    load.on_reply, load.on_error = replied, error
    await control.mark("store_start")
    # Only now: a read before the mark (a presence event) would otherwise start sending early.
    load.on_after_read = refill
    started = time.monotonic()
    for link in links:
        refill(link)
    await bounded(stored_done, p["timeout_s"])
    store_s = time.monotonic() - started
    await control.mark("store_end")

    received = [0]
    received_done: Deferred = Deferred()

    def delivered(link: Link, sender: str, text: str) -> None:
        received[0] += 1
        if received[0] >= stored[0] and not received_done.called:
            received_done.callback(None)

    load.on_direct = delivered
    load.on_after_read = lambda link: None
    started = time.monotonic()
    await load.connect(recipient)
    try:
        await bounded(received_done, p["timeout_s"])
    except defer.TimeoutError:
        load.counts["deliver_timeout"] += 1
    deliver_s = time.monotonic() - started
    await control.mark("deliver_end")
    return {
        "envelopes": total,
        "stored": stored[0],
        "store_failed": failed[0],
        "received": received[0],
        "store_s": store_s,
        "store_per_s": stored[0] / store_s,
        "deliver_s": deliver_s,
        "deliver_per_s": received[0] / deliver_s,
    }


async def prepare(load: Load, control: Control, p: dict) -> dict:
    """Register the load users that do not exist yet and keep the session token each registration
    gives; log in with the password those without one (already registered, say)."""
    users = load.users(p["users"])
    missing = [u for u in users if u not in load.tokens]
    registered = Counter()

    async def register(share: list[str]) -> None:
        link = await load.connect("anon", anonymous=True)
        for user in share:
            fingerprint, envelope_key = user_keys()
            for _ in range(50):
                frame = await bounded(
                    link.call("register", username=user, password=password_for(user),
                              fingerprint=fingerprint, envelope_key=envelope_key),
                    60,
                )
                code = "ok" if frame.get("ok") else frame["error"]["code"]
                if code != "rate_limited":
                    break
                await sleep(0.2)
            registered[code] += 1
            if code == "ok":
                load.tokens[user] = frame["result"]["token"]
        load.leave(link)

    workers = p.get("concurrency", 8)
    await defer.DeferredList(
        [Deferred.fromCoroutine(register(missing[i::workers])) for i in range(workers)],
        fireOnOneErrback=True, consumeErrors=True,
    )
    # One at a time per slot, each closed after its login: a crowd online would make every
    # further login pay for presence to all of them.
    async def login_once(user: str) -> None:
        load.leave(await load.connect(user, password=True))

    logins = await defer.DeferredList(
        [load.attempts.run(lambda u=user: Deferred.fromCoroutine(login_once(u)))
         for user in missing if user not in load.tokens],
        consumeErrors=True,
    )
    load.counts["login_failed"] += sum(1 for ok, _ in logins if not ok)
    load.save_tokens()
    return {"registered": dict(registered), "tokens": len(load.tokens)}


async def _wait_traffic(traffic: Traffic, timeout: float) -> None:
    if traffic.done is None:
        traffic.done = Deferred()
        traffic.check_done()
    try:
        await bounded(traffic.done, timeout)
    except defer.TimeoutError:
        traffic.load.counts["traffic_timeout"] += 1


def _traffic_result(traffic: Traffic, name: str) -> dict:
    latency = latency_summary(traffic.latencies)
    return {
        name: traffic.delivered,
        f"{name}_expected": traffic.expected,
        f"{name}_per_s": traffic.rate_s(),
        "failed": traffic.failed,
        "p50_ms": latency["p50_ms"],
        "p99_ms": latency["p99_ms"],
        "max_ms": latency["max_ms"],
    }


SCENARIOS = {
    f.__name__: f
    for f in (
        idle_tls, dm_relay_tls, paced_latency_tls, broadcast_tls, reconnect_storm, storm_probe, offline_backlog,
        prepare,
    )
}


def main(argv: list[str]) -> None:
    config = json.loads(argv[1])
    # Warnings and worse: Twisted logs every connection's factory at info level.
    globalLogBeginner.beginLoggingTo([
        FilteringLogObserver(textFileLogObserver(sys.stderr), [LogLevelFilterPredicate(LogLevel.warn)])
    ])
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    control = Control()
    stdio.StandardIO(control)
    params = config["params"]
    load = Load(config["server"], config["port"], config.get("tokens"), params.get("concurrency", 10),
                writes=params.get("client_writes", "coalesced"))
    scenario = SCENARIOS[config["scenario"]]
    # Its pauses would show as latency of whichever server is measured: tuned as our server is.
    quiet_collector()

    async def run() -> None:
        try:
            result = await scenario(load, control, config["params"])
            result["loadgen_cpu_s"] = cpu_s()
            result["counts"] = dict(load.counts)
            outcome = {"result": result}
        except Exception as e:
            log.failure("scenario {name} failed", name=config["scenario"])
            outcome = {"error": f"{type(e).__name__}: {e}", "counts": dict(load.counts)}
        load.save_tokens()
        await load.close_all()
        control.finish(outcome)

    reactor.callWhenRunning(lambda: Deferred.fromCoroutine(run()))
    reactor.callLater(config.get("deadline_s", 900), reactor.stop)
    reactor.run()


if __name__ == "__main__":
    main(sys.argv)

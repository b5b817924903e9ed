"""The peer's connection to the discovery server: reconnection with backoff, the hello exchange,
keep-alive pings, and requests matched to their replies (PROTOCOL.md)."""

from __future__ import annotations

import os
from typing import Any, Callable, Protocol

from twisted.application.internet import ClientService, backoffPolicy
from twisted.internet.defer import CancelledError, Deferred, TimeoutError, fail, succeed
from twisted.internet.interfaces import IReactorTime, IStreamClientEndpoint
from twisted.internet.protocol import Factory
from twisted.internet.task import LoopingCall, deferLater
from twisted.logger import Logger
from twisted.protocols.basic import LineOnlyReceiver
from twisted.python.failure import Failure
from zope.interface import implementer

from ..crypto import valid_fingerprint
from ..tls import ServerPinError
from ..wire import PROTOCOL_VERSION, RATE_LIMITED_OPS, Code, Event, Reply, WireError, decode_frame, encode_request

log = Logger()

REQUEST_TIMEOUT = 30.0
PACE_MARGIN = 0.05  # seconds (see Pace.delay)


class RequestError(Exception):
    """The server answered a request with an error frame."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(code, message)
        self.code = code
        self.message = message


class NotConnected(Exception):
    """There is no usable connection to the server (or it went away before answering)."""


class ServerHandler(Protocol):
    """What the server link reports to (the messenger)."""

    def server_connected(self) -> Deferred[None]: ...  # hello done: log in now
    def server_lost(self) -> None: ...
    def server_unreachable(self, reason: str) -> None: ...  # once per outage
    def server_refused(self, message: str) -> None: ...  # not the pinned server: give up
    def server_event(self, event: Event) -> None: ...


class ServerProtocol(LineOnlyReceiver):
    """One connection: frames in, replies matched to requests by id, events passed up."""

    delimiter = b"\n"
    # The limit on a line protects the server from its clients; the server's own lines carry lists
    # of users (who, whosince, presence after a restart) that grow with it: 10 000 users with names
    # of 25 characters are 280 KiB. The pinned server is trusted with 16 MiB (some 480 000 users).
    MAX_LENGTH = 16 * 1024 * 1024

    def __init__(self, link: ServerLink) -> None:
        self._link = link
        self._clock = link.clock
        self._replies: dict[int, Deferred[dict[str, Any]]] = {}
        self._next_id = 1
        self._hello: Deferred[dict[str, Any]] = Deferred()
        self._pinger: LoopingCall | None = None
        self.refusal: str | None = None  # why the server said bye before hello, if it did
        self.max_line: int | None = None  # the server's, from its hello: longer requests are not sent
        self._lost = False

    def connectionMade(self) -> None:
        self._link._connection_made(self)

    def lineReceived(self, line: bytes) -> None:
        try:
            frame = decode_frame(line)
        except WireError as e:
            log.warn("ignored a frame from the server: {message}", message=e.message)
            return
        if isinstance(frame, Reply):
            waiting = self._replies.pop(frame.id, None) if isinstance(frame.id, int) else None
            if waiting is None:
                log.warn("the server answered request {id}, which is not waiting", id=frame.id)
            elif frame.ok:
                waiting.callback(dict(frame.result or {}))
            else:
                waiting.errback(RequestError(frame.code or "", frame.message or ""))
        elif frame.name == "hello" and not self._hello.called:
            self._hello.callback(dict(frame.fields))
        else:
            self._link._event(self, frame)

    def lineLengthExceeded(self, line: bytes) -> None:
        log.warn("the server sent a line over {n} bytes; reconnecting", n=self.MAX_LENGTH)
        self.transport.abortConnection()

    def when_hello(self, timeout: float) -> Deferred[dict[str, Any]]:
        return self._hello.addTimeout(timeout, self._clock)

    def request(self, op: str, timeout: float, **args: Any) -> Deferred[dict[str, Any]]:
        """
        Send one request; fires with its result, fails with L{RequestError} or L{NotConnected}.
        A request unanswered after C{timeout} seconds means a dead connection: it is dropped.
        """
        if self._lost:  # asked while the loss is being told (from a failed request's errback)
            return fail(NotConnected("the connection to the server was lost"))
        request_id = self._next_id
        self._next_id += 1
        try:
            line = encode_request(request_id, op, **args)
        except WireError as e:
            return fail(RequestError(e.code, e.message))
        if self.max_line is not None and len(line) - 1 > self.max_line:
            # The server would answer line_too_long and close: sent again after reconnecting, the
            # same request would go round for ever.
            return fail(RequestError(
                Code.LINE_TOO_LONG, f"too long for the server, which takes at most {self.max_line} bytes a line"
            ))
        waiting: Deferred[dict[str, Any]] = Deferred(lambda _: self._replies.pop(request_id, None))
        self._replies[request_id] = waiting
        self.transport.write(line)

        def timed_out(failure: Failure) -> Failure:
            if failure.check(TimeoutError):
                log.warn("the server did not answer {op} within {t} s; reconnecting", op=op, t=timeout)
                self.transport.abortConnection()
                return Failure(NotConnected("the server did not answer in time"))
            return failure

        return waiting.addTimeout(timeout, self._clock).addErrback(timed_out)

    def start_pinging(self, interval: float, timeout: float) -> None:
        """Keep the session alive: the server drops connections silent for keepalive_timeout."""

        def ping() -> None:
            self.request("ping", timeout).addErrback(lambda f: f.trap(RequestError, NotConnected))

        self._pinger = LoopingCall(ping)
        self._pinger.clock = self._clock
        self._pinger.start(interval, now=False)

    def connectionLost(self, reason: Failure) -> None:
        self._lost = True
        if self._pinger is not None and self._pinger.running:
            self._pinger.stop()
        replies, self._replies = self._replies, {}
        for waiting in replies.values():
            waiting.errback(NotConnected(reason.getErrorMessage()))
        if not self._hello.called:
            self._hello.errback(reason)
        self._link._connection_lost(self, reason)


class Pace:
    """
    Spaces requests out so that they stay within the server's rate limit (a token bucket of
    C{rate} a second and C{burst}, announced in its hello): each request is given, in turn, the
    time it may go. A script sending thousands of messages then sends them at the server's rate
    rather than into its refusals.
    """

    def __init__(self, clock: IReactorTime, rate: float, burst: int) -> None:
        self._clock = clock
        self._interval = 1.0 / rate
        self._tolerance = (burst - 1) * self._interval
        self._due = clock.seconds()  # when the next request would go, were there no burst

    def delay(self) -> float:
        """Seconds until the next request may go; it counts as gone from then on."""
        now = self._clock.seconds()
        due = max(self._due, now)
        self._due = due + self._interval
        wait = due - self._tolerance - now
        # The server's bucket runs from when it took the first request, which may have taken
        # longer to reach it than a later one does: one waiting goes a little after its time.
        return wait + PACE_MARGIN if wait > 0 else 0.0


class ServerLink:
    """
    The connection to the discovery server, kept up by a L{ClientService} until L{stop}.

    @param endpoint: where the server is (TLS already wrapped around it).
    """

    def __init__(
        self,
        endpoint: IStreamClientEndpoint,
        clock: IReactorTime,
        handler: ServerHandler,
        request_timeout: float = REQUEST_TIMEOUT,
        retry_policy: Callable[[int], float] | None = None,
    ) -> None:
        self.clock = clock
        self._handler = handler
        self._timeout = request_timeout
        factory = Factory.forProtocol(lambda: ServerProtocol(self))
        factory.noisy = False  # "Starting factory" in the log at every reconnection is no news
        self._service = ClientService(
            _NotingFailures(endpoint, self._attempt_failed),
            factory,
            retryPolicy=retry_policy or backoffPolicy(maxDelay=30.0),
            clock=clock,
        )
        self._protocol: ServerProtocol | None = None  # once hello is done
        self._pace: Pace | None = None  # the connection's, when its server has a rate limit
        # The server's message rate and burst, once a hello has said them (None: no limit known).
        self.message_rate: tuple[float, int] | None = None
        # Whether the server keeps and hands out envelope key signatures (its hello says so; one
        # older than them passes none on, from anyone). Only for what the user is told: a server
        # that leaves it out gets nothing sealed to keys it hands out all the same.
        self.key_signatures = False
        self._outage_reported = False

    def start(self) -> None:
        if self._service.running:
            return
        self._outage_reported = False
        self._service.startService()

    def stop(self) -> Deferred[None]:
        """Stop reconnecting and close the connection."""
        self._protocol = None
        if not self._service.running:
            return succeed(None)
        return self._service.stopService()

    def request(self, op: str, **args: Any) -> Deferred[dict[str, Any]]:
        """Ask the server; a request its rate limit counts waits for its turn (see L{Pace})."""
        if self._protocol is not None and self._pace is not None and op in RATE_LIMITED_OPS:
            delay = self._pace.delay()
            if delay > 0:
                return deferLater(self.clock, delay, self._request, op, args)
        return self._request(op, args)

    def reconnect(self) -> None:
        """Drop the connection; the service makes the next one (the server then sends again what
        was not acknowledged)."""
        if self._protocol is not None:
            self._protocol.transport.loseConnection()

    def _request(self, op: str, args: dict[str, Any]) -> Deferred[dict[str, Any]]:
        if self._protocol is None:
            return fail(NotConnected("not connected to the server"))
        return self._protocol.request(op, self._timeout, **args)

    def _attempt_failed(self, failure: Failure) -> None:
        if not failure.check(CancelledError):
            self._report_outage(failure.getErrorMessage())

    def _report_outage(self, reason: str) -> None:
        if not self._outage_reported:
            self._outage_reported = True
            self._handler.server_unreachable(reason)

    def _connection_made(self, protocol: ServerProtocol) -> None:
        Deferred.fromCoroutine(self._setup(protocol)).addErrback(
            lambda f: log.failure("server session setup", f)
        )

    async def _setup(self, protocol: ServerProtocol) -> None:
        try:
            hello = await protocol.when_hello(self._timeout)
            max_line = hello.get("max_line")
            if isinstance(max_line, int) and not isinstance(max_line, bool) and max_line > 0:
                protocol.max_line = max_line
            await protocol.request("hello", self._timeout, protocol=PROTOCOL_VERSION)
        except (RequestError, NotConnected, TimeoutError) as e:
            log.warn("no session with the server: {e!r}", e=e)
            protocol.transport.abortConnection()
            return
        except Exception:
            return  # the connection was lost before hello; reported by _connection_lost
        self._protocol = protocol
        self._outage_reported = False
        rate, burst = hello.get("message_rate"), hello.get("message_burst")
        valid = all(isinstance(n, (int, float)) and not isinstance(n, bool) and n > 0 for n in (rate, burst))
        self.message_rate = (rate, max(1, int(burst))) if valid else None
        self._pace = Pace(self.clock, *self.message_rate) if self.message_rate else None
        self.key_signatures = hello.get("key_signatures") is True
        interval = hello.get("keepalive_interval")
        if isinstance(interval, (int, float)) and interval > 0:
            timeout = hello.get("keepalive_timeout")
            protocol.start_pinging(interval, timeout if isinstance(timeout, (int, float)) and timeout > 0 else self._timeout)
        try:
            await self._handler.server_connected()
        except NotConnected:
            pass  # lost while logging in; the next connection tries again
        except Exception:
            log.failure("logging in")
            protocol.transport.abortConnection()

    def _event(self, protocol: ServerProtocol, event: Event) -> None:
        if protocol is self._protocol:
            self._handler.server_event(event)
        elif event.name == "bye" and isinstance(event.fields.get("message"), str):
            protocol.refusal = event.fields["message"]  # turned away before hello: the outage's reason

    def _connection_lost(self, protocol: ServerProtocol, reason: Failure) -> None:
        if reason.check(ServerPinError):
            self._protocol = None
            self._handler.server_refused(str(reason.value))
            return
        if protocol is self._protocol:
            self._protocol = None
            self._handler.server_lost()
        elif self._service.running:
            self._report_outage(protocol.refusal or reason.getErrorMessage())


@implementer(IStreamClientEndpoint)
class _NotingFailures:
    """An endpoint that reports each failed connection attempt (L{ClientService} keeps them to itself)."""

    def __init__(self, endpoint: IStreamClientEndpoint, failed: Callable[[Failure], None]) -> None:
        self._endpoint = endpoint
        self._failed = failed

    def connect(self, factory: Any) -> Deferred[Any]:
        def failed(failure: Failure) -> Failure:
            self._failed(failure)
            return failure

        return self._endpoint.connect(factory).addErrback(failed)


class UnusablePins(Exception):
    """The file of pinned server certificates cannot be read, or its line for a server is damaged."""


class KnownServers:
    """Pinned discovery-server certificates, one "host:port fingerprint" line each (like known_hosts)."""

    def __init__(self, path: str) -> None:
        self._path = path

    def get(self, server: str) -> str | None:
        """
        The fingerprint pinned for C{server}, or C{None} if there is none yet.

        @raise UnusablePins: when the file cannot be read, or the lines naming C{server} hold no
            fingerprint (damaged): trusting on first use again would let any server in.
        """
        try:
            with open(self._path, "rb") as f:
                text = f.read().decode("utf-8")
        except FileNotFoundError:
            return None
        except OSError as e:
            raise UnusablePins(f"cannot read {self._path}: {e.strerror}") from None
        except UnicodeDecodeError:
            raise UnusablePins(
                f"{self._path} is not text: it should hold one line per server, \"HOST:PORT FINGERPRINT\";"
                " mend it, or delete it to trust the servers again on first use"
            ) from None
        damaged = None
        for number, line in enumerate(text.splitlines(), 1):
            parts = line.split()
            if parts and parts[0] == server:
                if len(parts) == 2 and valid_fingerprint(parts[1]):
                    return parts[1]
                damaged = damaged or number
        if damaged is not None:
            raise UnusablePins(
                f"{self._path} line {damaged}: the pin for {server} is damaged; delete that line to"
                " trust the server again on first use, or start the peer with --server-fingerprint"
            )
        return None

    def pin(self, server: str, fingerprint: str) -> None:
        fd = os.open(self._path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        with os.fdopen(fd, "a", encoding="utf-8") as f:
            f.write(f"{server} {fingerprint}\n")

"""
How the server's reactor hands socket events to connections.

Twisted's epoll reactor calls each connection's C{doRead} or C{doWrite} inside
C{log.callWithLogger}, which pushes a log context naming the connection, so that legacy log
lines written meanwhile (Twisted's own "Unhandled Error" among them) say which connection they
are about. That costs about 4 microseconds per event: in C{idle_tls}, 2000 connections with a
keep-alive each every 15 s, it was 8 % of the server's CPU (bench/FINDINGS.md, "Idle CPU").
Our own log lines (C{twisted.logger}) name their source themselves; without the context,
Twisted's legacy lines show C{[-]} where they showed the connection.

It also tells the server's L{Outbox} where a pass over socket events begins and ends, so that
the pass's writes go out once its events are handled, one write per connection, without a timer.
"""

from __future__ import annotations

from typing import Protocol

from twisted.logger import Logger

try:
    from twisted.internet.epollreactor import EPollReactor
except ImportError:  # no epoll here (not Linux): Twisted runs another reactor, left alone
    EPollReactor = None

log = Logger()


class Pass(Protocol):
    """What wants to know where the reactor's pass over socket events begins and ends."""

    def hold(self) -> None:
        """The pass's events are about to be handled."""

    def release(self) -> None:
        """They have been."""


def dispatch_directly(reactor, around: Pass | None = None) -> bool:
    """
    Have C{reactor}, if it is Twisted's epoll reactor, hand each socket event straight to its
    connection, without a log context, and tell C{around} where each pass over the events begins
    and ends; C{True} if it does now.

    Any other reactor is left alone, as is an epoll reactor without the attributes this uses
    (they are Twisted's own, not its API: a Twisted that changed them keeps its own dispatch).
    Errors are handled as before: Twisted's C{_doReadOrWrite} closes a connection whose
    C{doRead} or C{doWrite} fails, and an exception that gets past it is logged here.
    """
    if type(reactor) is not EPollReactor:
        return False
    try:
        poller, selectables, handle = reactor._poller, reactor._selectables, reactor._doReadOrWrite
    except AttributeError:
        log.warn("Twisted's epoll reactor has changed; its socket events keep their log context")  # noqa: G010 - twisted.logger
        return False

    def poll(timeout: float | None) -> None:
        try:
            events = poller.poll(-1 if timeout is None else timeout, len(selectables))
        except InterruptedError:
            return
        if not events:
            return
        if around is not None:
            around.hold()
        try:
            for fd, event in events:
                selectable = selectables.get(fd)
                if selectable is not None:
                    try:
                        handle(selectable, fd, event)
                    except Exception:  # noqa: BLE001 - as Twisted's callWithLogger did: log, go on
                        log.failure("while handling a socket event of {selectable!r}", selectable=selectable)
        finally:
            if around is not None:
                around.release()

    reactor.doIteration = poll
    return True

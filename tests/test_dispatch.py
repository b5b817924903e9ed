"""The server's reactor hands socket events to connections without a log context."""

import socket

from twisted.internet.task import Clock
from twisted.python import context, log
from twisted.trial.unittest import SynchronousTestCase

from p2pchat.discovery.dispatch import EPollReactor, dispatch_directly
from p2pchat.discovery.tap import Options, makeService


class Reader:
    """One end of a socket pair, added to a reactor as a reader; records what it sees."""

    def __init__(self, name: str, fail_read: bool = False, fail_lost: bool = False) -> None:
        self.name = name
        self.fail_read = fail_read
        self.fail_lost = fail_lost
        self.socket, self.other = socket.socketpair()
        self.systems: list[str] = []
        self.lost = []
        self.around: Around | None = None

    def fileno(self) -> int:
        return self.socket.fileno()

    def logPrefix(self) -> str:
        return self.name

    def doRead(self):
        self.systems.append(context.get(log.ILogContext)["system"])
        if self.around is not None:
            self.around.seen.append((self.name, self.around.held))
        self.socket.recv(100)
        if self.fail_read:
            raise ZeroDivisionError("doRead")

    def connectionLost(self, reason) -> None:
        self.lost.append(reason)
        if self.fail_lost:
            raise ZeroDivisionError("connectionLost")

    def close(self) -> None:
        self.socket.close()
        self.other.close()


class Around:
    """Records where the reactor says its passes over socket events begin and end."""

    def __init__(self) -> None:
        self.held = False
        self.seen: list = []

    def hold(self) -> None:
        self.held = True
        self.seen.append("hold")

    def release(self) -> None:
        self.held = False
        self.seen.append("release")


class DispatchTests(SynchronousTestCase):
    if EPollReactor is None:
        skip = "no epoll on this platform"

    def reactor(self) -> EPollReactor:
        """A reactor of its own (not installed, never run), closed after the test."""
        reactor = EPollReactor()

        def close():
            reactor.removeReader(reactor.waker)
            reactor.waker.connectionLost(None)
            reactor._poller.close()

        self.addCleanup(close)
        return reactor

    def reader(self, reactor, *args, **kwargs) -> Reader:
        reader = Reader(*args, **kwargs)
        self.addCleanup(reader.close)
        reactor.addReader(reader)
        self.addCleanup(reactor.removeReader, reader)
        return reader

    def test_twisted_dispatches_in_a_log_context(self):
        """What the change is about: Twisted's own dispatch names the connection in the context."""
        reactor = self.reactor()
        reader = self.reader(reactor, "conn-1")
        reader.other.send(b"x")
        reactor.doIteration(0)
        self.assertEqual(reader.systems, ["conn-1"])

    def test_dispatch_without_log_context(self):
        """After dispatch_directly, a read is handled once, outside any connection's context."""
        reactor = self.reactor()
        self.assertTrue(dispatch_directly(reactor))
        reader = self.reader(reactor, "conn-1")
        reactor.doIteration(0)
        self.assertEqual(reader.systems, [])  # nothing to read: not called
        reader.other.send(b"x")
        reactor.doIteration(0)
        self.assertEqual(reader.systems, ["-"])
        self.assertEqual(reader.lost, [])

    def test_failures_close_the_connection_and_spare_the_others(self):
        """A failing doRead closes its connection (Twisted's handling); a failing connectionLost
        is logged; the other connections of the same poll are still served."""
        reactor = self.reactor()
        dispatch_directly(reactor)
        bad = self.reader(reactor, "bad", fail_read=True, fail_lost=True)
        good = self.reader(reactor, "good")
        bad.other.send(b"x")
        good.other.send(b"x")
        reactor.doIteration(0)
        self.assertEqual((len(bad.systems), len(good.systems)), (1, 1))
        self.assertEqual(len(bad.lost), 1)
        self.assertIsInstance(bad.lost[0].value, ZeroDivisionError)
        self.assertNotIn(bad, reactor.getReaders())
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 2)
        good.other.send(b"y")
        reactor.doIteration(0)
        self.assertEqual(len(good.systems), 2)

    def test_around_a_pass(self):
        """C{around} hears of a pass over socket events before its first event and after its last,
        a failing one included; a poll that found none is no pass."""
        reactor = self.reactor()
        around = Around()
        dispatch_directly(reactor, around)
        one, two = self.reader(reactor, "one", fail_read=True), self.reader(reactor, "two")
        one.around = two.around = around
        reactor.doIteration(0)
        self.assertEqual(around.seen, [])
        one.other.send(b"x")
        two.other.send(b"x")
        reactor.doIteration(0)
        self.assertEqual(around.seen, ["hold", ("one", True), ("two", True), "release"])
        self.flushLoggedErrors(ZeroDivisionError)

    def test_timeouts(self):
        """With no event the poll returns after its timeout; with none (wait for ever) it returns
        once an event came."""
        reactor = self.reactor()
        dispatch_directly(reactor)
        reader = self.reader(reactor, "conn-1")
        reactor.doIteration(0.001)
        reader.other.send(b"x")
        reactor.doIteration(None)
        self.assertEqual(reader.systems, ["-"])

    def test_other_reactors_left_alone(self):
        """Any reactor but Twisted's epoll one keeps its own dispatch."""
        clock = Clock()
        self.assertFalse(dispatch_directly(clock))
        self.assertFalse(hasattr(clock, "doIteration"))

    def test_changed_twisted_left_alone(self):
        """An epoll reactor without the attributes it uses keeps its own dispatch, with a warning."""
        reactor = self.reactor()
        poller = reactor._poller
        del reactor._poller
        self.addCleanup(setattr, reactor, "_poller", poller)
        self.assertFalse(dispatch_directly(reactor))
        self.assertNotIn("doIteration", vars(reactor))

    def test_server_dispatches_directly(self):
        """twistd p2pdiscovery's service maker sets its reactor to dispatch directly, and to tell
        the outbox of its connections where each pass begins and ends."""
        reactor = self.reactor()
        options = Options()
        options.parseOptions(["--data-dir", self.mktemp()])
        service = makeService(options, reactor)
        outbox = service.services[0].outbox
        reader = self.reader(reactor, "conn-1")
        held = []
        reader.doRead = lambda: (held.append(outbox._held), Reader.doRead(reader))
        reader.other.send(b"x")
        reactor.doIteration(0)
        self.assertEqual((reader.systems, held, outbox._held), (["-"], [True], False))

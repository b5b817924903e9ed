"""End-to-end tests: a real C{twistd -n p2pdiscovery} and real C{twistd -n p2ppeer} processes on
loopback, driven through their stdin and stdout as a person (or a script) would."""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import signal
import socket
import struct
import termios
from collections.abc import Callable

import pyte
from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, wrapClientTLS
from twisted.internet.protocol import Factory, Protocol
from twisted.trial import unittest

from p2pchat import crypto
from p2pchat.tls import ServerTrust, peer_connector_creator

from .support import (
    DiscoveryServer, LineClientFactory, ProcessRunner, start_process, subprocess_env, twistd_argv, with_timeout,
)

PASSWORD = "correct horse"


class Peer:
    """One C{twistd -n p2ppeer} process and what it printed."""

    def __init__(self, test: PeerTestCase, user: str, home: str | None = None) -> None:
        self.test = test
        self.user = user
        self.home = home or test.home(user)
        self.process = None
        self.mark = 0

    @property
    def data_dir(self) -> str:
        return os.path.join(self.home, "data", "p2pchat", "peer", self.user)

    def start(self, *options: str, password_file: bool = True, pin: bool = True, cwd: str | None = None,
              terminal: TerminalRunner | None = None) -> Peer:
        """Start the peer (pinning the test server's certificate unless C{pin} is false), on a
        pseudo-terminal seen through C{terminal} if given."""
        argv = twistd_argv() + [
            "-n", "p2ppeer", "--user", self.user, "--server", f"127.0.0.1:{self.test.server_port}",
            "--interface", "127.0.0.1", *options,
        ]
        if pin and self.test.server is not None and "--server-fingerprint" not in options:
            argv += ["--server-fingerprint", self.test.server.fingerprint]
        if password_file:
            argv += ["--password-file", self.test.password_file]
        env = subprocess_env(HOME=self.home, XDG_DATA_HOME=os.path.join(self.home, "data"))
        self.process = start_process(
            self.test, argv, env=env, path=cwd or self.home, runner=terminal, terminal=terminal is not None
        )
        self.mark = 0
        return self

    async def started(self, *options: str, **kwargs) -> Peer:
        self.start(*options, **kwargs)
        await self.expect(rf"^welcome, {self.user}!")
        return self

    @property
    def lines(self) -> list[str]:
        return self.process.output.lines

    def send(self, line: str) -> None:
        """Type one line; later expectations look only at what follows it."""
        self.mark = len(self.lines)
        self.process.send_line(line)

    async def expect(self, pattern: str, timeout: float = 20) -> str:
        return await self.process.output.wait_for(pattern, after=self.mark, timeout=timeout)

    async def command(self, line: str, pattern: str) -> str:
        self.send(line)
        return await self.expect(pattern)

    async def poll(self, command: str, pattern: str, timeout: float = 20) -> None:
        """Run C{command} until its output has a line matching C{pattern} (a state that arrives later)."""
        regex = re.compile(pattern)
        deadline = reactor.seconds() + timeout
        while reactor.seconds() < deadline:
            self.send(command)
            self.process.send_line("/fingerprint")  # marks the end of the command's output
            await self.expect(r"^your fingerprint: ")
            if any(regex.search(line) for line in self.lines[self.mark :]):
                return
        raise AssertionError(f"{command!r} never showed {pattern!r}")

    def count(self, text: str) -> int:
        return sum(1 for line in self.lines if line == text)

    async def ended(self) -> int:
        return await with_timeout(self.process.when_ended(), 20, f"{self.user} to exit")

    async def kill(self) -> None:
        self.process.signal("KILL")
        await self.ended()


class TerminalRunner(ProcessRunner):
    """A process on a pseudo-terminal, whose screen is kept by a terminal emulator (pyte)."""

    def __init__(self) -> None:
        super().__init__()
        self.screen = pyte.Screen(100, 30)
        self._stream = pyte.ByteStream(self.screen)
        self.received = 0  # bytes written to the terminal so far
        self._waiting: list[tuple[Callable[[], bool], defer.Deferred]] = []

    def childDataReceived(self, fd: int, data: bytes) -> None:
        self._stream.feed(data)
        self.received += len(data)
        for entry in list(self._waiting):
            if entry[0]():
                self._waiting.remove(entry)
                entry[1].callback(None)

    def rows(self) -> list[str]:
        return [row.rstrip() for row in self.screen.display]

    def shows(self, text: str) -> bool:
        return any(text in row for row in self.rows())

    def wait(self, condition: Callable[[], bool], what: str) -> defer.Deferred:
        """Fire once C{condition()} holds, checked whenever the process writes."""
        if condition():
            return defer.succeed(None)
        d = defer.Deferred()
        self._waiting.append((condition, d))
        return with_timeout(d, 20, what)

    def type(self, keys: bytes) -> None:
        self.transport.write(keys)

    def line_mode(self) -> bool:
        """Whether the terminal is in line mode (canonical), echoes or stops at Ctrl-S, as a shell leaves it."""
        attributes = termios.tcgetattr(self.transport.fileno())
        return bool(attributes[3] & (termios.ICANON | termios.ECHO) or attributes[0] & termios.IXON)

    def pastes_marked(self) -> bool:
        """Whether the terminal was asked to mark pastes (bracketed paste, private mode 2004)."""
        return (2004 << 5) in self.screen.mode  # pyte keeps private modes shifted

    def resize(self, columns: int) -> None:
        """Make the terminal C{columns} wide, as a person dragging its window would."""
        self.screen.resize(self.screen.lines, columns)
        fcntl.ioctl(self.transport.fileno(), termios.TIOCSWINSZ, struct.pack("HHHH", self.screen.lines, columns, 0, 0))

    def set_line_mode(self) -> None:
        attributes = termios.tcgetattr(self.transport.fileno())
        attributes[0] |= termios.IXON
        attributes[3] |= termios.ICANON | termios.ECHO
        termios.tcsetattr(self.transport.fileno(), termios.TCSANOW, attributes)


class PeerTestCase(unittest.TestCase):
    timeout = 90

    def setUp(self) -> None:
        self.base = os.path.abspath(self.mktemp())
        os.makedirs(self.base)
        self.password_file = os.path.join(self.base, "password")
        with open(self.password_file, "w") as f:
            f.write(PASSWORD + "\n")
        self.server: DiscoveryServer | None = None
        self.server_port = 0

    def home(self, name: str) -> str:
        path = os.path.join(self.base, "home-" + name)
        os.makedirs(path, exist_ok=True)
        return path

    async def start_server(self, *options: str, port: int = 0) -> DiscoveryServer:
        self.server = await DiscoveryServer(self, os.path.join(self.base, "server"), *options).start(port)
        self.server_port = self.server.port
        return self.server

    async def peers(self, *names: str) -> list[Peer]:
        """Start the named peers one after another, each logged in."""
        return [await Peer(self, name).started() for name in names]


class ChatTests(PeerTestCase):
    async def test_first_chat(self) -> None:
        """Two users chat: presence, a message each way, who, history with delivered, fingerprints, a
        (signed) broadcast; the messages travel over the direct link, which carries on when the server
        is gone."""
        await self.start_server()
        alice = Peer(self, "alice").start(pin=False)
        await alice.expect(r"^trusting the server at 127\.0\.0\.1:\d+ on first use: certificate "
                           + crypto.format_fingerprint(self.server.fingerprint) + r" \(its log says it at start\)$")
        await alice.expect(r"^registered alice on 127\.0\.0\.1:\d+$")
        await alice.expect(r"^welcome, alice!$")
        bob = await Peer(self, "bob").started()
        await alice.expect(r"^bob logged in$")
        await alice.command("/who", r"^online: bob$")
        alice.send("/msg bob hi bob, how are you?")
        await bob.expect(r"^alice: hi bob, how are you\?$")
        bob.send("message alice fine thanks")
        await alice.expect(r"^bob: fine thanks$")
        await alice.poll("/history bob", r"you -> bob: hi bob, how are you\? \(delivered\)$")
        fingerprint = (await bob.command("/fingerprint", r"^your fingerprint: ")).split(": ")[1]
        await alice.command("/fingerprint bob", rf"^bob: pinned {fingerprint}$")
        await alice.command("/whosince 60", r"^online during the last 60 s: bob$")
        await alice.command("/broadcast hello everyone", r"^broadcast sent to 1 user$")
        await bob.expect(r"^alice \(broadcast\): hello everyone$")
        await self.server.kill()
        await alice.expect(r"^lost the connection to the server; reconnecting$")
        alice.send("/msg bob the server is gone, the link is not")
        await bob.expect(r"^alice: the server is gone, the link is not$")
        bob.send("/logout")
        self.assertEqual(await bob.ended(), 0)

    async def test_bad_input_never_crashes(self) -> None:
        """A 1 MB line, binary, blank lines and malformed commands each get an error; the peer goes on."""
        await self.start_server()
        [alice] = await self.peers("alice")
        mark = len(alice.lines)
        alice.process.transport.write(b"x" * (1 << 20) + b"\n" + b"\xff\xfe\x00\x01binary\n" + b"\n/nonsense\n/msg\n")
        alice.mark = mark
        await alice.expect(r"^error: input line longer than 65536 bytes; ignored$")
        await alice.expect(r"^error: input is not valid UTF-8; line ignored$")
        await alice.expect(r"^error: unknown command /nonsense")
        await alice.expect(r"^error: usage: /msg USER TEXT$")
        await alice.command("/msg alice hi", r"^error: that is you$")
        await alice.command("/msg nobody hi", r"^error: there is no user named nobody$")
        await alice.command("/msg bob " + "x" * 16001, r"^error: message too long: 16001 characters, at most 16000$")
        await alice.command("/who", r"^nobody else is online$")

    async def test_offline_delivery_exactly_once(self) -> None:
        """A message to an offline user waits on the server and is shown once at their next login, never again."""
        await self.start_server()
        alice, bob = await self.peers("alice", "bob")
        bob.send("/logout")
        await bob.ended()
        await alice.command("/msg bob while you were away", r"^bob is offline: the message waits on the server")
        alice.send("/msg bob second")
        await bob.started()
        await bob.expect(r"^welcome, bob! 2 messages arrived while you were away:$")
        await bob.expect(r"^alice: while you were away$")
        await bob.expect(r"^alice: second$")
        await alice.poll("/history bob", r"you -> bob: second \(delivered\)$")
        self.assertEqual((bob.count("alice: while you were away"), bob.count("alice: second")), (1, 1))
        bob.send("/logout")
        await bob.ended()
        await bob.started()
        await bob.command("/history alice", r"alice: second$")
        self.assertEqual((bob.count("alice: while you were away"), bob.count("alice: second")), (0, 0))

    async def test_many_messages_at_the_servers_rate(self) -> None:
        """A script writing many messages through the server sends them at the rate the server
        announces, none refused: all arrive, in order, with nothing said about the rate."""
        await self.start_server("--message-rate", "40", "--message-burst", "5")
        alice, bob = await self.peers("alice", "bob")
        bob.send("/logout")
        await bob.ended()
        alice.process.transport.write("".join(f"/msg bob m{i}\n" for i in range(60)).encode())
        await bob.started()
        await bob.expect(r"^alice: m59$")
        self.assertEqual([line for line in bob.lines if line.startswith("alice: m")], [f"alice: m{i}" for i in range(60)])
        self.assertEqual([line for line in alice.lines if "takes no message" in line], [])

    async def test_block_and_mute(self) -> None:
        """Blocked senders are told; muted ones are stored silently until unmuted."""
        await self.start_server()
        alice, bob = await self.peers("alice", "bob")
        await bob.command("/block alice", r"^blocked alice$")
        await alice.command("/msg bob hi", r"^error: bob has blocked you$")
        await alice.command("/startprivate bob", r"^error: bob has blocked you$")
        await bob.command("/block alice", r"^error: alice is already blocked$")
        await bob.command("/unblock alice", r"^unblocked alice$")
        await bob.command("/unblock alice", r"^error: alice is not blocked$")
        await bob.command("/mute alice", r"^muted alice until /unmute$")
        alice.send("/msg bob can you hear me")
        await alice.poll("/history bob", r"can you hear me \(delivered\)$")
        await bob.command("/history alice", r"alice: can you hear me \(muted\)$")
        await bob.command("/unmute alice", r"^unmuted alice$")
        alice.send("/msg bob now?")
        await bob.expect(r"^alice: now\?$")
        self.assertEqual(bob.count("alice: can you hear me"), 0)

    async def test_private_session(self) -> None:
        """startprivate, private both ways, stopprivate, and their errors, as in seed 004."""
        await self.start_server()
        alice, bob = await self.peers("alice", "bob")
        await alice.command("/private bob psst", r"^error: no private session with bob")
        await alice.command("/startprivate bob", r"^private session with bob started")
        await bob.expect(r"^alice started a private session with you")
        bob.send("/private alice hello privately")
        await alice.expect(r"^bob \(private\): hello privately$")
        alice.send("/private bob back at you")
        await bob.expect(r"^alice \(private\): back at you$")
        await alice.command("/stopprivate bob", r"^private session with bob ended$")
        await bob.expect(r"^alice ended the private session$")
        await alice.command("/stopprivate bob", r"^error: no private session with bob")
        await alice.command("/startprivate alice", r"^error: that is you$")
        await alice.command("/startprivate nobody", r"^error: there is no user named nobody$")
        bob.send("/logout")
        await bob.ended()
        await alice.command("/startprivate bob", r"^error: bob is offline$")


class ResilienceTests(PeerTestCase):
    async def test_kill_with_pending_then_restart(self) -> None:
        """Messages pending when a peer is killed -9 go out after its restart, each shown exactly once, in order."""
        await self.start_server()
        alice, bob = await self.peers("alice", "bob")
        await alice.command("/offline", r"^you are offline")
        await bob.expect(r"^alice logged out$")
        for text in ["one", "two", "three"]:
            await alice.command(f"/msg bob {text}", r"^you are offline: the message to bob goes out after /online$")
        await alice.command("/history bob", r"you -> bob: three \(pending\)$")
        await alice.kill()
        await alice.started()
        for text in ["one", "two", "three"]:
            await bob.expect(rf"^alice: {text}$")
        await alice.poll("/history bob", r"you -> bob: three \(delivered\)$")
        self.assertEqual([line for line in bob.lines if line.startswith("alice: ")], ["alice: one", "alice: two", "alice: three"])

    async def bob_pinned_then_gone(self) -> Peer:
        """alice has pinned bob's keys (a message over their link), and bob has logged out: alice's peer."""
        await self.start_server()
        alice, bob = await self.peers("alice", "bob")
        alice.send("/msg bob hi")
        await bob.expect(r"^alice: hi$")
        bob.send("/logout")
        await bob.ended()
        return alice

    async def test_new_install_while_offline(self) -> None:
        """bob moves to a new install (new keys) and logs out before alice hears of it: her next
        message is not sealed to his old keys, which the new install could not open; she is warned,
        and after /trust it reaches him there."""
        alice = await self.bob_pinned_then_gone()
        moved = await Peer(self, "bob", home=self.home("bob-moved")).started()
        moved.send("/logout")
        await moved.ended()
        await alice.command("/msg bob did you move?", r"^WARNING: bob's IDENTITY KEY HAS CHANGED")
        await alice.command("/history bob", r"you -> bob: did you move\? \(pending\)$")
        await alice.command("/trust bob", r"^accepted bob's new key$")
        await alice.expect(r"^bob is offline: the message waits on the server")
        await moved.started()
        await moved.expect(r"^alice: did you move\?$")

    async def test_messages_sealed_before_a_move_sent_again(self) -> None:
        """A message stored for bob before he moved to a new install is sealed to keys that install
        does not have: it says so, asks alice's peer for it again, and gets it once alice has
        accepted bob's new key."""
        alice = await self.bob_pinned_then_gone()
        await alice.command("/msg bob while you were away", r"^bob is offline: the message waits on the server")
        moved = await Peer(self, "bob", home=self.home("bob-moved")).started()
        await moved.expect(r"^1 message from alice could not be opened: sealed to a key of yours this install does not have")
        await alice.expect(r"^bob could not open 1 message of yours \(sealed to keys they had before\): sent again once you accept")
        self.assertTrue(any(line.startswith("WARNING: bob's IDENTITY KEY HAS CHANGED") for line in alice.lines))
        await alice.command("/trust bob", r"^accepted bob's new key$")
        await moved.expect(r"^alice: while you were away$")
        await alice.poll("/history bob", r"you -> bob: while you were away \(delivered\)$")
        self.assertEqual(moved.count("alice: while you were away"), 1)

    async def test_server_down_then_up(self) -> None:
        """A peer started while the server is down says so, works offline, and logs in once the server is up."""
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.server_port = s.getsockname()[1]
        alice = Peer(self, "alice").start(pin=False)
        await alice.expect(r"^cannot reach the server at 127\.0\.0\.1:\d+ .*retrying")
        await alice.command("/who", r"^error: the server at 127\.0\.0\.1:\d+ is unreachable")
        await alice.command("/msg bob queued", r"^not connected to the server: the message to bob goes out once")
        await self.start_server(port=self.server_port)
        await alice.expect(r"^trusting the server at .* on first use: certificate " + crypto.format_fingerprint(self.server.fingerprint))
        await alice.expect(r"^welcome, alice!$", timeout=30)
        await alice.expect(r"^could not deliver your message to bob \(queued\): there is no user named bob$")

    async def test_wrong_server_pin_refused(self) -> None:
        """A server whose certificate is not the pinned one is refused with a clear message and the peer exits."""
        await self.start_server()
        alice = Peer(self, "alice")
        alice.start("--server-fingerprint", "ab" * 32)
        await alice.expect(r"THE CERTIFICATE OF 127\.0\.0\.1 HAS CHANGED.* start the peer with --server-fingerprint set")
        self.assertEqual(await alice.ended(), 1)
        self.assertFalse(any("welcome" in line for line in alice.lines))

    async def test_server_with_a_new_certificate(self) -> None:
        """A server that comes back with a new certificate (its data directory lost) is refused,
        and the message names the pin to delete; once deleted, the new one is trusted on first use
        and the account, lost with the server's data, is registered again."""
        await self.start_server()
        alice = Peer(self, "alice")
        await alice.started(pin=False)
        alice.send("/logout")
        await alice.ended()
        await self.server.kill()
        shutil.rmtree(os.path.join(self.base, "server"))
        await self.start_server(port=self.server_port)
        alice.start(pin=False)
        known = os.path.join(alice.data_dir, "known_servers")
        line = await alice.expect(r"THE CERTIFICATE OF 127\.0\.0\.1 HAS CHANGED")
        self.assertIn(f"delete the line for 127.0.0.1:{self.server_port} in {known} and start the peer again", line)
        self.assertEqual(await alice.ended(), 1)
        os.remove(known)
        alice.start(pin=False)
        await alice.expect(r"^trusting the server at .* on first use: certificate " + crypto.format_fingerprint(self.server.fingerprint))
        await alice.expect(r"^registered alice on 127\.0\.0\.1:\d+$")  # the account went with the server's data
        await alice.expect(r"^welcome, alice!$")


class LoginTests(PeerTestCase):
    async def test_password_prompt_flows(self) -> None:
        """
        Wrong passwords are said and asked again; the third blocks and exits; a login meanwhile is
        refused. A peer that logs out exits 0; one that could not log in exits 1.
        """
        await self.start_server("--block-duration", "600")
        alice = Peer(self, "alice")
        await alice.started()
        alice.send("/logout")
        self.assertEqual(await alice.ended(), 0)
        alice.start(password_file=False)
        await alice.expect(r"^password for alice:$")
        alice.send("wrong one")
        await alice.expect(r"^wrong password$")
        alice.send(PASSWORD)
        await alice.expect(r"^welcome, alice!$")
        alice.send("/logout")
        await alice.ended()
        alice.start(password_file=False)
        for attempt in ["bad 1", "bad 2"]:
            await alice.expect(r"^password for alice:$")
            alice.send(attempt)
            await alice.expect(r"^wrong password$")
        alice.send("bad 3")
        await alice.expect(r"^wrong password too many times: alice is now blocked")
        self.assertEqual(await alice.ended(), 1)
        alice.start()
        await alice.expect(r"^alice is blocked after failed logins")
        self.assertEqual(await alice.ended(), 1)
        self.assertFalse(os.path.exists(os.path.join(alice.data_dir, "p2ppeer.pid")), "twistd cleaned up first")

    async def test_already_online_and_same_directory(self) -> None:
        """Peers started from one directory all run; a second copy of the same user is refused."""
        await self.start_server()
        shared = self.home("shared")
        alice = await Peer(self, "alice", shared).started(cwd=shared)
        await Peer(self, "bob", shared).started(cwd=shared)
        await alice.expect(r"^bob logged in$")
        twin = Peer(self, "alice", shared).start(cwd=shared)
        self.assertNotEqual(await twin.ended(), None)
        self.assertEqual(await twin.ended(), 1)
        self.assertTrue(any(line.startswith("alice is running already from ") for line in twin.lines), twin.lines)
        elsewhere = Peer(self, "alice", self.home("elsewhere")).start()
        await elsewhere.expect(r"^cannot log in: alice is already logged in elsewhere \(a session whose network was cut off ends within 45 s\)$")
        self.assertEqual(await elsewhere.ended(), 1)
        await alice.command("/who", r"^online: bob$")
        self.assertTrue(os.path.exists(os.path.join(alice.data_dir, "p2ppeer.pid")))


class TerminalTests(PeerTestCase):
    async def test_on_a_terminal(self) -> None:
        """
        On a terminal, as a person uses it: the password asked twice at the first run and never
        shown; the terminal in character mode without echo, asked to mark pastes; a paste stays on
        the line; a line edited with the keys before it runs; stopped (ctrl-Z) and continued (fg)
        after the shell put the terminal back in line mode, the peer takes it back and redraws its
        prompt; ctrl-D on an empty line logs out, and the terminal no longer marks pastes.
        """
        await self.start_server()
        screen = TerminalRunner()
        Peer(self, "alice").start(password_file=False, terminal=screen)
        await screen.wait(lambda: screen.shows("password for alice:"), "the password prompt")
        screen.type(PASSWORD.encode() + b"\r")
        await screen.wait(lambda: screen.shows("the same password again, to confirm:"), "the confirmation")
        screen.type(PASSWORD.encode() + b"\r")
        await screen.wait(lambda: screen.shows("welcome, alice!") and screen.shows("alice>"), "the welcome")
        self.assertFalse(screen.shows(PASSWORD))
        self.assertFalse(screen.line_mode())
        self.assertTrue(screen.pastes_marked())
        screen.type(b"\x1b[200~/who\rquit\r\x1b[201~")  # a paste: text on the line, nothing run
        await screen.wait(lambda: screen.rows()[screen.screen.cursor.y] == "alice> /who quit", "the paste")
        screen.type(b"\x15")
        screen.type(b"/wx\x7fho\x1b[D\x1b[C\r")
        # The whole row: "nobody else is online now" came after the welcome.
        await screen.wait(lambda: "nobody else is online" in screen.rows(), "the answer to /who")
        screen.type(b"/wh")
        await screen.wait(lambda: screen.rows()[screen.screen.cursor.y] == "alice> /wh", "the typed keys")

        screen.signal("STOP")
        screen.set_line_mode()  # what a shell does with the terminal meanwhile
        screen.screen.reset()  # and its lines on the screen
        written = screen.received
        screen.transport.signalProcess(signal.SIGCONT)  # by number: Twisted knows a few signals by name
        await screen.wait(lambda: screen.received > written and screen.shows("alice> /wh"), "the prompt again")
        self.assertFalse(screen.line_mode())
        self.assertTrue(screen.pastes_marked())
        screen.type(b"o\r")
        await screen.wait(lambda: "nobody else is online" in screen.rows(), "the answer to /who after fg")

        screen.type(b"/msg bob " + b"x" * 80)  # wider than the terminal is about to be
        await screen.wait(lambda: screen.rows()[screen.screen.cursor.y].endswith("x" * 20), "the long line")
        written = screen.received
        screen.resize(40)  # the kernel tells the peer (SIGWINCH): the line is drawn again to fit
        await screen.wait(lambda: screen.received > written, "the line redrawn")
        self.assertLess(screen.screen.cursor.x, 40)
        self.assertEqual(len(screen.rows()[screen.screen.cursor.y]), 39)
        screen.type(b"\x15")

        screen.type(b"\x04")
        self.assertEqual(await with_timeout(screen.when_ended(), 20, "alice to exit"), 0)
        self.assertFalse(screen.pastes_marked())  # the terminal as the shell had it


class SpoofTests(PeerTestCase):
    async def test_spoofed_connections_show_nothing(self) -> None:
        """Raw TCP and TLS connections to bob's port claiming to be alice get nothing displayed."""
        await self.start_server()
        alice, bob = await self.peers("alice", "bob")
        found = await self.as_carol("lookup", user="bob")
        port, bob_fp = found["port"], found["fingerprint"]
        # Plain TCP, no TLS at all.
        raw = await TCP4ClientEndpoint(reactor, "127.0.0.1", port).connect(Factory.forProtocol(Protocol))
        raw.transport.write(b'{"type":"hello","protocol":1,"user":"alice"}\n{"type":"msg","msg_id":"x","text":"spoof 1","sent_at":1}\n')
        # TLS with mallory's own key, claiming alice, expecting bob's real key.
        mallory = crypto.generate_identity("alice")
        tls = await wrapClientTLS(peer_connector_creator(mallory, bob_fp), TCP4ClientEndpoint(reactor, "127.0.0.1", port)).connect(
            Factory.forProtocol(Protocol)
        )
        tls.transport.write(b'{"type":"hello","protocol":1,"user":"alice"}\n{"type":"msg","msg_id":"y","text":"spoof 2","sent_at":1}\n')
        self.addCleanup(raw.transport.loseConnection)
        self.addCleanup(tls.transport.loseConnection)
        alice.send("/msg bob the real alice")
        await bob.expect(r"^alice: the real alice$")
        self.assertFalse([line for line in bob.lines if "spoof" in line], bob.lines)

    async def as_carol(self, op: str, **args) -> dict:
        """Ask the server something as a third user, carol, over the protocol by hand."""
        trust = ServerTrust("127.0.0.1", pinned=self.server.fingerprint)
        endpoint = wrapClientTLS(trust.creator(), TCP4ClientEndpoint(reactor, "127.0.0.1", self.server_port))
        client = await endpoint.connect(LineClientFactory())
        self.addCleanup(client.transport.loseConnection)
        await client.event("hello")
        await client.request("hello", protocol=1)
        fingerprint, envelope_key = crypto.generate_identity("carol").fingerprint, crypto.generate_envelope_key().public_b64
        await client.request("register", username="carol", password=PASSWORD, fingerprint=fingerprint, envelope_key=envelope_key)
        await client.request("login", username="carol", password=PASSWORD, port=0)
        reply = await client.request(op, **args)
        self.assertTrue(reply.ok, reply)
        return reply.result

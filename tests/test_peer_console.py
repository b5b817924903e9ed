"""Tests for p2pchat.peer.console: command parsing, rendering, and the console over pipes and terminals."""

from __future__ import annotations

import inspect
import re
import sqlite3
import time
from typing import Any

import pyte
from hypothesis import example, given, settings
from hypothesis import strategies as st
from twisted.internet.defer import Deferred
from twisted.internet.testing import StringTransport
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial import unittest

from p2pchat.crypto import format_fingerprint
from p2pchat.peer import console
from p2pchat.peer.console import (
    MAX_INPUT,
    MAX_LINES_AHEAD,
    Command,
    Console,
    UsageError,
    clean,
    parse,
    render,
    render_entry,
    render_error,
    render_fingerprint,
)
from p2pchat.peer.history import Entry
from p2pchat.peer.messenger import LATE, CommandError, FingerprintInfo


class CompleteTests(unittest.SynchronousTestCase):
    @given(st.text(max_size=40), st.lists(st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,8}", fullmatch=True), max_size=8))
    def test_any_line(self, before: str, users: list[str]) -> None:
        """Whatever is typed, Tab adds to the word being typed the letters all candidates share,
        and lists candidates only when there is nothing to add."""
        rest, candidates = console.complete(before, users)
        letters = rest.removesuffix(" ")
        self.assertFalse(any(c.isspace() for c in letters), rest)
        if rest.endswith(" "):  # the one candidate, completed
            self.assertEqual(candidates, [])
        word = re.search(r"(\S*)$", before + letters).group(1).removeprefix("/")
        for candidate in candidates:
            self.assertTrue(candidate.removeprefix("/").startswith(word), (before, rest, candidate))


class ParseTests(unittest.SynchronousTestCase):
    def test_commands_and_aliases(self) -> None:
        """Every seed's words reach the same command, with or without the slash, in any case."""
        cases = {
            "/msg bob hi": Command("msg", ("bob", "hi")),
            "/message bob hi": Command("msg", ("bob", "hi")),
            "send bob hi": Command("msg", ("bob", "hi")),
            "whoelse": Command("who", ()),
            "/LIST": Command("who", ()),
            "/discover": Command("who", ()),
            "whoelsesince 60": Command("whosince", (60.0,)),
            "/exit": Command("logout", ()),
            "quit": Command("logout", ()),
            "/mute bob": Command("mute", ("bob", None)),
            "/mute bob 2.5": Command("mute", ("bob", 2.5)),
            "/history bob 5": Command("history", ("bob", 5)),
            "/fingerprint": Command("fingerprint", (None,)),
            "/startprivate bob": Command("startprivate", ("bob",)),
            "/private bob  psst ": Command("private", ("bob", "psst")),
        }
        for line, expected in cases.items():
            self.assertEqual(parse(line), expected, line)

    def test_text_kept_verbatim(self) -> None:
        """The message text keeps its inner spacing and punctuation."""
        self.assertEqual(parse("/msg bob   a  b\tc /who ").args[1], "a  b\tc /who")

    def test_blank_is_nothing(self) -> None:
        """Empty and blank lines are no command (and no error)."""
        for line in ["", "   ", "\t"]:
            self.assertIsNone(parse(line))

    def test_usage_errors(self) -> None:
        """Missing or malformed arguments and unknown commands are refused with a sentence saying what to type."""
        cases = {
            "/msg": "usage: /msg USER TEXT",
            "/msg bob": "usage: /msg USER TEXT",
            "/msg bob    ": "usage: /msg USER TEXT",
            "/who now": "too many arguments",
            "/whosince": "usage: /whosince SECONDS",
            "/whosince -1": "SECONDS must be",
            "/whosince nan": "SECONDS must be",
            "/mute bob 0": "SECONDS must be",
            "/mute bob soon": "SECONDS must be",
            "/history bob 0": "N must be",
            "/history bob 1.5": "N must be",
            "/history bob 1001": "N must be",
            "/whosince inf": "SECONDS must be",
            "/mute bob 1e10": "SECONDS must be",
            "/frobnicate": "unknown command /frobnicate",
            "hello there": "is not a command",
        }
        for line, message in cases.items():
            with self.assertRaises(UsageError, msg=line) as caught:
                parse(line)
            self.assertIn(message, str(caught.exception), line)

    def test_huge_unknown_word_shortened(self) -> None:
        """An unknown command is echoed back shortened, not in full."""
        with self.assertRaises(UsageError) as caught:
            parse("/" + "x" * 10000)
        self.assertLess(len(str(caught.exception)), 200)

    def test_help_lists_everything(self) -> None:
        """/help names every command and alias, and the editing keys."""
        text = console.help_text()
        for spec in console.SPECS:
            for name in (spec.name, *spec.aliases):
                self.assertIn("/" + name, text)
        self.assertIn("up and down bring back lines entered before", text)


class RenderTests(unittest.SynchronousTestCase):
    def test_formats(self) -> None:
        """Messages, presence and broadcasts read as the issue asks."""
        self.assertEqual(render("message", user="alice", text="hi", private=False), "alice: hi")
        self.assertEqual(render("message", user="alice", text="hi", private=True), "alice (private): hi")
        self.assertEqual(render("presence", user="bob", online=True), "bob logged in")
        self.assertEqual(render("presence", user="bob", online=False), "bob logged out")
        many = [f"u{i:02d}" for i in range(12)]
        self.assertEqual(render("presence_many", users=many, online=True),
                         "12 users logged in: u00, u01, u02, u03, u04, u05, u06, u07, u08, u09 and 2 more")
        self.assertEqual(render("presence_many", users=many[:6], online=False),
                         "6 users logged out: u00, u01, u02, u03, u04, u05")
        self.assertEqual(render("online_now", users=["bob", "carol"]), "online now: bob, carol")
        self.assertTrue(render("online_now", users=many).endswith("u08, u09 and 2 more"))
        self.assertEqual(render("online_now", users=[]), "nobody else is online now")
        self.assertEqual(render("broadcast", user="bob", text="all"), "bob (broadcast): all")
        self.assertTrue(render("broadcasts_dropped", count=1).startswith("1 broadcast not shown: "))
        self.assertTrue(render("broadcasts_dropped", count=3).startswith("3 broadcasts not shown: "))
        self.assertEqual(render("welcome", user="bob", mailbox=0), "welcome, bob!")
        self.assertIn("2 messages arrived", render("welcome", user="bob", mailbox=2))

    def test_late_message_says_when(self) -> None:
        """A message shown long after it was written (kept while you were away) says when, in local time."""
        sent_at = time.mktime((2026, 12, 3, 14, 2, 5, 0, 0, -1))
        self.assertEqual(render("message", user="bob", text="coming?", private=False, sent_at=sent_at),
                         "bob: coming? (sent 2026-12-03 14:02:05)")
        self.assertEqual(render("message", user="bob", text="now", private=False), "bob: now")
        self.assertEqual(render("broadcast", user="bob", text="all", sent_at=sent_at),
                         "bob (broadcast): all (sent 2026-12-03 14:02:05)")

    def test_history_in_the_order_taken(self) -> None:
        """/history gives each message the time this peer took it (its order); one that came more
        than LATE seconds after it was written also says when it was (the sender's word: a time the
        platform cannot show, from a clock far off, is said to be out of range)."""
        took = 1_764_770_525.0
        self.assertEqual(render_entry(Entry("bob", False, "m1", "hi", False, "shown", took - LATE, took)),
                         f"[{console._time(took)}] bob: hi")
        self.assertEqual(render_entry(Entry("bob", False, "m1", "hi", False, "muted", took - LATE - 1, took)),
                         f"[{console._time(took)}] bob: hi (sent {console._time(took - LATE - 1)}) (muted)")
        self.assertEqual(render_entry(Entry("bob", True, "m1", "yo", False, "sent", took - 3600, took)),
                         f"[{console._time(took)}] you -> bob: yo (sent)")
        for sent_at in (-1e20, -1e18):
            self.assertEqual(render_entry(Entry("bob", False, "m1", "hi", False, "shown", sent_at, took)),
                             f"[{console._time(took)}] bob: hi (sent time out of range)")

    def test_history_hides_held_text(self) -> None:
        """/history does not show what came signed with a changed key not accepted yet: only that
        something waits for /trust; muted messages are shown, marked."""
        held = render_entry(Entry("bob", False, "m1", "click this link", False, "held", 1.0, 1.0))
        self.assertNotIn("click", held)
        self.assertTrue(held.endswith("bob: (held until you accept the new key: /fingerprint bob, /trust bob)"), held)
        self.assertTrue(render_entry(Entry("bob", False, "m1", "hush", False, "muted", 1.0, 1.0)).endswith("bob: hush (muted)"))
        self.assertTrue(render_entry(Entry("bob", False, "m1", "hi", False, "shown", 1.0, 1.0)).endswith("bob: hi"))

    def test_every_event_renders(self) -> None:
        """Every event the messenger can show has a template that accepts its fields."""
        samples = {"user": "bob", "text": "t", "private": False, "online": True, "mailbox": 1, "server": "h:1",
                   "message": "m", "code": "c", "reason": "r", "fingerprint": "f" * 64, "old": "a", "new": "b",
                   "chosen": True, "by_peer": True, "seconds": 30.0, "count": 2, "trusted": False, "sent_at": 1e9,
                   "users": ["bob", "carol"]}
        for event, template in console._EVENTS.items():
            names = inspect.signature(template).parameters
            line = render(event, **{name: samples[name] for name in names})
            self.assertTrue(line and "\n" not in line, event)

    def test_text_of_every_script_shown_whole(self) -> None:
        """What terminals only show, though Python does not count it printable, is kept: emoji joined
        by ZWJ, flags made of tags, ZWNJ inside Persian words, RTL marks, every kind of space. What
        reorders a line (bidi overrides, embeddings, isolates) or breaks it still goes."""
        kept = ["\U0001F468\u200d\U0001F469\u200d\U0001F467", "\u2764\ufe0f\u200d\U0001F525",
                "\U0001F3F4\U000E0067\U000E0062\U000E0073\U000E0063\U000E0074\U000E007F",  # Scotland
                "\u0645\u06cc\u200c\u062e\u0648\u0627\u0647\u0645", "\u05e9\u05dc\u05d5\u05dd\u200f!",
                "Bonjour\u00a0!", "\u3053\u3093\u306b\u3061\u306f\u3000\u4e16\u754c", "e\u0301 \u0928\u092e\u0938\u094d\u0924\u0947"]
        for text in kept:
            self.assertEqual(render("message", user="bob", text=text, private=False), f"bob: {text}")
        for evil in ("\u202e", "\u202a", "\u2066", "\u2069", "\u2028", "\u009b", "\U000E0001", "\ufeff"):
            self.assertEqual(clean(f"a{evil}b"), "a\ufffdb", repr(evil))

    def test_remote_text_cannot_drive_the_terminal(self) -> None:
        """Escape sequences and control characters in what others write, or the server says, are
        neutralised wherever they are shown: as they come, in /history, in errors."""
        evil = "\x1b[2J\x07bell\rback\u202eevil"
        line = render("message", user="bob", text=evil, private=False)
        self.assertNotIn("\x1b", line)
        self.assertNotIn("\r", line)
        self.assertNotIn("\u202e", line)
        self.assertEqual(clean("tab\there"), "tab here")
        samples = {"user": "bob", "text": evil, "private": False, "online": True, "mailbox": 1, "server": "h:1",
                   "message": evil, "code": evil, "reason": evil, "fingerprint": "f" * 64, "old": "a", "new": "b",
                   "chosen": True, "by_peer": True, "seconds": 30.0, "count": 2, "trusted": False, "sent_at": 1e20,
                   "users": ["bob"]}
        lines = {event: render(event, **{name: samples[name] for name in inspect.signature(template).parameters})
                 for event, template in console._EVENTS.items()}
        lines["send_failed rate_limited"] = render("send_failed", user="bob", code="rate_limited", message=evil, text=evil)
        for code in [*console._ERRORS, "weird", evil]:
            lines[code] = render_error(code, user="bob", message=evil)
        lines["bare code"] = render_error(evil)
        for outgoing in (True, False):
            lines[f"history {outgoing}"] = render_entry(Entry("bob", outgoing, "m1", evil, False, "delivered", 1.0, 1.0))
        for name, line in lines.items():
            self.assertTrue(line.isprintable(), f"{name}: {line!r}")

    def test_key_change_says_which_key(self) -> None:
        """A changed identity key is said with both fingerprints; a changed encryption key alone
        (one pinned before keys were signed) says the identity key is the same."""
        a, b = "aa" * 32, "bb" * 32
        self.assertIn("IDENTITY KEY HAS CHANGED (was " + format_fingerprint(a), render("key_changed", user="bob", old=a, new=b))
        self.assertIn("ENCRYPTION KEY HAS CHANGED (with the same identity key, " + format_fingerprint(a),
                      render("key_changed", user="bob", old=a, new=a))

    def test_fingerprint_lines(self) -> None:
        """/fingerprint shows what is pinned, a change not accepted (loudly, with the way to accept
        it), and whether the server agrees; fingerprints in groups of four, as people compare them."""
        a, b, c = "aa" * 32, "bb" * 32, "cc" * 32
        fa, fb, fc = (format_fingerprint(f) for f in (a, b, c))
        self.assertEqual(fa, " ".join(["aaaa"] * 16))
        self.assertEqual(render_fingerprint(FingerprintInfo("alice", a, None, a), "alice"), f"your fingerprint: {fa}")
        self.assertEqual(render_fingerprint(FingerprintInfo("bob", a, None, a), "alice"), f"bob: pinned {fa}\n  the server agrees")
        self.assertEqual(render_fingerprint(FingerprintInfo("bob", None, None, None), "alice"), "bob: no key pinned yet")
        self.assertEqual(
            render_fingerprint(FingerprintInfo("bob", a, b, b), "alice").splitlines(),
            [f"bob: pinned {fa}", f"  CHANGED to {fb} (not accepted; /trust bob accepts it)", "  the server has the new key"],
        )
        self.assertEqual(render_fingerprint(FingerprintInfo("bob", a, None, c), "alice").splitlines()[1],
                         f"  the server now says {fc}")

    def test_errors_name_the_reason(self) -> None:
        """Each error code gives one line naming the reason; unknown codes fall back to the server's words."""
        self.assertEqual(render_error("unknown_user", user="zed", message="x"), "there is no user named zed")
        self.assertEqual(render_error("blocked_by_user", user="bob"), "bob has blocked you")
        self.assertEqual(render_error("offline", user="bob"), "bob is offline")
        self.assertEqual(render_error("yourself"), "that is you")
        self.assertIn("/startprivate bob", render_error("no_private_session", user="bob"))
        self.assertIn("unreachable", render_error("not_connected", chosen=False, server="h:1"))
        self.assertIn("/online", render_error("not_connected", chosen=True, server="h:1"))
        self.assertEqual(render_error("weird", message="the server says"), "the server says (weird)")
        self.assertEqual(render_error("weird"), "weird")


class FakeMessenger:
    """Records the commands the console runs."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple[Any, ...]]] = []
        self.errors: dict[str, Exception] = {}

    def known_users(self) -> list[str]:
        return ["bob", "bobby", "carol"]

    def __getattr__(self, name: str) -> Any:
        async def command(*args: Any) -> Any:
            self.calls.append((name, args))
            if name in self.errors:
                raise self.errors[name]
            return {
                "who": ["bob", "carol"],
                "whosince": [],
                "broadcast": (2, 1),
                "history": [],
                "fingerprint": FingerprintInfo("alice", "ab" * 32, None, "ab" * 32),
            }.get(name)

        return command


class ConsoleTestCase(unittest.SynchronousTestCase):
    terminal = False
    columns = 80

    def setUp(self) -> None:
        self.messenger = FakeMessenger()
        self.console = Console("alice", self.terminal, lambda: self.columns)
        self.console.attach(self.messenger)
        self.transport = StringTransport()
        self.console.makeConnection(self.transport)

    def output(self) -> str:
        value = self.transport.value().decode("utf-8")
        self.transport.clear()
        return value

    def type(self, data: bytes) -> None:
        self.console.dataReceived(data)


class PipeTests(ConsoleTestCase):
    def test_commands_in_order_after_start(self) -> None:
        """Lines typed before commands start are kept and then run in order."""
        self.type(b"/msg bob one\n/msg bob two\r\n/who\n")
        self.assertEqual(self.messenger.calls, [])
        self.console.start_commands()
        self.assertEqual(
            self.messenger.calls, [("send", ("bob", "one")), ("send", ("bob", "two")), ("who", ())]
        )
        self.assertEqual(self.output(), "online: bob, carol\n")

    def test_input_read_no_further_ahead_than_needed(self) -> None:
        """Past MAX_LINES_AHEAD lines waiting for their turn, the input is not read (a script
        piping a large file does not have it all in memory); once half are taken, it is again.
        Every line still runs, in order."""
        self.type(b"".join(b"/msg bob m%d\n" % i for i in range(MAX_LINES_AHEAD - 1)))
        self.assertEqual(self.transport.producerState, "producing")
        self.type(b"/who\n")
        self.assertEqual(self.transport.producerState, "paused")
        sends: list[Deferred[None]] = []
        self.messenger.send = lambda *args: sends.append(Deferred()) or sends[-1]  # each /msg waits
        self.console.start_commands()  # takes the first line: 63 wait
        for _ in range(MAX_LINES_AHEAD // 2 - 2):
            sends[-1].callback(None)  # the next is taken
        self.assertEqual(self.transport.producerState, "paused")  # 33 wait
        sends[-1].callback(None)
        self.assertEqual(self.transport.producerState, "producing")  # 32 wait
        while len(sends) < MAX_LINES_AHEAD - 1:
            sends[-1].callback(None)
        sends[-1].callback(None)
        self.assertEqual(len(sends), MAX_LINES_AHEAD - 1)
        self.assertEqual(self.messenger.calls, [("who", ())])

    def test_password_is_first_line(self) -> None:
        """On a pipe the password is the next line (not a command); later there is none to give."""
        self.type(b"sekrit\n/who\n")
        password = self.console.password(False)
        self.assertEqual(self.successResultOf(password), "sekrit")
        self.console.start_commands()
        self.assertEqual(self.messenger.calls, [("who", ())])
        self.assertIsNone(self.successResultOf(self.console.password(True)))

    def test_errors_are_one_line(self) -> None:
        """Errors from the messenger and from parsing print one line each; the console goes on."""
        self.messenger.errors["send"] = CommandError("unknown_user", user="zed")
        self.console.start_commands()
        self.type(b"/msg zed hi\n/bogus\n\n/who\n")
        self.assertEqual(
            self.output().splitlines(),
            ["error: there is no user named zed", "error: unknown command /bogus; /help lists the commands",
             "online: bob, carol"],
        )

    def test_unexpected_exception_contained(self) -> None:
        """A bug in a command prints an error line instead of stopping the console."""
        self.messenger.errors["who"] = ZeroDivisionError()
        self.console.start_commands()
        self.type(b"/who\n/broadcast hi\n")
        lines = self.output().splitlines()
        self.assertIn("something went wrong", lines[0])
        self.assertEqual(lines[1], "broadcast sent to 2 users; 1 user could not get it (they blocked you)")
        self.flushLoggedErrors(ZeroDivisionError)

    def test_history_failure_named(self) -> None:
        """A history that cannot be written (a full disk) is named, not a generic error; the log
        names the command, not what the message said."""
        logged: list[dict] = []
        globalLogPublisher.addObserver(logged.append)
        self.addCleanup(globalLogPublisher.removeObserver, logged.append)
        self.messenger.errors["send"] = sqlite3.OperationalError("database or disk is full")
        self.console.start_commands()
        self.type(b"/msg bob my secret words\n")
        self.assertEqual(
            self.output(), "error: the history could not be read or written (database or disk is full)\n"
        )
        self.flushLoggedErrors(sqlite3.OperationalError)
        lines = [formatEvent(event) for event in logged]
        self.assertIn("command /msg", lines)
        self.assertFalse([line for line in lines if "secret" in line], lines)

    def test_huge_line_refused(self) -> None:
        """A line over the limit (even arriving in pieces) is refused once, whole; the next line works."""
        self.console.start_commands()
        chunk = b"x" * 100_000
        for _ in range(10):
            self.type(chunk)
        self.type(b"still the long line\n/who\n")
        lines = self.output().splitlines()
        self.assertEqual(lines, [f"error: input line longer than {MAX_INPUT} bytes; ignored", "online: bob, carol"])
        self.assertEqual(self.messenger.calls, [("who", ())])

    def test_binary_refused(self) -> None:
        """Bytes that are not UTF-8 are refused with a clear error."""
        self.console.start_commands()
        self.type(b"\xff\xfe\x00garbage\n")
        self.assertEqual(self.output(), "error: input is not valid UTF-8; line ignored\n")

    def test_end_of_input_logs_out(self) -> None:
        """The end of input (a closed pipe) runs /logout after the lines before it, even an unterminated one."""
        self.console.start_commands()
        self.type(b"/msg bob bye")
        self.console.readConnectionLost()
        self.assertEqual(self.messenger.calls, [("send", ("bob", "bye")), ("logout", ())])

    def test_logout_ends_the_commands(self) -> None:
        """After /logout no further line runs, and the end of input does not log out a second time."""
        self.console.start_commands()
        self.type(b"/logout\n/msg bob too late\n")
        self.console.readConnectionLost()
        self.assertEqual(self.messenger.calls, [("logout", ())])
        self.assertEqual(self.output(), "logging out\n")

    def test_drained_once_output_has_gone_out(self) -> None:
        """The console is the producer of stdout: while stdout's buffer is full, drained() waits for
        it to empty (so messages are taken in no faster than they can be shown); otherwise at once."""
        self.assertIs(self.transport.producer, self.console)
        self.successResultOf(self.console.drained())
        self.console.pauseProducing()
        waiting = [self.console.drained(), self.console.drained()]
        self.assertNoResult(waiting[0])
        self.console.resumeProducing()
        for d in waiting:
            self.successResultOf(d)
        self.console.pauseProducing()
        gone = self.console.drained()
        self.console.stopProducing()  # stdout closed: nothing waits for it
        self.successResultOf(gone)
        self.successResultOf(self.console.drained())

    def test_show_prints_lines(self) -> None:
        """Events from the messenger print as plain lines on a pipe."""
        self.console.show("message", user="bob", text="hi", private=False)
        self.assertEqual(self.output(), "bob: hi\n")

    def test_command_outputs(self) -> None:
        """Commands confirm what they did."""
        self.console.start_commands()
        self.type(b"/block bob\n/mute bob 30\n/mute carol\n/whosince 60\n/fingerprint\n")
        self.assertEqual(
            self.output().splitlines(),
            ["blocked bob", "muted bob for 30 s", "muted carol until /unmute",
             "nobody else was online during the last 60 s", "your fingerprint: " + " ".join(["abab"] * 16)],
        )


class TerminalTests(ConsoleTestCase):
    """The console on a terminal, seen through a terminal emulator (pyte) as its user sees it."""

    terminal = True
    columns = 40

    def setUp(self) -> None:
        super().setUp()
        self.screen = pyte.Screen(self.columns, 12)
        self.screen.set_mode(pyte.modes.LNM)  # a newline returns the carriage too, as the tty's ONLCR does
        self.stream = pyte.ByteStream(self.screen)

    def look(self) -> list[str]:
        """The screen's rows down to the last one written, without trailing blanks."""
        self.stream.feed(self.output().encode())
        rows = [row.rstrip() for row in self.screen.display]
        while rows and not rows[-1]:
            rows.pop()
        return rows

    def cursor_after(self) -> str:
        """What the row holding the cursor shows before the cursor."""
        self.look()
        row = self.screen.buffer[self.screen.cursor.y]
        return "".join(row[x].data for x in range(self.screen.cursor.x)).replace(" ", "·")

    def test_prompt_echo_and_editing(self) -> None:
        """Keys are echoed after a prompt; backspace edits; keys of no use here (F1, Alt-x) are dropped;
        the entered line stays on the screen above the command's output and a new prompt."""
        self.console.start_commands()
        self.assertEqual(self.look(), ["alice>"])
        self.type(b"/whx\x7fo\x1bOP\x1bx")
        self.assertEqual(self.look(), ["alice> /who"])
        self.type(b"\r")
        self.assertEqual(self.messenger.calls, [("who", ())])
        self.assertEqual(self.look(), ["alice> /who", "online: bob, carol", "alice>"])
        self.type("/msg bob h\u00e9".encode()[:-1])
        self.type("/msg bob h\u00e9".encode()[-1:] + b"\x15/who\r")
        self.assertEqual(self.messenger.calls[-1], ("who", ()))

    def test_cursor_keys(self) -> None:
        """Left and right (arrows, ctrl-B/F), Home and End (keys, ctrl-A/E), Delete and ctrl-D under the
        cursor, ctrl-W the word before it, ctrl-K the rest, ctrl-U what is before it."""
        self.console.start_commands()
        self.type(b"/msg bob helo wrld")
        self.type(b"\x1b[D" * 3 + b"o")  # arrows as most terminals send them
        self.assertEqual(self.look(), ["alice> /msg bob helo world"])
        self.assertEqual(self.cursor_after(), "alice>·/msg·bob·helo·wo")
        self.type(b"\x1bOD" * 3 + b"\x02" + b"l")  # arrows in application mode; ctrl-B
        self.assertEqual(self.look(), ["alice> /msg bob hello world"])
        self.type(b"\x01\x1b[3~\x04")  # ctrl-A, Delete, ctrl-D on a line that has text
        self.assertEqual(self.look(), ["alice> sg bob hello world"])
        self.assertEqual(self.cursor_after(), "alice>·")
        self.type(b"/m\x05\x17\x17")  # ctrl-E, then two words back
        self.assertEqual(self.look(), ["alice> /msg bob"])
        self.type(b"\x1b[H\x1b[C\x1b[C\x1b[C\x1b[C\x0b")  # Home, four right, ctrl-K
        self.assertEqual(self.look(), ["alice> /msg"])
        self.type(b"\x1b[F bob hi\x1b[1~\x1b[C\x1b[C\x1b[C\x1b[C\x15")  # End; Home as \x1b[1~; ctrl-U
        self.assertEqual(self.look(), ["alice>  bob hi"])
        self.assertEqual(self.cursor_after(), "alice>·")
        self.type(b"/msg\r")
        self.assertEqual(self.messenger.calls, [("send", ("bob", "hi"))])

    def test_up_and_down_recall_lines(self) -> None:
        """Up and down go through the lines entered before; the line being written comes back last."""
        self.console.start_commands()
        self.type(b"/msg bob one\r/who\r/who\r  \r/msg bob dra")
        self.type(b"\x1b[A")
        self.assertEqual(self.look()[-1], "alice> /who")
        self.type(b"\x1b[A\x1b[A\x1b[A")  # /who once (entered twice in a row), blank lines not at all
        self.assertEqual(self.look()[-1], "alice> /msg bob one")
        self.type(b"\x1b[B\x1b[B")
        self.assertEqual(self.look()[-1], "alice> /msg bob dra")
        self.type(b"\x10\x10\x08\x08\x08two\r")  # ctrl-P twice, then edit what came back
        self.assertEqual(self.messenger.calls[-1], ("send", ("bob", "two")))

    def test_long_line_scrolls_sideways(self) -> None:
        """A line longer than the terminal never wraps while it is typed: it scrolls under the cursor,
        so an incoming message erases it whole; entered, it shows whole."""
        self.console.start_commands()
        text = " ".join(f"w{i:02d}" for i in range(30))
        self.type(f"/msg bob {text}".encode())
        self.assertEqual(self.look(), ["alice> " + text[-32:]])
        self.assertEqual(self.screen.cursor.x, self.columns - 1)
        self.console.show("message", user="bob", text="hi", private=False)
        self.assertEqual(self.look(), ["bob: hi", "alice> " + text[-32:]])
        self.type(b"\x01")
        self.assertEqual(self.look(), ["bob: hi", "alice> " + f"/msg bob {text}"[:32]])
        self.assertEqual(self.cursor_after(), "alice>·")
        self.type(b"\r")
        self.assertEqual(self.messenger.calls, [("send", ("bob", text))])
        whole = f"alice> /msg bob {text}"
        self.assertEqual(self.look()[1:4], [whole[at : at + 40].rstrip() for at in (0, 40, 80)])

    def test_wide_and_combining_characters(self) -> None:
        """Wide characters take two columns and combining marks none: the cursor lands where the
        terminal put the text, also when the line scrolls, and backspace takes a letter with its
        accent."""
        self.console.start_commands()
        self.type("/msg bob 你好👋e\u0301".encode())
        self.assertEqual(self.cursor_after(), "alice>·/msg·bob·你好👋\u00e9")  # the terminal composes the two
        self.type(b"\x7f\x1b[D")
        self.assertEqual(self.look(), ["alice> /msg bob 你好👋"])
        self.assertEqual(self.cursor_after(), "alice>·/msg·bob·你好")
        self.type(b"\x05" + "漢字".encode() * 10)
        rows = self.look()
        self.assertEqual(len(rows), 1)  # no wrapping
        self.assertTrue(rows[0].endswith("漢字漢字"), rows)
        self.assertLessEqual(self.screen.cursor.x, self.columns - 1)
        self.type(b"\r")
        self.assertEqual(self.messenger.calls, [("send", ("bob", "你好👋" + "漢字" * 10))])

    def test_incoming_line_keeps_typing(self) -> None:
        """An incoming message erases the prompt line, prints, then redraws the prompt and the partial
        input with the cursor where it was."""
        self.console.start_commands()
        self.type(b"/msg bob hel\x1b[D\x1b[D")
        self.console.show("message", user="bob", text="hi", private=False)
        self.assertEqual(self.look(), ["bob: hi", "alice> /msg bob hel"])
        self.assertEqual(self.cursor_after(), "alice>·/msg·bob·h")

    @settings(max_examples=200, deadline=None)
    @example([b"\t"] * 20)  # Tab's candidates printed until the screen scrolls
    @given(st.lists(st.binary(max_size=40) | st.sampled_from(
        [b"\x1b[A", b"\x1b[B", b"\x1b[C", b"\x1b[D", b"\x1b[3~", b"\x7f", b"\x01", b"\x05", b"\x0b",
         b"\x15", b"\x17", "\u4f60\U0001f44be\u0301".encode(), b"abc def "]), max_size=30))
    def test_any_keys(self, chunks: list[bytes]) -> None:
        """Whatever bytes come from the keyboard, in whatever pieces: no error, the prompt line
        never wraps and the cursor stays on it, inside the line being typed."""
        self.setUp()
        self.console.start_commands()
        for chunk in chunks:
            self.type(chunk.replace(b"\r", b"").replace(b"\n", b"").replace(b"\x04", b""))
            self.look()
            editor = self.console._editor
            self.assertTrue(0 <= editor.cursor <= len(editor.text))
            self.assertLess(self.screen.cursor.x, self.columns)
            # The cursor's row is the prompt's (not a wrapped part of it), with nothing below it.
            rows = self.screen.display
            self.assertTrue(rows[self.screen.cursor.y].startswith("alice> "), rows)
            self.assertEqual("".join(rows[self.screen.cursor.y + 1 :]).strip(), "")

    def test_tab_completes(self) -> None:
        """Tab completes a command's name, then a username where the command takes one (from the
        users the peer knows), as far as the candidates agree; a second Tab lists them; none rings
        the bell."""
        self.console.start_commands()
        self.type(b"/ms\t")
        self.assertEqual(self.look(), ["alice> /msg"])
        self.type(b"b\t")  # as far as the candidates agree
        self.assertEqual(self.look(), ["alice> /msg bob"])
        self.type(b"\t")  # then which they are
        self.assertEqual(self.look(), ["bob  bobby", "alice> /msg bob"])
        self.type(b"b\t")
        self.assertEqual(self.look()[-1], "alice> /msg bobby")
        self.type(b"hi\t")
        self.assertIn("\a", self.output())
        self.type(b"\r/m\t")
        self.assertEqual(self.messenger.calls, [("send", ("bobby", "hi"))])
        self.assertEqual(self.look()[-2:], ["/message  /msg  /mute", "alice> /m"])
        self.type(b"\x15who \t")
        self.assertEqual(self.look()[-1], "alice> who")  # /who takes no user: nothing to add
        self.messenger.known_users = lambda: [f"u{i:03d}" for i in range(120)]
        self.output()
        self.type(b"\x15/msg u\t")  # a big server's users: a screenful at most
        listed = self.output()
        self.assertIn("u048  u049  ... and 70 more\n", listed)
        self.assertNotIn("u050", listed)

    def test_ctrl_l_clears_the_screen(self) -> None:
        """Ctrl-L clears the screen and puts the prompt line back at the top."""
        self.console.start_commands()
        self.console.show("message", user="bob", text="hi", private=False)
        self.type(b"/who\x0c")
        self.assertEqual(self.look(), ["alice> /who"])
        self.assertEqual(self.screen.cursor.y, 0)

    def test_typing_stops_at_the_longest_line(self) -> None:
        """Keys past the longest input line are not taken and ring the bell, once for a whole paste
        of them (not once per key); the line still runs."""
        self.console.start_commands()
        command = "/broadcast "
        self.type((command + "x" * (MAX_INPUT - len(command))).encode())
        self.output()
        for _ in range(3):
            self.type(b"yz" * 1000)
        self.assertEqual(self.output().count("\a"), 1)
        self.type(b"\x7fx\x7fxy")  # taken, taken, refused: rings again
        self.assertEqual(self.output().count("\a"), 1)
        self.type(b"\r")
        self.assertEqual(self.messenger.calls, [("broadcast", ("x" * (MAX_INPUT - len(command)),))])

    def test_paste_is_text_until_enter(self) -> None:
        """Pasted lines (marked by the terminal) join the line being typed, their breaks as spaces:
        none runs before Enter, even one that reads as a command (quit, trust bob)."""
        self.console.start_commands()
        self.type(b"/msg bob here:\x1b[200~ the log\r\nquit\rtrust bob\t!\r\x1b[201~")
        self.assertEqual(self.messenger.calls, [])
        self.assertEqual(self.look()[-1], "alice> b here: the log quit trust bob !")  # scrolled sideways
        self.type(b"\r")
        self.assertEqual(self.messenger.calls, [("send", ("bob", "here: the log quit trust bob !"))])

    def test_pasted_password(self) -> None:
        """A password pasted with the line break after it (copied from a file) is not entered with
        it, nor does it get a space: Enter enters it as it is."""
        password = self.console.password(False)
        self.type(b"\x1b[200~correct horse\n\x1b[201~")
        self.assertNoResult(password)
        self.type(b"\r")
        self.assertEqual(self.successResultOf(password), "correct horse")

    def test_password_prompt_sets_the_line_aside(self) -> None:
        """A password prompt that comes while a line is being typed (a registration once the server
        is back) puts the line aside and gives it back, cursor and all, once the password is in."""
        self.console.start_commands()
        self.type(b"/msg bob hello\x1b[D")
        password = self.console.password(False)
        self.assertEqual(self.look()[-1], "password for alice:")
        self.type(b"sekrit\r")
        self.assertEqual(self.successResultOf(password), "sekrit")
        self.assertEqual(self.look()[-1], "alice> /msg bob hello")
        self.assertEqual(self.cursor_after(), "alice>·/msg·bob·hell")
        self.type(b"\r")
        self.assertEqual(self.messenger.calls, [("send", ("bob", "hello"))])

    def test_tab_in_a_password(self) -> None:
        """In a password, Tab completes nothing: it is typed, as a space (as before editing came)."""
        password = self.console.password(False)
        self.type(b"two\twords\r")
        self.assertEqual(self.successResultOf(password), "two words")

    def test_password_not_echoed(self) -> None:
        """The password prompt does not echo what is typed, nor take keys that move over what it does
        not show or bring back lines entered before."""
        self.console.start_commands()
        self.type(b"/who\r")
        password = self.console.password(False)
        self.type(b"sek\x7fkrit\x1b[A\x1b[D\x01\x1b[3~!\r")
        self.assertEqual(self.successResultOf(password), "sekrit!")
        self.assertNotIn("krit", "\n".join(self.look()))
        self.type(b"\x1b[A")
        self.assertEqual(self.look()[-1], "alice> /who")  # the password is not among the lines recalled

    def test_password_confirmation_prompt(self) -> None:
        """Before registering, the password is asked once more, under a prompt that says so, not echoed."""
        first = self.console.password(False)
        self.assertEqual(self.look(), ["password for alice:"])
        self.type(b"sekrit\r")
        self.assertEqual(self.successResultOf(first), "sekrit")
        again = self.console.confirm_password()
        self.type(b"sekr")
        self.assertEqual(self.look(), ["password for alice:", "the same password again, to confirm:"])
        self.type(b"it\r")
        self.assertEqual(self.successResultOf(again), "sekrit")

    def test_ctrl_d_logs_out(self) -> None:
        """Ctrl-D on an empty line ends the session like /logout; a line erased in the same read
        is gone from the screen too. No prompt follows: the shell's comes next, on a line of its own."""
        self.console.start_commands()
        self.type(b"/who")
        self.type(b"\x15\x04")
        self.assertEqual(self.messenger.calls, [("logout", ())])
        self.assertEqual(self.look(), ["alice>", "logging out"])
        self.assertEqual((self.screen.cursor.x, self.screen.cursor.y), (0, 2))
        self.console.show("message", user="bob", text="bye", private=False)  # while logging out
        self.assertEqual(self.look(), ["alice>", "logging out", "bob: bye"])
        self.assertEqual((self.screen.cursor.x, self.screen.cursor.y), (0, 3))

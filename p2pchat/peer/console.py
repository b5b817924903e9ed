"""The terminal: parses command lines, runs them on the messenger, and renders everything the
user sees. Works line by line on pipes, and with a prompt and line editing on a terminal."""

from __future__ import annotations

import codecs
import math
import os
import re
import sqlite3
import termios
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IHalfCloseableProtocol, IPushProducer
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from ..crypto import format_fingerprint
from .lineedit import (
    BACKSPACE,
    BRACKETED_PASTE_OFF,
    BRACKETED_PASTE_ON,
    DELETE,
    ENTER,
    EOF,
    KILL_BEFORE,
    KILL_WORD,
    REDRAW,
    TAB,
    KeyDecoder,
    LineEditor,
    printable,
    width,
)
from .messenger import LATE, CommandError, FingerprintInfo, Messenger

if TYPE_CHECKING:
    from .history import Entry

log = Logger()

MAX_INPUT = 64 * 1024  # bytes in one input line; longer lines are refused whole
# Input lines read ahead of the command that runs: past it the input is not read until they are
# taken (a script piping a large file would otherwise have all of it read into memory).
MAX_LINES_AHEAD = 64
HISTORY_DEFAULT = 20
PRESENCE_NAMES = 10  # names listed in a line about many users logging in or out
COMPLETIONS_SHOWN = 50  # candidates listed by Tab
HISTORY_MAX = 1000


# -- parsing ----------------------------------------------------------------------


class UsageError(Exception):
    """A command line that cannot be run as typed; the message says how to type it."""


@dataclass(frozen=True)
class Spec:
    name: str
    aliases: tuple[str, ...]
    params: str
    summary: str

    def usage(self) -> str:
        return f"/{self.name} {self.params}".rstrip()


SPECS = [
    Spec("msg", ("message", "send"), "USER TEXT", "send a message: directly when possible, else sealed through the server"),
    Spec("broadcast", (), "TEXT", "send TEXT to everyone online"),
    Spec("who", ("whoelse", "list", "discover"), "", "who else is online"),
    Spec("whosince", ("whoelsesince",), "SECONDS", "who was online during the last SECONDS seconds"),
    Spec("block", (), "USER", "stop USER from messaging you (USER is not told)"),
    Spec("unblock", (), "USER", "let USER message you again"),
    Spec("mute", (), "USER [SECONDS]", "hide USER's messages, for SECONDS or until /unmute (they are still stored)"),
    Spec("unmute", (), "USER", "show USER's messages again"),
    Spec("startprivate", (), "USER", "open a direct private session with USER"),
    Spec("private", (), "USER TEXT", "send TEXT over the private session only, never through the server"),
    Spec("stopprivate", (), "USER", "end the private session with USER"),
    Spec("history", (), "USER [N]", f"the last N ({HISTORY_DEFAULT}) messages with USER and their status"),
    Spec("fingerprint", (), "[USER]", "your key's fingerprint, or USER's, to compare out of band"),
    Spec("trust", (), "USER", "accept USER's changed key"),
    Spec("offline", (), "", "leave the server and stop accepting direct links; messages wait"),
    Spec("online", (), "", "come back online and send the waiting messages"),
    Spec("help", (), "", "this list"),
    Spec("logout", ("exit", "quit"), "", "log out and exit"),
]
_BY_NAME = {name: spec for spec in SPECS for name in (spec.name, *spec.aliases)}
_WORD = re.compile(r"\s*(\S+)(.*)", re.DOTALL)
_FIRST_WORD = re.compile(r"\s*(\S*)")
_SECOND_WORD = re.compile(r"\s*(\S+)\s+(\S*)")


def _spec(word: str) -> Spec | None:
    """The command a typed word names: slash optional, any case, aliases too."""
    return _BY_NAME.get(word.removeprefix("/").lower())


def _takes_user(command: str) -> bool:
    spec = _spec(command)
    return spec is not None and spec.params.lstrip("[").startswith("USER")


@dataclass(frozen=True)
class Command:
    name: str
    args: tuple[Any, ...]


def complete(before: str, users: Iterable[str]) -> tuple[str, list[str]]:
    """
    What Tab adds to a line typed up to the cursor (C{before}): the rest of a command's name, or
    of a username where a command takes one (among C{users}).

    @return: the text to insert, and the candidates when there are several.
    """
    first = _FIRST_WORD.fullmatch(before)
    second = _SECOND_WORD.fullmatch(before)
    if first is not None:
        typed, names = first.group(1).removeprefix("/"), set(_BY_NAME)
        shown = "/{}".format
    elif second is not None and _takes_user(second.group(1)):
        typed, names, shown = second.group(2), set(users), str
    else:
        return "", []
    candidates = sorted(name for name in names if name.startswith(typed))
    if not candidates:
        return "", []
    rest = os.path.commonprefix(candidates)[len(typed):]
    if len(candidates) == 1:
        return rest + " ", []
    return rest, [shown(name) for name in candidates]


def parse(line: str) -> Command | None:
    """
    One input line to a command, or C{None} for a blank line. The slash is optional, so the
    seeds' words (C{message bob hi}, C{whoelse}) work as typed.

    @raise UsageError: unknown command, missing or malformed arguments.
    """
    match = _WORD.match(line)
    if match is None:
        return None
    word, rest = match.groups()
    spec = _spec(word)
    if spec is None:
        shown = word if len(word) <= 32 else word[:32] + "…"
        if word.startswith("/"):
            raise UsageError(f"unknown command {shown}; /help lists the commands")
        raise UsageError(f"{shown!r} is not a command; to write to someone: /msg USER TEXT (/help lists the commands)")
    args: list[Any] = []
    for param in spec.params.split():
        optional = param.startswith("[")
        kind = param.strip("[]")
        if kind == "TEXT":
            text = rest.strip()
            if not text:
                raise UsageError(f"usage: {spec.usage()}")
            args.append(text)
            rest = ""
            break
        match = _WORD.match(rest)
        if match is None:
            if not optional:
                raise UsageError(f"usage: {spec.usage()}")
            args.append(None)
            continue
        value, rest = match.groups()
        args.append(_convert(kind, value, spec))
    if rest.strip():
        raise UsageError(f"too many arguments; usage: {spec.usage()}")
    return Command(spec.name, tuple(args))


def _convert(kind: str, value: str, spec: Spec) -> Any:
    if kind == "USER":
        return value
    try:
        number = float(value) if kind == "SECONDS" else int(value)
    except ValueError:
        number = None
    if kind == "SECONDS":
        low = 0 if spec.name == "whosince" else 1
        if number is None or not math.isfinite(number) or not low <= number <= 1e9:
            raise UsageError(f"SECONDS must be a number from {low} to 1000000000; usage: {spec.usage()}")
        return number
    if number is None or not 1 <= number <= HISTORY_MAX:
        raise UsageError(f"N must be a whole number from 1 to {HISTORY_MAX}; usage: {spec.usage()}")
    return number


def help_text() -> str:
    width = max(len(spec.usage()) for spec in SPECS)
    lines = ["commands (the slash is optional):"]
    for spec in SPECS:
        aliases = f" (also {', '.join('/' + a for a in spec.aliases)})" if spec.aliases else ""
        lines.append(f"  {spec.usage():<{width}}  {spec.summary}{aliases}")
    lines.append("on a terminal: arrows, Home, End, Ctrl-W/K/U edit the line; up and down bring back lines"
                 " entered before; Tab completes commands and usernames; Ctrl-L clears the screen;"
                 " a paste stays on the line until Enter; Ctrl-D on an empty line logs out")
    return "\n".join(lines)


# -- rendering --------------------------------------------------------------------


def clean(text: Any) -> str:
    """What others wrote, made harmless for a terminal: no escape sequences, no control characters,
    nothing that reorders the line (each is shown as U+FFFD, a tab as a space)."""
    return "".join(c if printable(c) else " " if c == "\t" else "\ufffd" for c in str(text))


def _names(users: list[str]) -> str:
    """The first few of many names, and how many more."""
    more = len(users) - PRESENCE_NAMES
    return ", ".join(users[:PRESENCE_NAMES]) + (f" and {more} more" if more > 0 else "")


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


_BYE = {
    "idle_timeout": "the server logged you out after a while without commands; /online to come back",
    "replaced": "you logged in from somewhere else, so this peer is now offline; /online takes over again",
    "shutdown": "the server is shutting down; reconnecting when it is back",
    "keepalive_timeout": "the server stopped hearing from this peer; reconnecting",
}

_EVENTS: dict[str, Callable[..., str]] = {
    "message": lambda user, text, private, sent_at=None: f"{user}{' (private)' if private else ''}: {text}"
    + _sent(sent_at),
    "broadcast": lambda user, text, sent_at=None: f"{user} (broadcast): {text}" + _sent(sent_at),
    "broadcasts_dropped": lambda count: f"{_plural(count, 'broadcast')} not shown: this peer's output was not "
    "being read, and broadcasts are kept nowhere to come again",
    "presence": lambda user, online: f"{user} logged {'in' if online else 'out'}",
    "presence_many": lambda users, online: f"{len(users)} users logged {'in' if online else 'out'}: {_names(users)}",
    "online_now": lambda users: f"online now: {_names(users)}" if users else "nobody else is online now",
    "welcome": lambda user, mailbox: f"welcome, {user}!"
    + (f" {_plural(mailbox, 'message')} arrived while you were away:" if mailbox else ""),
    "reconnected": lambda user, mailbox: "reconnected to the server",
    "registered": lambda user, server: f"registered {user} on {server}",
    "registration_closed": lambda user, server: f"{server} takes no new accounts: logging in as {user}, "
    "an account its operator made",
    "wrong_password": lambda user: "wrong password",
    "weak_password": lambda message: f"that password is not accepted: {message}",
    "too_many_attempts": lambda user, code, message: f"wrong password too many times: {user} is now blocked, try again later ({message})",
    "account_locked": lambda user, message, code="": f"{user} is blocked after failed logins; try again later ({message})",
    "already_online": lambda user, code, message: f"cannot log in: {message}",
    "login_failed": lambda code, message, user="": f"cannot log in: {message} ({code})",
    "login_delayed": lambda code, message, seconds: f"the server cannot log you in just now: {message} ({code}); "
    f"working offline, trying again in {seconds:g} s",
    "login_gave_up": lambda user: "no other password to try; exiting",
    "no_password": lambda: "no password given; exiting",
    "passwords_differ": lambda: "the two passwords differ; choose the password again",
    "session_expired": lambda user: "the session expired and no password is available here; start the peer again to log in",
    "server_unreachable": lambda server, reason: f"cannot reach the server at {server} ({reason}); working offline, retrying in the background",
    "server_lost": lambda: "lost the connection to the server; reconnecting",
    "internal_error": lambda message: f"the peer cannot go on: {message} (details in peer.log)",
    "server_refused": lambda message: message,
    "server_pinned": lambda server, fingerprint: f"trusting the server at {server} on first use: certificate "
    f"{_people(fingerprint)} (its log says it at start)",
    "bye": lambda reason, message: _BYE.get(reason, f"the server closed the connection: {message}"),
    "listen_failed": lambda reason: f"cannot accept direct links ({reason}); messages go through the server",
    "unreadable": lambda user, count: f"{_plural(count, 'message')} from {user} could not be opened: sealed to a "
    f"key of yours this install does not have (your old install's?); {user}'s peer is asked to send again",
    "sending_again": lambda user, count, trusted: f"{user} could not open {_plural(count, 'message')} of yours "
    "(sealed to keys they had before): "
    + ("sending again" if trusted else f"sent again once you accept {user}'s new key (/fingerprint {user}, /trust {user})"),
    "not_stored": lambda user, reason: f"a message from {user} could not be stored in your history ({reason}); it "
    "is not lost: once that is fixed, /offline then /online brings it again",
    "stored": lambda user: f"{user} is offline: the message waits on the server until they log in",
    "queued": lambda user, chosen: f"you are offline: the message to {user} goes out after /online"
    if chosen
    else f"not connected to the server: the message to {user} goes out once the connection is back",
    "send_failed": lambda user, code, message, text: f"could not deliver your message to {user} ({text[:40]}): "
    + render_error(code, user=user, message=message),
    "send_delayed": lambda user, code, message, seconds: (
        f"{user}'s mailbox on the server is full: your messages to {user} wait"
        if code == "mailbox_full"
        else f"the server takes no message to {user} just now ({message}): yours wait"
    )
    + f", tried again every {seconds:g} s",
    "waiting_for_keys": lambda user: f"{user} has not logged in since their account was made; your messages wait until they do",
    "bad_keys": lambda user: f"the server sent unusable keys for {user}; your messages to {user} wait until it sends real ones",
    "server_unsigned": lambda server: f"the server at {server} is older than this peer: it passes on no key signatures, so "
    "nothing is sealed for it to keep (it could hand out keys of its own); messages go over direct links, and through "
    "it once it is updated",
    "keys_unsigned": lambda user: f"{user}'s peer has not signed its encryption key (it is older than yours), so nothing is "
    f"sealed to it for the server to keep; your messages to {user} go when you both are online, or once {user}'s peer "
    "is updated",
    "key_changed": lambda user, old, new: (
        (f"WARNING: {user}'s IDENTITY KEY HAS CHANGED (was {_people(old)}, now {_people(new)}). " if old != new
         else f"WARNING: {user}'s ENCRYPTION KEY HAS CHANGED (with the same identity key, {_people(new)}). ")
        + f"It may be a reinstall, or someone impersonating {user}. Nothing goes to or comes from {user} "
        f"until you compare fingerprints out of band (/fingerprint {user}) and accept with /trust {user}."
    ),
    "private_ready": lambda user: f"private session with {user} started: /private {user} TEXT to write, /stopprivate {user} to end it",
    "private_started": lambda user, by_peer: f"{user} started a private session with you (answer with /private {user} TEXT)",
    "private_ended": lambda user, by_peer: f"{user} ended the private session"
    if by_peer
    else f"the private session with {user} ended: the link closed",
}


def render(event: str, **fields: Any) -> str:
    """One line for an event; cleaned whole, since what others write and the server says goes in it."""
    template = _EVENTS.get(event)
    return clean(f"{event}: {fields}" if template is None else template(**fields))


_ERRORS: dict[str, str] = {
    "invalid_user": "'{user}' is not a valid username",
    "invalid_username": "'{user}' is not a valid username",
    "yourself": "that is you",
    "self": "that is you",
    "unknown_user": "there is no user named {user}",
    "offline": "{user} is offline",
    "blocked_by_user": "{user} has blocked you",
    "already_blocked": "{user} is already blocked",
    "not_blocked": "{user} is not blocked",
    "not_muted": "{user} is not muted",
    "no_private_session": "no private session with {user}; start one with /startprivate {user}",
    "unreachable": "{user} cannot be reached directly at {host}:{port}",
    "too_long": "message too long: {length} characters, at most {limit}",
    "too_long_bytes": "message too long: {size} bytes once encoded, at most {limit}",
    "empty_message": "empty message",
    "key_changed": "{user}'s key has changed; compare it (/fingerprint {user}), then accept it with /trust {user}",
    "bad_keys": "the server sent unusable keys for {user}",
    "keys_unsigned": "{user}'s peer has not signed its encryption key (it is older than yours)",
    "nothing_to_trust": "{user}'s key has not changed; nothing to accept",
    "already_offline": "you are already offline",
    "already_online_mode": "you are already online",
    "mailbox_full": "{user}'s mailbox is full; try again later",
    "keys_unknown": "{user} has not logged in yet",
    "rate_limited": "too many requests: {message}",
}


def render_error(code: str, **fields: Any) -> str:
    if code == "not_connected":
        if fields.get("chosen"):
            return "you are offline; /online to reconnect"
        return f"the server at {fields.get('server')} is unreachable; try again later"
    # The server's words and codes go into these lines too: cleaned like what others write.
    template = _ERRORS.get(code)
    if template is not None:
        try:
            return clean(template.format(**fields))
        except (KeyError, IndexError):
            pass
    message = fields.get("message")
    return clean(f"{message} ({code})" if message else code)


def _sent(sent_at: float | None) -> str:
    return "" if sent_at is None else f" (sent {_time(sent_at)})"


def _time(seconds: float) -> str:
    try:
        return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(seconds))
    except (OverflowError, OSError, ValueError):  # a message's time is its sender's word: it may be far off
        return "time out of range"


def render_entry(entry: Entry) -> str:
    # At the time this history took it, which is /history's order; one that came a while after it
    # was written (kept by the server while this peer was away) also says when, as it did when shown.
    when = _time(entry.stored_at)
    private = " (private)" if entry.private else ""
    if entry.outgoing:
        return f"[{when}] you -> {entry.peer}{private}: {clean(entry.text)} ({entry.status})"
    late = _sent(entry.sent_at) if entry.stored_at - entry.sent_at > LATE else ""
    if entry.status == "held":  # signed with a key not accepted: not shown before /trust
        return f"[{when}] {entry.peer}{private}: (held until you accept the new key: /fingerprint {entry.peer}, /trust {entry.peer})"
    note = " (muted)" if entry.status == "muted" else ""
    return f"[{when}] {entry.peer}{private}: {clean(entry.text)}{late}{note}"


def _people(fingerprint: str | None) -> str:
    """A fingerprint as people compare it aloud, and as the server's log gives it: groups of four."""
    return format_fingerprint(str(fingerprint))


def render_fingerprint(info: FingerprintInfo, me: str) -> str:
    if info.user == me:
        return f"your fingerprint: {_people(info.pinned)}"
    lines = [f"{info.user}: " + (f"pinned {_people(info.pinned)}" if info.pinned else "no key pinned yet")]
    if info.changed_to:
        lines.append(f"  CHANGED to {_people(info.changed_to)} (not accepted; /trust {info.user} accepts it)")
    if info.directory and info.directory not in (info.pinned, info.changed_to):
        lines.append(f"  the server now says {_people(info.directory)}")
    elif info.directory:
        lines.append("  the server agrees" if info.directory == info.pinned else "  the server has the new key")
    return "\n".join(lines)


# -- the terminal -----------------------------------------------------------------


def terminal_columns() -> int:
    """The width of the terminal on standard output, in columns."""
    try:
        return os.get_terminal_size(1).columns or 80
    except OSError:
        return 80


# What a password prompt takes: typing and erasing, nothing that moves over what is not shown.
_PASSWORD_KEYS = (BACKSPACE, KILL_BEFORE, KILL_WORD, EOF, TAB)


def cbreak(fd: int, out: int) -> Callable[[], None]:
    """
    Character-at-a-time input on C{fd} without echo or flow control (signals still work), and pastes
    marked as such by the terminal on C{out} (bracketed paste, see L{KeyDecoder}); returns what
    restores both.
    """
    saved = termios.tcgetattr(fd)
    mode = termios.tcgetattr(fd)
    mode[0] &= ~termios.IXON  # Ctrl-S would freeze the chat until Ctrl-Q, which few people know
    mode[3] &= ~(termios.ICANON | termios.ECHO)
    mode[6][termios.VMIN] = 1
    mode[6][termios.VTIME] = 0
    termios.tcsetattr(fd, termios.TCSANOW, mode)
    marked = os.isatty(out)  # the request goes where the terminal reads it
    if marked:
        os.write(out, BRACKETED_PASTE_ON.encode())

    def restore() -> None:
        if marked:
            os.write(out, BRACKETED_PASTE_OFF.encode())
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)

    return restore


@implementer(IHalfCloseableProtocol, IPushProducer)
class Console(Protocol):
    """
    The user's side, over stdin/stdout (C{StandardIO}): implements the messenger's view and its
    password prompt, and runs command lines one after another, in order.

    @param terminal: stdin is a terminal in cbreak mode (see L{cbreak}): edit lines (see
        L{LineEditor}), show a prompt, redraw it around incoming lines. Otherwise read plain lines.
    @param columns: the terminal's width now.
    """

    def __init__(self, user: str, terminal: bool, columns: Callable[[], int] = terminal_columns) -> None:
        self.user = user
        self._terminal = terminal
        self._columns = columns
        self._messenger: Messenger | None = None
        self._prompt = f"{user}> "
        self._editor = LineEditor(MAX_INPUT)  # terminal: the line being typed
        self._key_decoder = KeyDecoder()
        self._rang = False  # terminal: the bell said the line is full; not again until a key is taken
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self._partial = b""  # pipe: an incomplete line
        self._discarding = False  # pipe: the rest of an overlong line
        self._lines: deque[str | None] = deque()  # complete lines not taken yet; None is the end of input
        self._input_paused = False  # MAX_LINES_AHEAD lines wait
        self._line_waiter: Deferred[str | None] | None = None
        self._password_waiter: Deferred[str | None] | None = None
        self._password_prompt = ""
        self._set_aside = ("", 0)  # terminal: the line being typed when a password prompt came, and its cursor
        self._commands_started = False
        self._leaving = False
        self._prompt_shown = False  # terminal: the prompt line is on screen
        self._closed = False
        self._drain_waiters: list[Deferred[None]] | None = None  # while stdout's buffer is full

    def attach(self, messenger: Messenger) -> None:
        self._messenger = messenger

    def connectionMade(self) -> None:
        # Told when what is printed piles up unread (a slow terminal, a script that does not read):
        # the messenger then takes no more messages in until it has gone out (see drained).
        self.transport.registerProducer(self, True)

    # -- IPushProducer: stdout's buffer ---------------------------------------------

    def pauseProducing(self) -> None:
        if self._drain_waiters is None:
            self._drain_waiters = []

    def resumeProducing(self) -> None:
        waiters, self._drain_waiters = self._drain_waiters or [], None
        for d in waiters:
            d.callback(None)

    def stopProducing(self) -> None:
        self.resumeProducing()  # stdout is gone: nothing will drain, nothing should wait

    def drained(self) -> Deferred[None]:
        """Fires once what was printed has gone out (at once when it has)."""
        if self._drain_waiters is None:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._drain_waiters.append(d)
        return d

    # -- output -----------------------------------------------------------------

    def _write(self, text: str) -> None:
        if self.transport is not None and not self._closed:
            self.transport.write(text.encode("utf-8", "replace"))

    def _print(self, text: str) -> None:
        if not self._terminal:
            self._write(text + "\n")
            return
        # Erase the prompt and what is being typed, print, then put both back.
        self._write("\r\x1b[K" + text.replace("\n", "\r\n\x1b[K") + "\n")
        self._prompt_shown = False
        self._redraw()

    def _redraw(self) -> None:
        """Put the prompt and the line being typed back on the screen, if they belong there."""
        # Not once logging out: the process ends, and the shell's prompt would follow ours on its line.
        if self._terminal and not self._prompt_shown and not self._leaving and (
            self._password_waiter is not None or self._commands_started or self._editor.text
        ):
            self._refresh()

    def _refresh(self) -> None:
        """Write the prompt line anew: the prompt, what fits of the line being typed, the cursor in it."""
        columns = self._columns()
        if self._password_waiter is not None:
            prompt, shown, cursor = self._password_prompt, "", 0
        else:
            prompt = self._prompt if self._commands_started else ""
            if width(prompt) > columns // 2:
                prompt = "> "
            start, end, cursor = self._editor.view(columns - width(prompt))
            shown = self._editor.text[start:end]
        back = width(shown) - cursor
        self._write("\r" + prompt + shown + "\x1b[K" + (f"\x1b[{back}D" if back else ""))
        self._prompt_shown = True

    def redraw(self) -> None:
        """Draw the prompt line again: the screen changed behind the console's back."""
        self._prompt_shown = False
        self._redraw()

    def show(self, event: str, **fields: Any) -> None:
        self._print(render(event, **fields))

    def close(self) -> None:
        """Stop writing (the process is exiting)."""
        if self._terminal:
            self._write("\r\x1b[K")
        self._closed = True

    # -- input ------------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        if self._terminal:
            self._keys(self._decoder.decode(data))
        else:
            self._pipe(data)

    def _pipe(self, data: bytes) -> None:
        self._partial += data
        while True:
            end = self._partial.find(b"\n")
            if end < 0:
                if len(self._partial) > MAX_INPUT:
                    if not self._discarding:
                        self._print(f"error: input line longer than {MAX_INPUT} bytes; ignored")
                    self._discarding = True
                    self._partial = b""
                return
            raw, self._partial = self._partial[:end], self._partial[end + 1 :]
            if self._discarding:
                self._discarding = False
            elif len(raw) > MAX_INPUT:
                self._print(f"error: input line longer than {MAX_INPUT} bytes; ignored")
            else:
                self._raw_line(raw)

    def _raw_line(self, raw: bytes) -> None:
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError:
            self._print("error: input is not valid UTF-8; line ignored")
            return
        self._line_entered(line.removesuffix("\r"))

    def _keys(self, keys: str) -> None:
        password = self._password_waiter is not None
        changed = False
        for key in self._key_decoder.feed(keys):
            if key == ENTER:
                self._enter()
                password, changed = self._password_waiter is not None, False
            elif key == EOF and not self._editor.text:  # ctrl-D on an empty line: end of input
                if changed:  # erased in this same read: the screen shows it still
                    self._refresh()
                self._write("\n")
                self._prompt_shown = False
                self.readConnectionLost()
                changed = False
            elif key == REDRAW:
                self._write("\x1b[H\x1b[2J")
                changed = True
            elif key == TAB and not password:
                changed = self._complete() or changed
            elif password and len(key) > 1 and key not in _PASSWORD_KEYS:
                continue
            elif self._editor.key({EOF: DELETE, TAB: " "}.get(key, key)):
                changed, self._rang = True, False
            elif not self._rang:  # the line is as long as a line may be: once, not for each key of a paste
                self._write("\a")
                self._rang = True
        if changed:
            self._refresh()

    def _complete(self) -> bool:
        """Tab: complete the command or the username being typed; list the candidates if several."""
        editor = self._editor
        users = self._messenger.known_users() if self._messenger is not None else []
        rest, candidates = complete(editor.text[: editor.cursor], users)
        for c in rest:
            editor.key(c)
        if candidates and not rest:
            more = len(candidates) - COMPLETIONS_SHOWN  # a big server's users: a screenful at most
            self._print("  ".join(candidates[:COMPLETIONS_SHOWN]) + (f"  ... and {more} more" if more > 0 else ""))
        elif not rest:
            self._write("\a")
        return bool(rest)

    def _enter(self) -> None:
        self._rang = False
        password = self._password_waiter is not None
        if password:
            line = self._editor.take(remember=False)
            self._editor.text, self._editor.cursor = self._set_aside
            self._set_aside = ("", 0)
            self._write("\n")
        else:
            line = self._editor.take()
            # The whole line as entered stays on the screen, wrapped if it is long.
            prompt = self._prompt if self._commands_started else ""
            self._write("\r" + prompt + line + "\x1b[K\n")
        self._prompt_shown = False
        self._line_entered(line)
        if password:
            self._redraw()  # the prompt and the line set aside (unless another password prompt came)

    def _line_entered(self, line: str | None) -> None:
        if self._password_waiter is not None:
            waiter, self._password_waiter = self._password_waiter, None
            waiter.callback(line)
        elif self._line_waiter is not None:
            waiter, self._line_waiter = self._line_waiter, None
            waiter.callback(line)
        else:
            self._lines.append(line)
            if len(self._lines) >= MAX_LINES_AHEAD and not self._input_paused and self.transport is not None:
                self._input_paused = True
                self.transport.pauseProducing()

    def _next_line(self) -> Deferred[str | None]:
        if self._lines:
            line = self._lines.popleft()
            if self._input_paused and len(self._lines) <= MAX_LINES_AHEAD // 2:
                self._input_paused = False
                self.transport.resumeProducing()
            return succeed(line)
        self._line_waiter = Deferred()
        return self._line_waiter

    def readConnectionLost(self) -> None:
        if self._partial and not self._discarding:
            self._raw_line(self._partial)
        self._partial = b""
        self._line_entered(None)

    def writeConnectionLost(self) -> None:
        self._closed = True

    def connectionLost(self, reason: Failure) -> None:
        self._closed = True

    # -- the password prompt (the messenger's PasswordSource) --------------------

    def password(self, retry: bool) -> Deferred[str | None]:
        """
        On a terminal: prompt without echo. On a pipe: the next input line, but only before
        commands run (afterwards lines are commands and no password is available).
        """
        if self._terminal:
            return self._ask_password(f"password for {self.user}: ")
        if self._commands_started:
            return succeed(None)
        self._print(f"password for {self.user}:")
        return self._next_line()

    def confirm_password(self) -> Deferred[str | None]:
        """On a terminal: the password once more, without echo, before an account is made with it."""
        return self._ask_password("the same password again, to confirm: ")

    def _ask_password(self, prompt: str) -> Deferred[str | None]:
        self._password_waiter = waiter = Deferred()
        self._password_prompt = prompt
        # A prompt that comes in the middle of typing (a registration once the server is back)
        # puts the line aside, and gives it back once the password is in.
        self._set_aside = (self._editor.text, self._editor.cursor)
        self._editor.take(remember=False)
        self._write("\r\x1b[K")
        self._prompt_shown = False
        self._redraw()
        return waiter

    # -- commands -----------------------------------------------------------------

    def start_commands(self) -> Deferred[None]:
        """Run input lines as commands from now on, in order, until the end of input."""
        self._commands_started = True
        self._redraw()
        return Deferred.fromCoroutine(self._command_loop())

    async def _command_loop(self) -> None:
        while not (self._closed or self._leaving):
            line = await self._next_line()
            await self.execute("/logout" if line is None else line)
            self._redraw()

    async def execute(self, line: str) -> None:
        """Run one command line and print its outcome; never raises."""
        command = None
        try:
            command = parse(line)
            if command is None:
                return
            await getattr(self, "_do_" + command.name)(*command.args)
        except UsageError as e:
            self._print(f"error: {e}")
        except CommandError as e:
            self._print("error: " + render_error(e.code, **e.fields))
        except sqlite3.Error as e:  # the history's file: a full disk, a damaged file
            # The command's name only: its arguments may be a message, which has no place in a log.
            log.failure("command /{name}", name=command and command.name)
            self._print(f"error: the history could not be read or written ({clean(e)})")
        except Exception:
            log.failure("command /{name}", name=command and command.name)
            self._print("error: something went wrong; details are in the log")

    @property
    def _m(self) -> Messenger:
        assert self._messenger is not None, "attach() a messenger first"
        return self._messenger

    async def _do_msg(self, user: str, text: str) -> None:
        await self._m.send(user, text)

    async def _do_broadcast(self, text: str) -> None:
        delivered, skipped = await self._m.broadcast(text)
        line = f"broadcast sent to {_plural(delivered, 'user')}"
        if skipped:
            line += f"; {_plural(skipped, 'user')} could not get it (they blocked you)"
        self._print(line)

    async def _do_who(self) -> None:
        users = await self._m.who()
        self._print(f"online: {', '.join(users)}" if users else "nobody else is online")

    async def _do_whosince(self, seconds: float) -> None:
        users = await self._m.whosince(seconds)
        span = f"{seconds:g} s"
        self._print(f"online during the last {span}: {', '.join(users)}" if users else f"nobody else was online during the last {span}")

    async def _do_block(self, user: str) -> None:
        await self._m.block(user)
        self._print(f"blocked {user}")

    async def _do_unblock(self, user: str) -> None:
        await self._m.unblock(user)
        self._print(f"unblocked {user}")

    async def _do_mute(self, user: str, seconds: float | None) -> None:
        await self._m.mute(user, seconds)
        self._print(f"muted {user}" + (f" for {seconds:g} s" if seconds is not None else " until /unmute"))

    async def _do_unmute(self, user: str) -> None:
        await self._m.unmute(user)
        self._print(f"unmuted {user}")

    async def _do_startprivate(self, user: str) -> None:
        await self._m.start_private(user)

    async def _do_private(self, user: str, text: str) -> None:
        await self._m.private(user, text)

    async def _do_stopprivate(self, user: str) -> None:
        await self._m.stop_private(user)
        self._print(f"private session with {user} ended")

    async def _do_history(self, user: str, limit: int | None) -> None:
        entries = await self._m.history(user, limit or HISTORY_DEFAULT)
        if not entries:
            self._print(f"no messages with {user} yet")
        for entry in entries:
            self._print(render_entry(entry))

    async def _do_fingerprint(self, user: str | None) -> None:
        self._print(render_fingerprint(await self._m.fingerprint(user), self.user))

    async def _do_trust(self, user: str) -> None:
        await self._m.trust(user)
        self._print(f"accepted {user}'s new key")

    async def _do_offline(self) -> None:
        await self._m.go_offline()
        self._print("you are offline: not on the server, no direct links; messages you write wait until /online")

    async def _do_online(self) -> None:
        await self._m.go_online()
        self._print("going online")

    async def _do_help(self) -> None:
        self._print(help_text())

    async def _do_logout(self) -> None:
        self._leaving = True  # no command runs after this one
        self._print("logging out")
        await self._m.logout()

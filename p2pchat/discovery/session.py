"""One connection's state: hello -> unauthenticated -> authenticated -> closed.

The session turns decoded requests into calls on the L{Directory}, keeps replies in request
order, runs the keep-alive and idle timers on an injected clock, and feeds the stored
mailbox to its user at the pace of their reading and their acknowledgements. It writes bytes
to a L{Connection} and never sees a socket.
"""

from __future__ import annotations

import math
from collections import deque
from functools import partial
from typing import Any, Callable, Protocol

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from p2pchat.discovery.directory import Directory, Refusal, TokenBucket, address_key, envelope_frame
from p2pchat.discovery.store.base import StoredEnvelope
from p2pchat.wire import (
    PROTOCOL_VERSION, RATE_LIMITED_OPS, Code, Request, WireError, decode_request, encode_error, encode_event,
    encode_result,
)

log = Logger()

# Requests that change who this connection is, or whom it blocks (once stored): later requests
# wait until they are answered, so that they see the change (a pipelined unblock finds the block).
_BARRIERS = frozenset({"hello", "register", "login", "resume", "logout", "block", "unblock"})
_BEFORE_LOGIN = frozenset({"hello", "register", "login", "resume", "ping"})
# Requests that do not count as the user doing something (idle timeout).
_NOT_ACTIVITY = frozenset({"ping", "ack"})
# A stored mailbox goes out in writes of about this many envelope characters: a write per
# envelope cost 7 % of its delivery rate.
WRITE_BATCH = 16 * 1024
# Requests read and not answered yet, at most (sends aside, which have their rate limit): past it
# the connection is not read until replies go out. A client writing requests that wait on the
# store (acks, blocks) as fast as its line goes made the server keep every one of them, about
# 2.5 KiB each: 200 000 acks in a 6 MB burst took it from 71 MB to 585.
MAX_UNANSWERED = 64
MAILBOX_RETRY = 5.0  # seconds before a mailbox page the store failed to read is asked for again


class Connection(Protocol):
    """What a session needs from its transport."""

    full: bool  # the peer is not reading as fast as we write: more goes to a buffer

    def write(self, data: bytes) -> None: ...

    def close(self) -> None:
        """Flush what was written, then close."""

    def pause_reading(self) -> None: ...

    def resume_reading(self) -> None: ...


class _Slot:
    """
    A request's place in the order of replies: its reply frame once known, what runs once that is
    written, and the next request's slot. Slots chain rather than wait in a deque, which would
    cost every connection 0.7 KiB.
    """

    __slots__ = ("frame", "after", "next")

    def __init__(self) -> None:
        self.frame: bytes | None = None
        self.after: Callable[[], None] | None = None
        self.next: _Slot | None = None


class Session:
    """
    @ivar username: set once logged in.
    @ivar live: C{False} while stored envelopes are being delivered (the mailbox after login, or
        what was stored while the window of unacked envelopes was full); live envelopes wait in
        the store behind the older ones until then.
    """

    def __init__(self, directory: Directory, clock, connection: Connection, host: str) -> None:
        self.directory = directory
        self.limits = directory.limits
        self.clock = clock
        self.connection = connection
        self.host = host
        self.port = 0
        self.username: str | None = None
        self.live = False
        self.closed = False
        self._counted = False  # in the directory's connections from this host
        self._greeted = False
        # Replies in request order: the oldest slot not yet written, and the newest.
        self._first_slot: _Slot | None = None
        self._last_slot: _Slot | None = None
        self._unanswered = 0  # slots whose reply is not written yet
        self._barrier = False
        # Lines that wait behind a barrier or for replies (MAX_UNANSWERED); made when one does
        # (a deque is 0.7 KiB).
        self._waiting: deque[bytes] | None = None
        self._going_on = False  # handling lines that waited
        now = clock.seconds()
        self._last_heard = now
        self._last_active = now
        self._watch_call = None
        self._rate: TokenBucket | None = None
        # envelope delivery: what was written and not acked, live or stored, stays under a window
        self._unacked: dict[int, int] = {}  # seq: characters
        self._unacked_bytes = 0
        self._mailbox_after = 0
        self._mailbox_pending: list[StoredEnvelope] = []  # the fetched page, newest first
        self._mailbox_fetching = False
        self._sends_pending = 0
        self._sends_answered: Deferred[dict] | None = None

    # -- connection events ------------------------------------------------------------------

    def connected(self) -> None:
        self._counted = self.directory.address_limits.connect(self.host)
        if not self._counted:
            limit = self.directory.address_limits.max_connections
            self.connection.write(encode_event(
                "bye", reason="too_many_connections",
                message=f"{address_key(self.host)} has {limit} connection{'s' * (limit != 1)} to this server already; "
                "try again later",
            ))
            self._close(None)
            return
        self.connection.write(
            encode_event(
                "hello", protocol=PROTOCOL_VERSION, server="p2pdiscovery", max_line=self.limits.max_line,
                keepalive_interval=self.limits.keepalive_timeout / 3, keepalive_timeout=self.limits.keepalive_timeout,
                idle_timeout=self.limits.idle_timeout, message_rate=self.limits.message_rate,
                message_burst=self.limits.message_burst, key_signatures=True,
            )
        )
        self._schedule_watch()

    def line_received(self, line: bytes) -> None:
        if self.closed:
            return
        self._last_heard = self.clock.seconds()
        if self._barrier or self._unanswered >= MAX_UNANSWERED or self._waiting:
            if self._waiting is None:
                self._waiting = deque()
            self._waiting.append(line)
            self.connection.pause_reading()
            return
        self._handle(line)

    def line_too_long(self) -> None:
        self._reply_now(None, encode_error(None, Code.LINE_TOO_LONG, f"a line may be at most {self.limits.max_line} bytes"))
        self._close("disconnected")

    def drained(self) -> None:
        """The connection's buffer has room again."""
        self._pump_mailbox()

    def connection_lost(self) -> None:
        if self._counted:
            self._counted = False
            self.directory.address_limits.disconnect(self.host)
        if self._watch_call is not None and self._watch_call.active():
            self._watch_call.cancel()
        self._watch_call = None
        self.closed = True
        if self.username is not None:
            self.directory.leave(self, "disconnected")

    # -- Member interface ------------------------------------------------------------------

    def write(self, frame: bytes) -> None:
        if not self.closed:
            self.connection.write(frame)

    def deliver(self, envelope: StoredEnvelope) -> bool:
        """
        Write a live envelope, unless the window (C{mailbox_window} characters unacked) is full:
        then this connection stops being live, and this envelope and the ones after it come from
        the store as acks make room. A client that takes envelopes in but does not ack them (it
        acks once it has shown them, and nobody reads its output) would otherwise have every
        one sent to it pile up in its memory.
        """
        if self._unacked_bytes >= self.limits.mailbox_window:
            self.live = False
            # Envelopes to one user go out in seq order: all before this one have been written.
            self._mailbox_after = envelope.seq - 1
            return False
        if not self.closed:
            self.connection.write(envelope_frame(envelope))
        self._unacked[envelope.seq] = size = len(envelope.envelope)
        self._unacked_bytes += size
        return True

    def kick(self, reason: str, message: str) -> None:
        """Tell the client why, then close. The directory has already let the user go."""
        if not self.closed:
            self.connection.write(encode_event("bye", reason=reason, message=message))
            self._close(None)

    # -- requests ---------------------------------------------------------------------------

    def _handle(self, line: bytes) -> None:
        try:
            request = decode_request(line)
        except WireError as e:
            self._reply_now(e.request_id, encode_error(e.request_id, e.code, e.message))
            return
        if request.op == "send":
            self._send(request)
            return
        if request.op == "ping" and self._greeted and self._first_slot is None:
            # The keep-alive of every idle connection: with no reply before it, answered at once
            # (once greeted, _caller neither refuses a ping nor counts it as activity).
            self.connection.write(encode_result(request.id, {"time": self.clock.seconds()}))
            return
        slot = self._new_slot()
        frame = self._run(request, slot)
        if not isinstance(frame, Deferred):
            self._fill(slot, frame)
            return
        barrier = request.op in _BARRIERS
        if barrier:
            self._barrier = True
        frame.addCallback(lambda frame: self._fill(slot, frame))
        if barrier:
            frame.addCallback(lambda _: self._release())

    def _run(self, request: Request, slot: _Slot | None) -> bytes | Deferred[bytes]:
        """The reply frame to C{request}, or a Deferred of it."""
        try:
            outcome = self._dispatch(request, slot)
        except Refusal as e:
            return encode_error(request.id, e.code, e.message)
        except Exception:
            log.failure("request {op} failed", op=request.op)
            return encode_error(request.id, Code.INTERNAL_ERROR, "the server failed; nothing was changed")
        if isinstance(outcome, Deferred):
            return outcome.addCallbacks(
                lambda result: encode_result(request.id, result),
                lambda failure: self._error_frame(request, failure),
            )
        return encode_result(request.id, outcome)

    def _send(self, request: Request) -> None:
        """
        A send is answered as soon as its fate is known, not in request order: for an online
        recipient that is their ack, and nothing else the client asked should wait behind it.
        """
        self._sends_pending += 1
        try:
            me = self._caller("send", request.background)
            self._check_rate()
            args = request.args
            self.directory.send(me, args["to"], args["msg_id"], args["envelope"], partial(self._send_answered, request))
        except Exception:  # noqa: BLE001 - a refusal, or a failure that _error_frame logs
            self._send_answered(request, Failure())

    def _send_answered(self, request: Request, outcome: dict | Failure) -> None:
        if isinstance(outcome, Failure):
            self.write(self._error_frame(request, outcome))
        else:
            self.write(encode_result(request.id, outcome))
        self._sends_pending -= 1
        if not self._sends_pending and self._sends_answered is not None:
            answered, self._sends_answered = self._sends_answered, None
            answered.callback({})

    def _error_frame(self, request: Request, failure) -> bytes:
        if failure.check(Refusal):
            return encode_error(request.id, failure.value.code, failure.value.message)
        log.failure("request {op} failed", failure, op=request.op)
        return encode_error(request.id, Code.INTERNAL_ERROR, "the server failed; nothing was changed")

    def _release(self) -> None:
        self._barrier = False
        self._go_on()

    def _go_on(self) -> None:
        """Handle the lines that waited until one waits again; read again once none does."""
        if self._going_on:  # a reply filled while handling one of them
            return
        self._going_on = True
        try:
            while self._waiting and not self._barrier and self._unanswered < MAX_UNANSWERED and not self.closed:
                self._handle(self._waiting.popleft())
        finally:
            self._going_on = False
        # An empty deque: nothing waits, but reading stays paused until replies go out.
        if not self._waiting and not self._barrier and self._unanswered < MAX_UNANSWERED:
            self._waiting = None
            self.connection.resume_reading()

    def _dispatch(self, request: Request, slot: _Slot) -> Any:
        """Runs C{request} (not a send); C{slot} is where its reply goes."""
        op, args = request.op, request.args
        if op == "hello":
            if args["protocol"] != PROTOCOL_VERSION:
                slot.after = lambda: self._close(None)
                raise Refusal(Code.UNSUPPORTED_VERSION, f"this server speaks protocol {PROTOCOL_VERSION} only")
            self._greeted = True
            return {"protocol": PROTOCOL_VERSION}
        me = self._caller(op, request.background)
        if op == "ping":
            return {"time": self.clock.seconds()}
        if op in RATE_LIMITED_OPS:
            self._check_rate()
        handler = getattr(self, "_op_" + op)
        return handler(me, slot, **args)

    def _caller(self, op: str, background: bool) -> str | None:
        """
        The user asking for C{op} (C{None} before login), if this connection may ask for it now;
        a refusal otherwise. A logged-in user's request other than a ping, an ack or one the client
        makes in the C{background} counts as their activity for the idle timeout.
        """
        if not self._greeted:
            raise Refusal(Code.HELLO_REQUIRED, 'send {"id":1,"op":"hello","protocol":1} first')
        me = self.username
        if me is None:
            if op not in _BEFORE_LOGIN:
                raise Refusal(Code.NOT_AUTHENTICATED, "log in first")
        elif op in ("register", "login", "resume"):
            raise Refusal(Code.ALREADY_AUTHENTICATED, f"you are already logged in as {me}")
        elif not (background or op in _NOT_ACTIVITY):
            self._last_active = self.clock.seconds()
        return me

    def _op_register(self, me, slot, username, password, fingerprint, envelope_key, key_signature=None):
        return Deferred.fromCoroutine(
            self.directory.register(self.host, username, password, fingerprint, envelope_key, key_signature)
        )

    def _op_login(self, me, slot, username, password, port, fingerprint=None, envelope_key=None, key_signature=None):
        self.port = port
        d = Deferred.fromCoroutine(
            self.directory.login(self, username, password, fingerprint, envelope_key, key_signature)
        )
        return d.addCallback(self._logged_in, slot)

    def _op_resume(self, me, slot, username, token, port, key_signature=None):
        self.port = port
        d = Deferred.fromCoroutine(self.directory.resume(self, username, token, key_signature))
        return d.addCallback(self._logged_in, slot)

    def _logged_in(self, result: dict, slot: _Slot) -> dict:
        if self.closed:  # the client went away while its password was checked
            self.directory.leave(self, "disconnected")
            return result
        self._last_active = self.clock.seconds()
        self._rate = TokenBucket(self.clock, self.limits.message_rate, self.limits.message_burst)
        self._schedule_watch()
        slot.after = self._pump_mailbox
        return result

    def _op_logout(self, me, slot):
        def bye():
            self.directory.leave(self, "logout")
            self.kick("logout", "goodbye")

        slot.after = bye
        if not self._sends_pending:
            return {}
        # Logging out is a barrier: every send is answered before the goodbye.
        self._sends_answered = Deferred()
        return self._sends_answered

    def _op_who(self, me, slot):
        return self.directory.who(me)

    def _op_whosince(self, me, slot, seconds):
        return self.directory.whosince(me, seconds)

    def _op_block(self, me, slot, user):
        return Deferred.fromCoroutine(self.directory.block(me, user))

    def _op_unblock(self, me, slot, user):
        return Deferred.fromCoroutine(self.directory.unblock(me, user))

    def _op_blocks(self, me, slot):
        return self.directory.blocked_list(me)

    def _op_lookup(self, me, slot, user):
        return self.directory.lookup(me, user)

    def _op_keys(self, me, slot, user):
        return self.directory.keys(me, user)

    def _check_rate(self) -> None:
        if not self._rate.take():
            raise Refusal(
                Code.RATE_LIMITED,
                f"you are asking more than {self.limits.message_rate:g} messages, lists of users or blocks a second;"
                " slow down",
            )

    def _op_broadcast(self, me, slot, text, signature):
        return self.directory.broadcast(me, text, signature)

    def _op_ack(self, me, slot, seqs):
        unacked = self._unacked
        for seq in seqs:
            self._unacked_bytes -= unacked.pop(seq, 0)
        d = self.directory.ack(me, seqs)
        self._pump_mailbox()
        return d

    # -- replies in order ---------------------------------------------------------------

    def _new_slot(self) -> _Slot:
        self._unanswered += 1
        slot = _Slot()
        if self._last_slot is None:
            self._first_slot = slot
        else:
            self._last_slot.next = slot
        self._last_slot = slot
        return slot

    def _reply_now(self, request_id, frame: bytes) -> None:
        self._fill(self._new_slot(), frame)

    def _fill(self, slot: _Slot, frame: bytes) -> None:
        slot.frame = frame
        while (done := self._first_slot) is not None and done.frame is not None:
            self._first_slot = done.next
            self._unanswered -= 1
            if done.next is None:
                self._last_slot = None
            if self.closed:
                continue
            self.connection.write(done.frame)
            if done.after is not None:
                done.after()
        if self._waiting is not None:  # lines, or reading, held back: maybe no longer
            self._go_on()

    # -- mailbox ------------------------------------------------------------------------

    def _pump_mailbox(self) -> None:
        """
        Write fetched envelopes while the window (C{mailbox_window} characters unacknowledged)
        and the connection have room; once all are written, fetch the next page.
        """
        if self.live or self.closed or self.username is None:
            return
        pending, unacked, window = self._mailbox_pending, self._unacked, self.limits.mailbox_window
        while pending and self._unacked_bytes < window and not self.connection.full:
            # The connection can only fill up on a write.
            frames, batch = [], 0
            while pending and batch < WRITE_BATCH and self._unacked_bytes < window:
                envelope = pending.pop()
                frames.append(envelope_frame(envelope))
                unacked[envelope.seq] = size = len(envelope.envelope)
                self._unacked_bytes += size
                batch += size
            self.connection.write(b"".join(frames))
        if pending or self._mailbox_fetching or self.connection.full:
            return
        room = window - self._unacked_bytes
        if room < window // 2 and unacked:
            return
        self._mailbox_fetching = True
        d = self.directory.mailbox_page(self.username, self._mailbox_after, room)
        d.addCallbacks(self._mailbox_fetched, self._mailbox_failed)

    def _mailbox_failed(self, failure) -> None:
        # Until a page comes the session is not live: without another try, nothing more would
        # reach this user until they reconnected, while their senders heard "delivered".
        log.failure("reading the mailbox of {user}; trying again in {delay:g} s", failure,
                    user=self.username, delay=MAILBOX_RETRY)
        self.clock.callLater(MAILBOX_RETRY, self._retry_mailbox)

    def _retry_mailbox(self) -> None:
        self._mailbox_fetching = False
        self._pump_mailbox()

    def _mailbox_fetched(self, envelopes: list[StoredEnvelope]) -> None:
        self._mailbox_fetching = False
        if self.closed:
            return
        if envelopes:
            self._mailbox_after = envelopes[-1].seq
            self._mailbox_pending[:0] = reversed(envelopes)
            self._pump_mailbox()
        else:
            # Everything stored before this read has been written; what is stored after it
            # reaches us (in store order) after this callback and goes out live.
            self.live = True

    # -- timers ---------------------------------------------------------------------------

    def _schedule_watch(self) -> None:
        if self.closed:
            return
        deadline = self._last_heard + self.limits.keepalive_timeout
        if self.username is not None and self.limits.idle_timeout > 0:
            deadline = min(deadline, self._last_active + self.limits.idle_timeout)
        # Up to the next whole second, so that the timers of many connections come due together
        # and fire in one wake-up of the reactor rather than one each.
        delay = max(0.0, math.ceil(deadline) - self.clock.seconds())
        if self._watch_call is not None and self._watch_call.active():
            # A cancelled call would stay in the reactor's queue until its time came.
            self._watch_call.reset(delay)
        else:
            self._watch_call = self.clock.callLater(delay, self._watch)

    def _watch(self) -> None:
        self._watch_call = None
        now = self.clock.seconds()
        if self._barrier:
            # Our own slow work (a queued password check) is not the client's silence.
            self._last_heard = now
        if now - self._last_heard >= self.limits.keepalive_timeout:
            self._leave_and_kick(
                "keepalive_timeout", f"nothing heard from you for {self.limits.keepalive_timeout:g} s"
            )
            return
        if (
            self.username is not None and self.limits.idle_timeout > 0
            and now - self._last_active >= self.limits.idle_timeout
        ):
            self._leave_and_kick("idle_timeout", f"logged out after {self.limits.idle_timeout:g} s without a command")
            return
        self._schedule_watch()

    def _leave_and_kick(self, reason: str, message: str) -> None:
        if self.username is not None:
            self.directory.leave(self, reason)
        self.kick(reason, message)

    def _close(self, reason: str | None) -> None:
        if self.closed:
            return
        if reason is not None and self.username is not None:
            self.directory.leave(self, reason)
        self.closed = True
        self.connection.close()

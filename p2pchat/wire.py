"""Sans-IO codec for the discovery protocol: one JSON object per line <-> typed frames.

Everything here is pure: bytes in, frames or L{WireError} out. PROTOCOL.md is the
specification; the schemas below are its tables in code.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, NamedTuple

import orjson

PROTOCOL_VERSION = 1
MAX_LINE = 65536
MAX_ID_LENGTH = 64
MAX_INT_ID = 2**53


class Code:
    """Stable error codes (PROTOCOL.md, "Error codes")."""

    BAD_JSON = "bad_json"
    BAD_UTF8 = "bad_utf8"
    BAD_REQUEST = "bad_request"
    UNKNOWN_OP = "unknown_op"
    LINE_TOO_LONG = "line_too_long"
    HELLO_REQUIRED = "hello_required"
    UNSUPPORTED_VERSION = "unsupported_version"
    NOT_AUTHENTICATED = "not_authenticated"
    ALREADY_AUTHENTICATED = "already_authenticated"
    INVALID_USERNAME = "invalid_username"
    WEAK_PASSWORD = "weak_password"
    INVALID_KEY = "invalid_key"
    USERNAME_TAKEN = "username_taken"
    USERNAME_TAKEN_IN_OTHER_CASE = "username_taken_in_other_case"
    REGISTRATION_CLOSED = "registration_closed"
    BAD_CREDENTIALS = "bad_credentials"
    TOO_MANY_ATTEMPTS = "too_many_attempts"
    ACCOUNT_LOCKED = "account_locked"
    ALREADY_ONLINE = "already_online"
    KEYS_REQUIRED = "keys_required"
    INVALID_TOKEN = "invalid_token"
    SELF = "self"
    UNKNOWN_USER = "unknown_user"
    OFFLINE = "offline"
    BLOCKED_BY_USER = "blocked_by_user"
    KEYS_UNKNOWN = "keys_unknown"
    ALREADY_BLOCKED = "already_blocked"
    NOT_BLOCKED = "not_blocked"
    MAILBOX_FULL = "mailbox_full"
    RATE_LIMITED = "rate_limited"
    INTERNAL_ERROR = "internal_error"


class WireError(Exception):
    """
    A frame that cannot be accepted.

    @ivar code: one of L{Code}.
    @ivar message: a sentence for people.
    @ivar request_id: the id of the offending request when it could be read, else C{None}.
    """

    def __init__(self, code: str, message: str, request_id: Any = None) -> None:
        super().__init__(code, message)
        self.code = code
        self.message = message
        self.request_id = request_id


class Request(NamedTuple):
    # A tuple rather than a frozen dataclass: made once per request line, in half the time.
    id: int | str
    op: str
    args: Mapping[str, Any]
    # Made by the client on its own (a receipt, a key check for its outbox), not by its user: it
    # does not count as the user's activity for the idle timeout.
    background: bool = False


@dataclass(frozen=True)
class Reply:
    id: Any
    ok: bool
    result: Mapping[str, Any] | None = None
    code: str | None = None
    message: str | None = None


@dataclass(frozen=True)
class Event:
    name: str
    fields: Mapping[str, Any]


# -- field checks -------------------------------------------------------------


def _text(min_len: int = 0, max_len: int = MAX_LINE) -> Callable[[Any], str | None]:
    def check(value: Any) -> str | None:
        if not isinstance(value, str):
            return "must be a string"
        if not min_len <= len(value) <= max_len:
            return f"must be {min_len} to {max_len} characters long"
        return None

    return check


def _integer(low: int, high: int) -> Callable[[Any], str | None]:
    def check(value: Any) -> str | None:
        if isinstance(value, bool) or not isinstance(value, int):
            return "must be an integer"
        if not low <= value <= high:
            return f"must be between {low} and {high}"
        return None

    return check


def _number(low: float, high: float) -> Callable[[Any], str | None]:
    def check(value: Any) -> str | None:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return "must be a number"
        if not low <= value <= high:
            return f"must be between {low:g} and {high:g}"
        return None

    return check


def _int_list(max_items: int) -> Callable[[Any], str | None]:
    item = _integer(0, MAX_INT_ID)

    def check(value: Any) -> str | None:
        if not isinstance(value, list):
            return "must be a list of integers"
        if len(value) > max_items:
            return f"may hold at most {max_items} items"
        if any(item(v) for v in value):
            return "must be a list of integers"
        return None

    return check


_NAME = _text(1, 256)
_PORT = _integer(0, 65535)

MAX_ACK = 1000
# Requests that take from a logged-in user's --message-rate (announced in the server's hello): what
# reaches others, lists of users (with 2000 online ~0.1 ms and 22 KB of answer for a 22-byte
# request) and blocks (each written to the store).
RATE_LIMITED_OPS = frozenset({"send", "broadcast", "who", "whosince", "block", "unblock"})
MAX_BROADCAST = 4096
MAX_BROADCAST_SIGNATURE = 512  # characters; a P-256 one (p2pchat.crypto.sign_broadcast) is about 250
MAX_KEY_SIGNATURE = 512  # characters; a P-256 one (p2pchat.crypto.sign_envelope_key) is about 230
MAX_MSG_ID = 64
MIN_PASSWORD = 8  # characters of a new account's password: refused outside, as weak_password
MAX_PASSWORD = 1024
PASSWORD_RULE = f"a password has {MIN_PASSWORD} to {MAX_PASSWORD} characters"

# op -> {argument: (check, required)}
REQUEST_SCHEMAS: dict[str, dict[str, tuple[Callable[[Any], str | None], bool]]] = {
    "hello": {"protocol": (_integer(0, MAX_INT_ID), True)},
    "register": {
        "username": (_NAME, True),
        "password": (_text(0, MAX_LINE), True),
        "fingerprint": (_text(0, 256), True),
        "envelope_key": (_text(0, 256), True),
        "key_signature": (_text(1, MAX_KEY_SIGNATURE), False),
    },
    "login": {
        "username": (_NAME, True),
        "password": (_text(0, MAX_LINE), True),
        "port": (_PORT, True),
        "fingerprint": (_text(0, 256), False),
        "envelope_key": (_text(0, 256), False),
        "key_signature": (_text(1, MAX_KEY_SIGNATURE), False),
    },
    "resume": {
        "username": (_NAME, True),
        "token": (_text(1, 256), True),
        "port": (_PORT, True),
        "key_signature": (_text(1, MAX_KEY_SIGNATURE), False),
    },
    "ping": {},
    "who": {},
    "whosince": {"seconds": (_number(0, 1e9), True)},
    "block": {"user": (_NAME, True)},
    "unblock": {"user": (_NAME, True)},
    "blocks": {},
    "lookup": {"user": (_NAME, True)},
    "keys": {"user": (_NAME, True)},
    "send": {
        "to": (_NAME, True),
        "msg_id": (_text(1, MAX_MSG_ID), True),
        "envelope": (_text(1, MAX_LINE), True),
    },
    "ack": {"seqs": (_int_list(MAX_ACK), True)},
    "broadcast": {
        "text": (_text(1, MAX_BROADCAST), True),
        "signature": (_text(1, MAX_BROADCAST_SIGNATURE), True),
    },
    "logout": {},
}


def loads_line(line: bytes) -> Any:
    """
    Parse one line as strict JSON (RFC 8259: no NaN, no lone surrogate escapes, nesting at most
    1024 deep, numbers that fit a double).

    @raise WireError: L{Code.BAD_UTF8} or L{Code.BAD_JSON}.
    """
    try:
        return orjson.loads(line)
    except orjson.JSONDecodeError:
        pass
    try:
        line.decode("utf-8")
    except UnicodeDecodeError:
        raise WireError(Code.BAD_UTF8, "the line is not valid UTF-8") from None
    raise WireError(Code.BAD_JSON, "the line is not a JSON object")


def dumps_line(obj: Mapping[str, Any]) -> bytes:
    """One frame: compact UTF-8 JSON and its newline."""
    return orjson.dumps(obj, option=orjson.OPT_APPEND_NEWLINE)


def _valid_id(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return 0 <= value < MAX_INT_ID
    return isinstance(value, str) and 1 <= len(value) <= MAX_ID_LENGTH


def decode_request(line: bytes) -> Request:
    """
    Parse and validate one request line (without its newline).

    @raise WireError: with the reason, and the request id when it could be read.
    """
    obj = loads_line(line)
    if not isinstance(obj, dict):
        raise WireError(Code.BAD_JSON, "the line is not a JSON object")
    request_id = obj.get("id")
    if not _valid_id(request_id):
        raise WireError(
            Code.BAD_REQUEST,
            "'id' must be a string of 1 to 64 characters or a non-negative integer",
        )
    op = obj.get("op")
    if not isinstance(op, str):
        raise WireError(Code.BAD_REQUEST, "'op' must be a string", request_id)
    schema = REQUEST_SCHEMAS.get(op)
    if schema is None:
        shown = op if len(op) <= 32 else op[:32] + "…"
        raise WireError(Code.UNKNOWN_OP, f"unknown operation {shown!r}", request_id)
    args = {}
    for name, (check, required) in schema.items():
        if name not in obj:
            if required:
                raise WireError(Code.BAD_REQUEST, f"'{name}' is missing", request_id)
            continue
        value = obj[name]
        problem = check(value)
        if problem is not None:
            raise WireError(Code.BAD_REQUEST, f"'{name}' {problem}", request_id)
        args[name] = value
    return Request(request_id, op, args, obj.get("background") is True)


def encode_result(request_id: Any, result: Mapping[str, Any] | None = None) -> bytes:
    return dumps_line({"id": request_id, "ok": True, "result": dict(result or {})})


def encode_error(request_id: Any, code: str, message: str) -> bytes:
    return dumps_line({"id": request_id, "ok": False, "error": {"code": code, "message": message}})


def encode_event(name: str, **fields: Any) -> bytes:
    return dumps_line({"event": name, **fields})


def encode_request(request_id: int | str, op: str, **args: Any) -> bytes:
    """Client side: one request line, newline included."""
    line = dumps_line({"id": request_id, "op": op, **args})
    if len(line) - 1 > MAX_LINE:
        raise WireError(Code.LINE_TOO_LONG, f"the request is longer than {MAX_LINE} bytes")
    return line


def decode_frame(line: bytes) -> Reply | Event:
    """
    Client side: parse one line from the server into a L{Reply} or an L{Event}.

    @raise WireError: when the server sent something that is neither.
    """
    obj = loads_line(line)
    if not isinstance(obj, dict):
        raise WireError(Code.BAD_JSON, "the server sent something other than a JSON object")
    if "event" in obj:
        name = obj["event"]
        if not isinstance(name, str):
            raise WireError(Code.BAD_JSON, "the server sent an event without a name")
        fields = {k: v for k, v in obj.items() if k != "event"}
        return Event(name, fields)
    if "id" in obj and isinstance(obj.get("ok"), bool):
        if obj["ok"]:
            result = obj.get("result")
            return Reply(obj["id"], True, result if isinstance(result, dict) else {})
        error = obj.get("error")
        if not isinstance(error, dict):
            error = {}
        return Reply(
            obj["id"],
            False,
            code=str(error.get("code", Code.INTERNAL_ERROR)),
            message=str(error.get("message", "")),
        )
    raise WireError(Code.BAD_JSON, "the server sent a frame that is neither a reply nor an event")

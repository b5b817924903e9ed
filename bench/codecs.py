"""Pure encoders and parsers the load generator uses: IRC lines, PROTOCOL.md frames, timed payloads, statistics."""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from p2pchat import wire

# -- IRC (RFC 2812), the baseline's protocol ------------------------------------------------


def irc_registration(nick: str) -> bytes:
    return f"NICK {nick}\r\nUSER {nick} 0 * :{nick}\r\n".encode()


def irc_privmsg(target: str, text: str) -> bytes:
    return f"PRIVMSG {target} :{text}\r\n".encode()


def irc_command(*params: str) -> bytes:
    """A command whose last parameter is sent as a trailing one (it may hold spaces)."""
    *middle, last = params
    return " ".join([*middle, ":" + last]).encode() + b"\r\n"


def parse_irc(line: bytes) -> tuple[str | None, str, list[str]]:
    """
    Split one IRC line (without its line end) into C{(source nick, command, params)}.

    The source is the nick part of a C{:nick!user@host} prefix, or C{None} without a prefix.
    """
    text = line.rstrip(b"\r").decode("utf-8", "replace")
    source = None
    if text.startswith(":"):
        prefix, _, text = text.partition(" ")
        source = prefix[1:].split("!", 1)[0]
    text, has_trailing, trailing = text.partition(" :")
    params = text.split()
    if not params:
        raise ValueError(f"no command in IRC line {line!r}")
    if has_trailing:
        params.append(trailing)
    return source, params[0].upper(), params[1:]


# -- PROTOCOL.md, our server's protocol -----------------------------------------------------


def request(request_id: int, op: str, **arguments: Any) -> bytes:
    """One request line: C{{"id": ..., "op": ..., ...}} followed by a newline, as our peers write it."""
    return wire.encode_request(request_id, op, **arguments)


def parse_frame(line: bytes) -> dict[str, Any]:
    """
    One reply or event line as a dict, read with our peers' own codec (C{p2pchat.wire}, orjson);
    C{ValueError} for anything that is not a JSON object.
    """
    try:
        frame = wire.loads_line(line)
    except wire.WireError as e:
        raise ValueError(f"{e.message}: {line!r}") from None
    if not isinstance(frame, dict):
        raise ValueError(f"frame is not a JSON object: {line!r}")  # noqa: TRY004 - one error for every bad frame
    return frame


# -- timed payloads ------------------------------------------------------------------------
# "<sender index>:<message number>:<send time in ns>:" then padding to a fixed size, so that
# both servers carry the same bytes and the receiver can compute the latency.

PAD = "x" * 4096


def payload(sender: int, number: int, sent_ns: int, size: int) -> str:
    head = f"{sender}:{number}:{sent_ns}:"
    return head + PAD[: max(0, size - len(head))]


def parse_payload(text: str) -> tuple[int, int, int]:
    """C{(sender index, message number, send time in ns)} from a L{payload}."""
    sender, number, sent_ns, _ = text.split(":", 3)
    return int(sender), int(number), int(sent_ns)


# -- statistics ----------------------------------------------------------------------------


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """The C{q}-th percentile (0-100) of already sorted values, nearest-rank method."""
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(q / 100 * len(sorted_values)))
    return sorted_values[rank - 1]


def latency_summary(latencies_ns: Iterable[int]) -> dict[str, float]:
    """p50/p90/p99/max in milliseconds, and the count."""
    values = sorted(latencies_ns)
    summary = {f"p{q}_ms": percentile(values, q) / 1e6 for q in (50, 90, 99)}
    summary["max_ms"] = values[-1] / 1e6 if values else math.nan
    summary["count"] = len(values)
    return summary


def median_metrics(rounds: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """
    The median over rounds of every numeric metric (NaN rounds left out); other values
    (notes, flags) are taken from the first round that has them.
    """
    merged: dict[str, Any] = {}
    for name in dict.fromkeys(k for r in rounds for k in r):
        values = [r[name] for r in rounds if name in r]
        if all(_is_number(v) for v in values):
            numbers = [v for v in values if not math.isnan(v)]
            merged[name] = statistics.median(numbers) if numbers else math.nan
        else:
            merged[name] = values[0]
    return merged


def ratios(ours: Mapping[str, Any], baseline: Mapping[str, Any]) -> dict[str, float]:
    """ours / baseline for every numeric metric both have; C{None} where the baseline is 0."""
    result = {}
    for name, value in ours.items():
        other = baseline.get(name)
        if _is_number(value) and _is_number(other) and not math.isnan(value) and not math.isnan(other):
            result[name] = value / other if other else None
    return result


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)

"""What the discovery server stores: the records, the start-up snapshot and the errors of a store."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple


@dataclass(frozen=True)
class Account:
    username: str
    # Opaque (scrypt) string made by the server; kept out of repr so it never reaches a log.
    password_hash: str | None = field(repr=False)
    fingerprint: str | None
    envelope_key: str | None
    created_at: float
    # The identity key's signature of the envelope key (p2pchat.crypto.sign_envelope_key), as the
    # peer gave it; None from peers older than it, and for accounts not logged in since.
    key_signature: str | None = None


class StoredEnvelope(NamedTuple):  # a tuple, so it is the parameters of its own INSERT
    # Global and strictly increasing, given by the directory. A stored seq is never given again,
    # even after its ack or a restart (only an unstored one, handed out just before a crash, can be).
    seq: int
    recipient: str
    sender: str
    msg_id: str
    envelope: str
    sent_at: float


@dataclass
class Snapshot:
    """Everything the server keeps in memory, loaded once at start."""

    accounts: dict[str, Account]
    blocks: set[tuple[str, str]]  # (blocker, blocked)
    tokens: dict[str, tuple[str, float]]  # token_hash -> (username, expires_at)
    # username -> last logout time, or for sessions a crash left open, the time the store started
    last_seen: dict[str, float]
    mailbox_counts: dict[str, int]  # recipient -> stored envelopes
    last_seq: int = 0  # at least the highest seq ever stored (a duplicate's unused seq may count too)


class StoreError(Exception):
    """The store could not do what was asked."""


class UsernameTaken(StoreError):
    """An account with that username exists already."""


class UnknownAccount(StoreError):
    """There is no account with that username."""

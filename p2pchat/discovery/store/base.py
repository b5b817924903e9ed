"""What the discovery server stores: the records, the start-up snapshot and the errors of a store."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Account:
    username: str
    # Opaque (scrypt) string made by the server; kept out of repr so it never reaches a log.
    password_hash: str | None = field(repr=False)
    fingerprint: str | None
    envelope_key: str | None
    created_at: float


@dataclass(frozen=True)
class StoredEnvelope:
    seq: int  # global and strictly increasing; never reused, even after deletes or restarts
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


class StoreError(Exception):
    """The store could not do what was asked."""


class UsernameTaken(StoreError):
    """An account with that username exists already."""


class MailboxFull(StoreError):
    """The recipient's mailbox holds its limit of envelopes."""


class UnknownAccount(StoreError):
    """There is no account with that username."""

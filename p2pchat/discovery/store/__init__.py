"""Persistence for the discovery server, behind one interface."""

from .base import Account, MailboxFull, Snapshot, StoredEnvelope, StoreError, UnknownAccount, UsernameTaken
from .sqlite import SQLiteStore

__all__ = [
    "Account",
    "MailboxFull",
    "Snapshot",
    "SQLiteStore",
    "StoredEnvelope",
    "StoreError",
    "UnknownAccount",
    "UsernameTaken",
]

"""Persistence for the discovery server, behind one interface."""

from .base import Account, Snapshot, StoredEnvelope, StoreError, UnknownAccount, UsernameTaken
from .sqlite import SQLiteStore

__all__ = [
    "Account",
    "Snapshot",
    "SQLiteStore",
    "StoredEnvelope",
    "StoreError",
    "UnknownAccount",
    "UsernameTaken",
]

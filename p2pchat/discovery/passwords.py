"""Slow salted password hashes (scrypt), computed off the reactor thread."""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import threading
import unicodedata

from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool

# 16 MiB and ~50 ms per hash on one core: slow for a guesser, bearable for a login.
SCRYPT_N = 2**14
SCRYPT_R = 8
SCRYPT_P = 1
_SALT_BYTES = 16
_KEY_BYTES = 32


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


# One password typed on two systems may come composed (U+00E9) on one and decomposed (e and U+0301)
# on the other, so it is hashed and checked in NFC, as RFC 8265 says: hashes made so are
# scrypt-nfc, one scrypt run a check. Older ones (scrypt) may be of either form: the password is
# checked as typed, then, when that differs, in NFC.
_OLDER, _NFC = "scrypt", "scrypt-nfc"


def hash_password(password: str, n: int = SCRYPT_N, r: int = SCRYPT_R, p: int = SCRYPT_P) -> str:
    """Return C{scrypt-nfc$n$r$p$salt$key}; blocking, call it in a thread."""
    salt = os.urandom(_SALT_BYTES)
    key = hashlib.scrypt(
        unicodedata.normalize("NFC", password).encode("utf-8"), salt=salt, n=n, r=r, p=p,
        maxmem=256 * n * r, dklen=_KEY_BYTES,
    )
    return f"{_NFC}${n}${r}${p}${_b64(salt)}${_b64(key)}"


def verify_password(password: str, stored: str) -> bool:
    """Check C{password} against a L{hash_password} string; blocking. A malformed hash is a mismatch."""
    try:
        scheme, n, r, p, salt, key = stored.split("$")
        if scheme not in (_OLDER, _NFC):
            return False
        salt_raw, key_raw = base64.b64decode(salt), base64.b64decode(key)
        n_, r_, p_ = int(n), int(r), int(p)
    except (ValueError, TypeError):
        return False
    normalized = unicodedata.normalize("NFC", password)
    forms = [normalized] if scheme == _NFC else list(dict.fromkeys([password, normalized]))
    for form in forms:
        try:
            computed = hashlib.scrypt(
                form.encode("utf-8"), salt=salt_raw, n=n_, r=r_, p=p_, maxmem=256 * n_ * r_, dklen=len(key_raw)
            )
        except (ValueError, TypeError):
            return False
        if hmac.compare_digest(computed, key_raw):
            return True
    return False


# Hashing threads run at this niceness (Linux schedules threads one by one): during a login storm
# the reactor keeps its core, and messages between users already online are not delayed.
HASH_NICENESS = 10
_thread_state = threading.local()


def _at_low_priority(f, *args):
    if not getattr(_thread_state, "lowered", False):
        _thread_state.lowered = True
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), HASH_NICENESS)
        except (AttributeError, OSError):
            pass  # not Linux, or not allowed: hashing still works, at normal priority
    return f(*args)


_DUMMY_HASH: str | None = None


def _verify_or_waste(password: str, stored: str | None) -> bool:
    """Like L{verify_password}, but an account without a hash costs as much time as a wrong password."""
    global _DUMMY_HASH
    if stored is None:
        if _DUMMY_HASH is None:
            _DUMMY_HASH = hash_password("not a password")
        verify_password(password, _DUMMY_HASH)
        return False
    return verify_password(password, stored)


class PasswordHasher:
    """
    Runs L{hash_password} and L{verify_password} in a small thread pool of its own, so that
    a storm of logins queues here instead of delaying the reactor or the storage thread.
    """

    def __init__(self, reactor, threads: int = 1, max_pending: int = 1000) -> None:
        self._reactor = reactor
        self._pool = ThreadPool(minthreads=0, maxthreads=threads, name="p2pchat-passwords")
        self._pending = 0
        self.max_pending = max_pending

    def start(self) -> None:
        self._pool.start()

    def stop(self) -> None:
        self._pool.stop()

    @property
    def busy(self) -> bool:
        """True when so many hashes wait that a new login should be told to come back later."""
        return self._pending >= self.max_pending

    def _run(self, f, *args) -> Deferred:
        self._pending += 1

        def done(result):
            self._pending -= 1
            return result

        return deferToThreadPool(self._reactor, self._pool, _at_low_priority, f, *args).addBoth(done)

    def hash(self, password: str) -> Deferred:
        return self._run(hash_password, password)

    def verify(self, password: str, stored: str | None) -> Deferred:
        return self._run(_verify_or_waste, password, stored)

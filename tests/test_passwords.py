"""Password hashing: scrypt strings, verification, and the low-priority thread it runs in."""

import base64
import hashlib
import os
import sys
import threading

from twisted.internet import defer, reactor
from twisted.trial.unittest import SynchronousTestCase, TestCase

from p2pchat.discovery import passwords
from p2pchat.discovery.passwords import PasswordHasher, hash_password, verify_password


class HashTests(SynchronousTestCase):
    def test_round_trip(self):
        """A hash verifies its password and no other; two hashes of one password differ (salt)."""
        stored = hash_password("correct horse", n=2**4)
        self.assertTrue(stored.startswith("scrypt-nfc$16$8$1$"))
        self.assertTrue(verify_password("correct horse", stored))
        self.assertFalse(verify_password("Correct horse", stored))
        self.assertNotEqual(stored, hash_password("correct horse", n=2**4))
        self.assertFalse(verify_password("correct horse", "other" + stored[len("scrypt-nfc"):]))  # another scheme

    def test_composed_or_decomposed(self):
        """A password with accents verifies however its letters were encoded when typed: composed
        (U+00E9) or decomposed (e and U+0301), as two systems may send it; with one scrypt run per
        check. A hash made before passwords were normalized (scheme scrypt) still verifies the
        password as it was typed then."""
        composed, decomposed = "caf\u00e9 cr\u00e8me", "cafe\u0301 cre\u0300me"
        for typed in (composed, decomposed):
            stored = hash_password(typed, n=2**4)
            self.assertTrue(verify_password(composed, stored))
            self.assertTrue(verify_password(decomposed, stored))
            self.assertFalse(verify_password("cafe creme", stored))
        def older(password: str) -> str:  # scrypt$: of the password as typed, or (for a while) in NFC
            salt = os.urandom(16)
            key = hashlib.scrypt(password.encode(), salt=salt, n=2**4, r=8, p=1, dklen=32)
            return f"scrypt$16$8$1${base64.b64encode(salt).decode()}${base64.b64encode(key).decode()}"

        self.assertTrue(verify_password(decomposed, older(decomposed)))
        self.assertFalse(verify_password(composed, older(decomposed)))  # as before normalizing
        self.assertTrue(verify_password(decomposed, older(composed)))
        self.assertTrue(verify_password(composed, older(composed)))
        new, old = hash_password(composed, n=2**4), older("other")
        runs = []
        scrypt = hashlib.scrypt
        self.patch(passwords.hashlib, "scrypt", lambda *a, **k: runs.append(1) or scrypt(*a, **k))
        verify_password(decomposed + "x", new)
        self.assertEqual(len(runs), 1)  # a scrypt-nfc hash: one run a check
        verify_password("plain", old)
        self.assertEqual(len(runs), 2)  # an older hash, a password whose NFC is itself: one run

    def test_malformed_hash(self):
        """A malformed stored hash is a mismatch, not an exception."""
        for bad in ["", "scrypt$1$2", "md5$16$8$1$AA==$AA==", "scrypt$x$8$1$AA==$AA=="]:
            self.assertFalse(verify_password("pw", bad))


class HasherTests(TestCase):
    def setUp(self):
        self.hasher = PasswordHasher(reactor, threads=1)
        self.hasher.start()
        self.addCleanup(self.hasher.stop)

    def test_unknown_account_costs_a_hash(self):
        """Verifying against no hash is False, after checking the password against a real hash
        (so that an unknown name takes as long as a wrong password)."""
        checked = []
        verify = passwords.verify_password
        self.patch(passwords, "verify_password", lambda password, stored: checked.append(stored) or verify(password, stored))
        d = self.hasher.verify("pw", None)
        d.addCallback(self.assertFalse)
        d.addCallback(lambda _: self.assertEqual([stored.split("$")[0] for stored in checked], ["scrypt-nfc"]))
        return d

    def test_hash_and_verify_off_thread(self):
        """hash and verify run outside the reactor thread and agree with each other."""

        async def run():
            stored = await self.hasher.hash("correct horse")
            self.assertTrue(await self.hasher.verify("correct horse", stored))
            self.assertFalse(await self.hasher.verify("wrong", stored))
            where = await self.hasher._run(threading.get_ident)
            self.assertNotEqual(where, threading.get_ident())

        return defer.Deferred.fromCoroutine(run())

    def test_low_priority(self):
        """On Linux the hashing thread runs at a raised niceness, the reactor thread does not."""
        if not sys.platform.startswith("linux"):
            raise self.skipTest("per-thread priorities are a Linux feature")
        mine = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

        def niceness():
            return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

        def check(theirs):
            self.assertGreaterEqual(theirs, passwords.HASH_NICENESS)
            self.assertEqual(os.getpriority(os.PRIO_PROCESS, threading.get_native_id()), mine)

        return self.hasher._run(niceness).addCallback(check)

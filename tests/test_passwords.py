"""Password hashing: scrypt strings, verification, and the low-priority thread it runs in."""

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
        self.assertTrue(stored.startswith("scrypt$16$8$1$"))
        self.assertTrue(verify_password("correct horse", stored))
        self.assertFalse(verify_password("Correct horse", stored))
        self.assertNotEqual(stored, hash_password("correct horse", n=2**4))
        self.assertFalse(verify_password("correct horse", "other" + stored[len("scrypt"):]))  # another scheme

    def test_composed_or_decomposed(self):
        """A password with accents verifies however its letters were encoded when typed: composed
        (U+00E9) or decomposed (e and U+0301), as two systems may send it. A hash made before
        passwords were normalized still verifies the password as it was typed then."""
        composed, decomposed = "caf\u00e9 cr\u00e8me", "cafe\u0301 cre\u0300me"
        for typed in (composed, decomposed):
            stored = hash_password(typed, n=2**4)
            self.assertTrue(verify_password(composed, stored))
            self.assertTrue(verify_password(decomposed, stored))
            self.assertFalse(verify_password("cafe creme", stored))
        before_normalizing = self.patch(passwords, "_normalized", lambda password: password)
        legacy = hash_password(decomposed, n=2**4)
        before_normalizing.restore()
        self.assertTrue(verify_password(decomposed, legacy))
        self.assertFalse(verify_password(composed, legacy))  # as before

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
        d.addCallback(lambda _: self.assertEqual([stored.split("$")[0] for stored in checked], ["scrypt"]))
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

"""Tests for p2pchat.peer.tap: the p2ppeer options as twistd parses them."""

from __future__ import annotations

import os
import stat

from twisted.logger import LogLevel
from twisted.python import usage
from twisted.scripts.twistd import ServerOptions
from twisted.trial import unittest

from p2pchat.peer import tap
from p2pchat.peer.tap import LOG_FILE_BYTES, LOG_FILES_KEPT


class OptionsTests(unittest.SynchronousTestCase):
    def setUp(self) -> None:
        self.data = os.path.abspath(self.mktemp())
        self.patch(os, "environ", {**os.environ, "XDG_DATA_HOME": self.data})

    def twistd(self, *args: str) -> ServerOptions:
        """Parse a twistd command line the way C{twistd -n p2ppeer ...} does."""
        options = ServerOptions()
        options.parseOptions(["-n", *args])
        return options

    def test_defaults(self) -> None:
        """Defaults: localhost:5000, any port, a private data dir under XDG_DATA_HOME with new keys."""
        config = self.twistd("p2ppeer", "--user", "alice").subOptions
        data_dir = os.path.join(self.data, "p2pchat", "peer", "alice")
        self.assertEqual((config["host"], config["server_port"], config["port"]), ("localhost", 5000, 0))
        self.assertEqual(config["data-dir"], data_dir)
        self.assertEqual(stat.S_IMODE(os.stat(data_dir).st_mode), 0o700)
        self.assertEqual(stat.S_IMODE(os.stat(os.path.join(data_dir, "identity.key")).st_mode), 0o600)
        self.assertEqual(stat.S_IMODE(os.stat(os.path.join(data_dir, "envelope.key")).st_mode), 0o600)
        os.chmod(data_dir, 0o755)  # a directory made readable to others is made private again
        again = self.twistd("p2ppeer", "--user", "alice").subOptions
        self.assertEqual(again["identity"].fingerprint, config["identity"].fingerprint)
        self.assertEqual(stat.S_IMODE(os.stat(data_dir).st_mode), 0o700)

    def test_not_in_the_background(self) -> None:
        """Without -n twistd would run the peer in the background with no input, where it would log
        in and out at once: refused, saying how to start it, before anything is made."""
        options = ServerOptions()
        with self.assertRaises(SystemExit) as caught:  # a sentence alone, not under twistd's usage
            options.parseOptions(["p2ppeer", "--user", "alice"])
        self.assertIn("twistd -n p2ppeer", str(caught.exception))
        self.assertFalse(os.path.exists(self.data))

    def test_running_already(self) -> None:
        """A second peer of one user (its pid file names a process that runs) is refused with a
        sentence saying so; a pid file left by a process that is gone is twistd's to clean up."""
        data_dir = self.twistd("p2ppeer", "--user", "alice").subOptions["data-dir"]
        pid_file = os.path.join(data_dir, "p2ppeer.pid")
        for stale in ("999999999", "not a pid", ""):
            with open(pid_file, "w") as f:
                f.write(stale)
            self.twistd("p2ppeer", "--user", "alice")
        with open(pid_file, "w") as f:
            f.write(str(os.getpid()))
        with self.assertRaises(SystemExit) as caught:
            self.twistd("p2ppeer", "--user", "alice")
        self.assertEqual(str(caught.exception),
                         f"alice is running already from {data_dir}: one user runs one peer at a time (process {os.getpid()})")

    def test_pid_and_log_files_per_user(self) -> None:
        """twistd's pid file and log go into the user's data dir, so peers started in one directory coexist."""
        options = self.twistd("p2ppeer", "--user", "alice")
        data_dir = options.subOptions["data-dir"]
        self.assertEqual(options["pidfile"], os.path.join(data_dir, "p2ppeer.pid"))
        self.assertEqual(options["logfile"], os.path.join(data_dir, "peer.log"))
        bob = self.twistd("p2ppeer", "--user", "bob")
        self.assertNotEqual(bob["pidfile"], options["pidfile"])

    def test_log_rotated_and_bounded(self) -> None:
        """The peer's own log is rotated at LOG_FILE_BYTES with LOG_FILES_KEPT old files kept
        (twistd's default keeps all of them); a --logfile or --logger given to twistd is left alone."""
        options = self.twistd("p2ppeer", "--user", "alice")
        path = options["logfile"]
        observer = options["logger"]()
        for i in range(LOG_FILES_KEPT + 3):
            observer({"log_format": "{line}", "line": "x" * LOG_FILE_BYTES, "log_time": 0.0, "log_level": LogLevel.info})
        names = sorted(name for name in os.listdir(os.path.dirname(path)) if name.startswith("peer.log"))
        self.assertEqual(names, ["peer.log"] + [f"peer.log.{n}" for n in range(1, LOG_FILES_KEPT + 1)])
        self.assertIsNone(self.twistd("--logfile", "-", "p2ppeer", "--user", "alice").get("logger"))

    def test_explicit_pid_and_log_kept(self) -> None:
        """A pid file or log file given to twistd is left alone."""
        options = self.twistd("--pidfile", "x.pid", "--logfile", "-", "p2ppeer", "--user", "alice")
        self.assertEqual((os.path.basename(options["pidfile"]), options["logfile"]), ("x.pid", "-"))

    def test_server_and_fingerprint(self) -> None:
        """--server takes HOST:PORT (v6 in brackets); a fingerprint is accepted as the server logs it."""
        config = self.twistd(
            "p2ppeer", "--user", "alice", "--server", "[::1]:6000", "--server-fingerprint", "SHA256:" + "AB" * 32
        ).subOptions
        self.assertEqual((config["host"], config["server_port"], config["server-fingerprint"]), ("::1", 6000, "ab" * 32))

    def test_bad_options(self) -> None:
        """Missing or malformed options are usage errors with a sentence, not tracebacks."""
        ca = self.mktemp()
        with open(ca, "w") as f:
            f.write("x")
        binary = self.mktemp()
        with open(binary, "wb") as f:
            f.write(b"\xff\xfe\n")
        cases = [
            ([], "--user is required"),
            (["--user", "no spaces"], "--user: 1 to 32 characters"),
            (["--user", "alice", "--server", "nohost"], "--server must be HOST:PORT"),
            (["--user", "alice", "--server", "h:99999"], "--server must be HOST:PORT"),
            (["--user", "alice", "--server", "h:0"], "--server must be HOST:PORT"),
            (["--user", "alice", "--port", "70000"], "--port must be between"),
            (["--user", "alice", "--server-fingerprint", "abc"], "--server-fingerprint must be"),
            (["--user", "alice", "--server-fingerprint", "a" * 64, "--server-ca", ca], "not both"),
            (["--user", "alice", "--server-ca", ca], f"--server-ca {ca}: the CA file holds no valid PEM certificate"),
            (["--user", "alice", "--password-file", "/nonexistent/pw"], "cannot read the password file /nonexistent/pw: No such file"),
            (["--user", "alice", "--data-dir", os.path.join(ca, "d")], f"--data-dir {os.path.join(os.path.abspath(ca), 'd')}: Not a directory"),
            (["--user", "alice", "--password-file", binary], f"the password file {binary} is not UTF-8 text"),
        ]
        for args, message in cases:
            with self.assertRaises(usage.UsageError, msg=args) as caught:
                tap.Options().parseOptions(args)
            self.assertIn(message, str(caught.exception), args)

    def test_unusable_key_file(self) -> None:
        """A damaged identity key is reported as a usage error naming the file."""
        data_dir = os.path.join(self.data, "d")
        os.makedirs(data_dir)
        with open(os.path.join(data_dir, "identity.key"), "w") as f:
            f.write("garbage")
        with self.assertRaises(usage.UsageError) as caught:
            tap.Options().parseOptions(["--user", "alice", "--data-dir", data_dir])
        self.assertIn("identity.key", str(caught.exception))


    def test_known_servers_file(self) -> None:
        """The pin for the server comes from known_servers; a file that is not text, or a damaged
        line for this server, is a usage error naming the file (trusting the server on first use
        again would let any server in); damaged lines for other servers are left alone."""
        data_dir = os.path.join(self.data, "pins")
        args = ["--user", "alice", "--data-dir", data_dir, "--server", "chat.test:5000"]
        tap.Options().parseOptions(args)
        known = os.path.join(data_dir, "known_servers")
        good = "ab" * 32
        cases = [
            (b"other:1 nonsense\nchat.test:5000 " + good.encode() + b"\n", good),
            (b"", None),
            (b"chat.test:5000 " + good[:10].encode() + b"\n", f"{known} line 1: the pin for chat.test:5000 is damaged"),
            (b"# mine\nchat.test:5000\n", f"{known} line 2: the pin for chat.test:5000 is damaged"),
            (b"\xff\xfe binary", f"{known} is not text"),
        ]
        for content, expected in cases:
            with open(known, "wb") as f:
                f.write(content)
            if expected is None or expected == good:
                self.assertEqual(self._pinned(args), expected)
                continue
            with self.assertRaises(usage.UsageError, msg=content) as caught:
                tap.Options().parseOptions(args)
            self.assertIn(expected, str(caught.exception))
        pinned = "cd" * 32  # a fingerprint given on the command line does not read the file
        self.assertEqual(self._pinned([*args, "--server-fingerprint", pinned]), pinned)

    def _pinned(self, args: list[str]) -> str | None:
        config = tap.Options()
        config.parseOptions(args)
        return config["pinned"]

    def test_data_dir_of_another_user(self) -> None:
        """A data directory holds one user's keys, history and outbox: started as someone else on
        it, the peer refuses, naming both, rather than send alice's messages as carol."""
        data_dir = os.path.join(self.data, "shared")
        tap.Options().parseOptions(["--user", "alice", "--data-dir", data_dir])
        with self.assertRaises(usage.UsageError) as caught:
            tap.Options().parseOptions(["--user", "carol", "--data-dir", data_dir])
        self.assertIn(f"{data_dir} holds the keys and history of alice, not carol", str(caught.exception))
        tap.Options().parseOptions(["--user", "alice", "--data-dir", data_dir])  # alice's own still works


class PasswordFileTests(unittest.SynchronousTestCase):
    def test_first_line_once(self) -> None:
        """The password file gives its first line; when that is refused there is no other."""
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("correct horse\nignored\n")
        passwords = tap.file_passwords(path)
        self.assertEqual(self.successResultOf(passwords(False)), "correct horse")
        self.assertIsNone(self.successResultOf(passwords(True)))

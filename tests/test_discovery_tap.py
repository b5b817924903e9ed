"""Command-line options of twistd p2pdiscovery."""

import os

from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase

from p2pchat.discovery.tap import Options


def parse(*argv: str) -> Options:
    options = Options()
    options.parseOptions(list(argv))
    return options


class OptionsTests(SynchronousTestCase):
    def test_defaults(self):
        """Defaults: port 5000 over TCP, 60 s block, no idle timeout, open registration, TLS."""
        self.patch(os, "environ", {"XDG_DATA_HOME": "/xdg", "HOME": "/home/u"})
        o = parse()
        limits = o.limits()
        self.assertEqual(o["port"], "tcp:5000:backlog=1024")
        self.assertEqual(o["data-dir"], "/xdg/p2pchat/discovery")
        self.assertEqual((limits.block_duration, limits.idle_timeout, limits.open_registration), (60.0, 0.0, True))
        self.assertFalse(o["insecure-plaintext"])

    def test_pid_file_in_the_data_dir(self):
        """Under twistd the pid file goes into the data directory (made if need be), so that a
        second server on it is refused wherever it is started from; one named on the command line
        stays where it is."""
        from twisted.scripts.twistd import ServerOptions

        data_dir = os.path.join(os.path.abspath(self.mktemp()), "d")
        options = ServerOptions()
        options.parseOptions(["-n", "p2pdiscovery", "--data-dir", data_dir])
        self.assertEqual(options["pidfile"], os.path.join(data_dir, "p2pdiscovery.pid"))
        self.assertTrue(os.path.isdir(data_dir))
        options = ServerOptions()
        options.parseOptions(["-n", "--pidfile", "x.pid", "p2pdiscovery", "--data-dir", data_dir])
        self.assertEqual(os.path.basename(options["pidfile"]), "x.pid")
        blocker = self.mktemp()
        open(blocker, "w").close()
        with self.assertRaises(usage.UsageError) as caught:
            ServerOptions().parseOptions(["-n", "p2pdiscovery", "--data-dir", os.path.join(blocker, "d")])
        self.assertIn("--data-dir: ", str(caught.exception))
        with open(os.path.join(data_dir, "p2pdiscovery.pid"), "w") as f:
            f.write(str(os.getpid()))  # a server that runs
        with self.assertRaises(SystemExit) as caught:
            ServerOptions().parseOptions(["-n", "p2pdiscovery", "--data-dir", data_dir])
        self.assertEqual(str(caught.exception), f"a discovery server is running already on {data_dir} (process {os.getpid()})")

    def test_home_fallback(self):
        """Without XDG_DATA_HOME the data lives under ~/.local/share."""
        self.patch(os, "environ", {"HOME": "/home/u"})
        self.assertEqual(parse()["data-dir"], "/home/u/.local/share/p2pchat/discovery")

    def test_port_forms(self):
        """--port takes a number or an endpoint description."""
        self.assertEqual(parse("--port", "6000")["port"], "tcp:6000:backlog=1024")
        self.assertEqual(parse("--port", "tcp:0:interface=127.0.0.1")["port"], "tcp:0:interface=127.0.0.1")
        self.assertRaises(usage.UsageError, parse, "--port", "70000")

    def test_limits(self):
        """The limits options reach the directory's Limits."""
        limits = parse("--block-duration", "5", "--timeout", "30", "--no-registration", "--mailbox-limit", "7",
                       "--message-rate", "0", "--max-line", "2048", "--presence-batch", "0", "--hold", "0.5",
                       "--max-connections-per-address", "0").limits()
        self.assertEqual((limits.block_duration, limits.idle_timeout, limits.open_registration, limits.mailbox_limit,
                          limits.message_rate, limits.max_line, limits.presence_batch, limits.hold,
                          limits.max_connections_per_address),
                         (5.0, 30.0, False, 7, 0.0, 2048, 0.0, 0.5, 0))
        self.assertEqual(parse().limits().max_connections_per_address, 1000)

    def test_bad_values(self):
        """Bad values are usage errors naming the option."""
        for argv in [("--block-duration", "soon"), ("--timeout", "-1"), ("--mailbox-limit", "0"),
                     ("--sync", "sometimes"), ("--credentials", "/nonexistent/file"), ("--max-line", "10"),
                     ("--hold", "-1"), ("--hold", "11"), ("--max-connections-per-address", "-1")]:
            with self.assertRaises(usage.UsageError, msg=argv) as cm:
                parse(*argv)
            self.assertIn(argv[0].lstrip("-").split("-")[0], str(cm.exception))

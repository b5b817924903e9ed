"""The benchmark's own logic: the load generator's codecs, the result arithmetic, the raw sqlite3 baseline,
the bare TLS relay."""

import io
import json
import math
import os
import re
import sqlite3
import sys
import threading
import time
from contextlib import redirect_stderr
from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st
from twisted.internet import defer
from twisted.trial.unittest import SynchronousTestCase, TestCase

from bench import bio_memory, codecs, loadgen, rawstore, run
from bench.procs import proc_stats
from tests.support import start_process, with_timeout


class IrcCodecTests(SynchronousTestCase):
    def test_registration(self):
        """Registration is NICK then USER, CRLF-terminated, the nick as user name and real name."""
        self.assertEqual(codecs.irc_registration("b00001"), b"NICK b00001\r\nUSER b00001 0 * :b00001\r\n")

    def test_privmsg(self):
        """A PRIVMSG carries its text as the trailing parameter."""
        self.assertEqual(codecs.irc_privmsg("#bench", "a b"), b"PRIVMSG #bench :a b\r\n")

    def test_command_trailing(self):
        """The last parameter of a command is always sent as a trailing one."""
        self.assertEqual(codecs.irc_command("PONG", "bench.localhost"), b"PONG :bench.localhost\r\n")

    def test_parse_prefixed(self):
        """A server line yields the source's nick, the command upper-cased and the parameters."""
        line = b":b00002!~b00002@127.0.0.1 privmsg b00001 :1:2:3:xx yy\r"
        self.assertEqual(codecs.parse_irc(line), ("b00002", "PRIVMSG", ["b00001", "1:2:3:xx yy"]))

    def test_parse_numeric_without_prefix(self):
        """Lines without a prefix have no source; middle parameters split on spaces."""
        self.assertEqual(codecs.parse_irc(b"PING :bench.localhost"), (None, "PING", ["bench.localhost"]))
        self.assertEqual(codecs.parse_irc(b":srv 376 b00001 :End"), ("srv", "376", ["b00001", "End"]))

    def test_parse_empty_trailing(self):
        """An empty trailing parameter is still a parameter."""
        self.assertEqual(codecs.parse_irc(b":a PRIVMSG b :"), ("a", "PRIVMSG", ["b", ""]))

    def test_parse_no_command(self):
        """A line with nothing but a prefix is refused."""
        self.assertRaises(ValueError, codecs.parse_irc, b":only.a.prefix")

    @given(st.text(alphabet=st.characters(blacklist_characters="\r\n\x00", blacklist_categories=("Cs",)),
                   max_size=200))
    def test_privmsg_round_trip(self, text):
        """Any text without line ends survives encoding as PRIVMSG and parsing back."""
        source, command, params = codecs.parse_irc(b":x!y@z " + codecs.irc_privmsg("b00001", text).rstrip(b"\n"))
        self.assertEqual((source, command, params), ("x", "PRIVMSG", ["b00001", text]))


class OursCodecTests(SynchronousTestCase):
    def test_request(self):
        """A request is one compact JSON object with id and op, then a newline."""
        line = codecs.request(7, "send", to="b00001", msg_id="m", envelope="e")
        self.assertTrue(line.endswith(b"\n"))
        self.assertEqual(json.loads(line), {"id": 7, "op": "send", "to": "b00001", "msg_id": "m", "envelope": "e"})

    def test_parse_frame(self):
        """
        Events and replies come back as dicts; anything but a JSON object is refused, and JSON is
        read as strictly as our peers read it (no NaN, UTF-8 only).
        """
        self.assertEqual(codecs.parse_frame(b'{"event":"bye","reason":"shutdown"}'),
                         {"event": "bye", "reason": "shutdown"})
        self.assertRaises(ValueError, codecs.parse_frame, b"[1]")
        self.assertRaises(ValueError, codecs.parse_frame, b"{")
        self.assertRaises(ValueError, codecs.parse_frame, b'{"seq":NaN}')
        self.assertRaises(ValueError, codecs.parse_frame, b'{"from":"\xff"}')


class PayloadTests(SynchronousTestCase):
    @given(st.integers(0, 10**6), st.integers(0, 10**9), st.integers(0, 2**62), st.integers(0, 400))
    def test_round_trip(self, sender, number, sent_ns, size):
        """Sender, number and send time come back out of a payload padded to the requested size."""
        text = codecs.payload(sender, number, sent_ns, size)
        self.assertEqual(codecs.parse_payload(text), (sender, number, sent_ns))
        self.assertEqual(len(text), max(size, len(f"{sender}:{number}:{sent_ns}:")))


class StatisticsTests(SynchronousTestCase):
    def test_percentile_nearest_rank(self):
        """The p-th percentile is the value at rank ceil(p/100 * n)."""
        values = list(range(1, 101))
        self.assertEqual([codecs.percentile(values, q) for q in (1, 50, 99, 100)], [1, 50, 99, 100])
        self.assertEqual(codecs.percentile([5], 99), 5)
        self.assertTrue(math.isnan(codecs.percentile([], 50)))

    def test_latency_summary(self):
        """Latencies in nanoseconds are summarised in milliseconds."""
        summary = codecs.latency_summary([3_000_000, 1_000_000, 2_000_000])
        self.assertEqual(summary, {"p50_ms": 2.0, "p90_ms": 3.0, "p99_ms": 3.0, "max_ms": 3.0, "count": 3})

    def test_median_metrics(self):
        """Numbers get their median over rounds (NaN left out); other values come from the first round."""
        rounds = [{"rate": 1.0, "p99": math.nan, "note": "a", "ok": True},
                  {"rate": 5.0, "p99": 2.0, "note": "b", "ok": False},
                  {"rate": 3.0, "p99": 4.0}]
        self.assertEqual(codecs.median_metrics(rounds), {"rate": 3.0, "p99": 3.0, "note": "a", "ok": True})

    def test_ratios(self):
        """ours/baseline for the numbers both sides have; None against a zero baseline."""
        ours = {"rate": 50.0, "cpu": 2.0, "idle": 0.5, "flag": True, "note": "x", "only_ours": 1.0, "gap": math.nan}
        baseline = {"rate": 100.0, "cpu": 1.0, "idle": 0, "flag": True, "note": "y", "gap": 1.0}
        self.assertEqual(codecs.ratios(ours, baseline), {"rate": 0.5, "cpu": 2.0, "idle": None})


class ResultTests(SynchronousTestCase):
    def test_cpu_between_marks(self):
        """CPU time between marks is whole ticks: 2 ticks against 1 is a ratio of exactly 2, which
        meets a target of at most 2x."""
        ours = {"start": {"t": 0.0, "cpu_s": 0.07}, "end": {"t": 3.0, "cpu_s": 0.09}}
        theirs = {"start": {"t": 0.0, "cpu_s": 0.11, "loadgen_cpu_s": 1.1}, "end": {"t": 3.0, "cpu_s": 0.12, "loadgen_cpu_s": 1.3}}
        self.assertEqual(run.between(ours, "start", "end"), (3.0, 0.02, 0))
        self.assertEqual(run.between(theirs, "start", "end"), (3.0, 0.01, 0.2))
        self.assertEqual(codecs.ratios({"cpu": 0.02}, {"cpu": 0.01}), {"cpu": 2.0})

    def test_targets(self):
        """A target on a ratio reads the ratio, an absolute one our value; without a value it is undecided."""
        checks = run.check_targets(
            "dm_relay_tls", {"deliveries_per_s": 10.0}, {"deliveries_per_s": 1.2, "cpu_per_delivery_us": None}
        )
        self.assertEqual([(c["metric"], c["met"]) for c in checks],
                         [("deliveries_per_s", True), ("cpu_per_delivery_us", None)])
        checks = run.check_targets("paced_latency_tls", {"p99_ms": 6.0, "p50_ms": 1.0}, {"p99_ms": 0.1})
        self.assertEqual([c["met"] for c in checks], [False, True])

    def test_summarise_skips_failed_rounds(self):
        """A failed round is kept in the rounds but left out of the medians and ratios."""
        entry = run.summarise(
            "offline_backlog", {}, {"ours": [{"store_per_s": 10.0}, {"failed": "boom"}, {"store_per_s": 30.0}],
                                    "baseline": [{"store_per_s": 40.0}]}, [],
        )
        self.assertEqual(entry["ours"], {"store_per_s": 20.0})
        self.assertEqual(entry["ratio"], {"store_per_s": 0.5})
        self.assertEqual(len(entry["rounds"]["ours"]), 3)
        self.assertEqual(entry["targets"][0]["met"], True)

    def test_results_file(self):
        """latest.json has the issue's shape and is strict JSON: NaN is written as null."""
        output = self.mktemp()
        results = {"scenarios": {"idle_tls": {"ours": {"x": math.nan}, "baseline": {"x": 1.0}, "ratio": {}}},
                   "machine": {"cores": 2}}
        run.write_results(results, Path(output))
        with open(os.path.join(output, "latest.json")) as f:
            loaded = json.loads(f.read(), parse_constant=lambda name: self.fail(f"{name} in JSON"))
        self.assertEqual(loaded["scenarios"]["idle_tls"]["ours"], {"x": None})
        self.assertEqual(set(loaded), {"scenarios", "machine"})


class OptionTests(SynchronousTestCase):
    def test_floors_only_when_named(self):
        """The floor scenarios are left out of a run unless named, and --idle-connections sizes idle_tls_floor too."""
        self.assertEqual([name for name in run.parse_args([]).scenarios if name.endswith("_floor")], [])
        self.assertIn("idle_tls", run.parse_args([]).scenarios)
        args = run.parse_args(["--scenarios", "idle_tls_floor,dm_relay_tls_floor", "--idle-connections", "7"])
        self.assertEqual(args.scenarios, ["idle_tls_floor", "dm_relay_tls_floor"])
        bench = run.Bench(args, None, Path(self.mktemp()))
        self.assertEqual(bench.params("idle_tls_floor")["connections"], 7)
        self.assertEqual(bench.params("dm_relay_tls_floor"), bench.params("dm_relay_tls"))
        self.assertEqual(run.users_needed(bench, ["idle_tls_floor"]), 7)

    def test_client_writes(self):
        """--client-writes reaches every scenario the load generator drives (coalesced unless given), and
        nothing else is taken."""
        bench = run.Bench(run.parse_args([]), None, Path(self.mktemp()))
        self.assertEqual(bench.params("dm_relay_tls")["client_writes"], "coalesced")
        bench = run.Bench(run.parse_args(["--client-writes", "prompt"]), None, Path(self.mktemp()))
        self.assertEqual({bench.params(name)["client_writes"] for name in run.SIZES if name != "p2p_direct"},
                         {"prompt"})
        self.assertNotIn("client_writes", bench.params("p2p_direct"))
        with redirect_stderr(io.StringIO()) as usage:
            self.assertRaises(SystemExit, run.parse_args, ["--client-writes", "bunched"])
        self.assertIn("invalid choice: 'bunched'", usage.getvalue())
        self.assertRaises(ValueError, loadgen.Load, "ours", 1, None, writes="bunched")


def _records(data: bytes) -> list[int]:
    """The payload lengths of the TLS records that C{data} holds (whole records only)."""
    lengths = []
    while len(data) >= 5:
        length = int.from_bytes(data[3:5], "big")
        lengths.append(length)
        data = data[5 + length:]
    return lengths


def _unsent(link) -> bytes:
    """What a load link's TCP transport holds and has not handed to the kernel yet."""
    tcp = link.transport.transport
    return bytes(tcp.dataBuffer[tcp.offset:]) + b"".join(tcp._tempDataBuffer)


class RelayTests(TestCase):
    async def relay(self, stack: str) -> int:
        """Start a real bench.relay process with its TLS on C{stack}; its port."""
        directory = self.mktemp()
        os.mkdir(directory)
        server = start_process(self, [sys.executable, "-m", "bench.relay", "0", "--stack", stack], path=directory)
        line = await server.output.wait_for(r"listening on|Traceback")
        return int(re.search(r"127\.0\.0\.1:(\d+)", line).group(1))

    async def close(self, load, *links) -> None:
        """Close links ourselves, so that they do not outlive the test (the server is killed at cleanup)."""
        for link in links:
            lost = defer.Deferred()
            load.on_lost = lost.callback
            link.transport.loseConnection()
            await with_timeout(lost, what=f"{link.user}'s close")

    async def each_way(self, check, stack: str = "pyopenssl") -> None:
        """C{check(load)} against one bench.relay process, for a load of each way of writing."""
        port = await self.relay(stack)
        for writes in loadgen.CLIENT_WRITES:
            await check(loadgen.Load("relay", port, None, writes=writes))

    def test_relay(self):
        """Against a real bench.relay process, whichever way the load users write: relay links log in by
        name, a line reaches the user it names (or comes back refused when nobody has that name), and
        keep-alives come back."""
        return self.each_way(self.exchange)

    def test_relay_stdlib(self):
        """The same with the relay's TLS on Python's ssl module (--stack stdlib)."""
        return self.each_way(self.exchange, "stdlib")

    async def exchange(self, load) -> None:
        seen = []
        done = defer.Deferred()

        def note(*what) -> None:
            seen.append(what)
            if len(seen) == 3:
                done.callback(None)

        load.on_direct = lambda link, sender, text: note("direct", link.user, sender, text)
        load.on_error = lambda link, op, code: note("error", link.user, op, code)
        load.on_after_read = lambda link: note("echo", link.user) if load.counts.pop("echoes", 0) else None
        alice, bob = await load.connect("b00000"), await load.connect("b00001")
        alice.send_direct("b00001", "1:2:3:hello there")
        alice.send_direct("b99999", "1:3:4:nobody")
        alice.flush()
        bob.ping()
        bob.flush()
        await with_timeout(done, what=f"the relayed line, the refusal and the echo ({load.writes})")
        self.assertEqual(sorted(seen), [
            ("direct", "b00001", "b00000", "1:2:3:hello there"),
            ("echo", "b00001"),
            ("error", "b00000", "send", "no_such_user"),
        ], load.writes)
        await self.close(load, alice, bob)

    def test_client_writes(self):
        """A flush of 3000 bytes: with "records" it is two TLS records (2048 and 952 bytes of data) waiting
        for the socket at once; with "prompt" it is in the kernel at once; with "coalesced" Twisted's TLS
        layer keeps it from the TCP transport until a later pass of the reactor. Each comes back from
        the relay whole."""
        return self.each_way(self.flush_3000)

    def test_client_writes_stdlib(self):
        """The same with the relay's TLS on Python's ssl module (--stack stdlib)."""
        return self.each_way(self.flush_3000, "stdlib")

    async def flush_3000(self, load) -> None:
        echoed = defer.Deferred()
        load.on_after_read = lambda link: echoed.callback(None) if load.counts.pop("echoes", 0) else None
        link = await load.connect("b00000")
        self.assertEqual(_unsent(link), b"", load.writes)
        link.queue(b"x" * 2999 + b"\n")
        link.flush()
        unsent = _unsent(link)
        if load.writes == "records":
            # AES-GCM adds 16 bytes and TLS 1.3 one byte of content type per record.
            self.assertEqual(_records(unsent), [2048 + 17, 952 + 17])
        else:
            self.assertEqual(unsent, b"", load.writes)
        await with_timeout(echoed, what=f"the echo ({load.writes})")
        await self.close(load, link)


class BIOMemoryTests(TestCase):
    def test_bad_arguments(self):
        """A line the relay could not take, too few users or no broadcast: a usage error before
        anything starts."""
        for argv, says in (
            (["--line", "16001"], "--line must be 1 to 16000 bytes"),
            (["--line", "0"], "--line must be 1 to 16000 bytes"),
            (["--users", "1"], "--users must be at least 2"),
            (["--broadcasts", "0"], "--broadcasts at least 1"),
        ):
            err = io.StringIO()
            with redirect_stderr(err), self.assertRaises(SystemExit) as exited:
                bio_memory.main(["bio_memory", *argv])
            self.assertEqual(exited.exception.code, 2)
            self.assertIn(says, err.getvalue())

    async def test_run(self):
        """bench.bio_memory runs a relay with each TLS layer for each phase and reports both, then
        broadcasts on our server and reports that."""
        process = start_process(self, [sys.executable, "-m", "bench.bio_memory", "--connections", "3",
                                       "--burst", "20000", "--line", "5000", "--rounds", "1", "--settle", "0",
                                       "--users", "3", "--broadcasts", "2"])
        await with_timeout(process.when_ended(), seconds=120, what="bench.bio_memory")
        output = "\n".join(process.output.lines)
        for layer in ("twisted", "ours"):
            self.assertRegex(output, rf"round 1  {layer} +reads \+ *[-\d.]+ KiB, writes \+ *[-\d.]+ KiB per connection")
        self.assertRegex(output, r"our server  broadcasts \+ *[-\d.]+ KiB per connection \(3 users, 2 broadcasts")


class RawStoreTests(SynchronousTestCase):
    def test_store_and_drain(self):
        """The raw loop stores every envelope in batches and drains them all, oldest first, leaving none."""
        path = self.mktemp()
        db = sqlite3.connect(path, isolation_level=None)
        self.addCleanup(db.close)
        for statement in rawstore.SCHEMA:
            db.execute(statement)
        rawstore.store(db, "r", count=600, senders=7, batch=64, size=50)
        self.assertEqual(db.execute("SELECT COUNT(*) FROM envelopes").fetchone()[0], 600)
        self.assertEqual(rawstore.drain(db, "r"), 600)
        self.assertEqual(db.execute("SELECT COUNT(*) FROM envelopes").fetchone()[0], 0)


class ProcStatsTests(SynchronousTestCase):
    def test_own_process(self):
        """CPU time and RSS of a live process are read from /proc."""
        stats = proc_stats(os.getpid())
        self.assertGreater(stats.rss_kib, 0)
        self.assertGreaterEqual(stats.cpu_s, 0)

    def test_to_the_nanosecond(self):
        """CPU times are the kernel's own to the nanosecond, not in /proc/PID/stat's ticks of 10 ms:
        they agree with what this process reads of its own to within a millisecond."""
        process, thread = time.process_time(), time.thread_time()
        stats = proc_stats(os.getpid())
        process_after, thread_after = time.process_time(), time.thread_time()
        self.assertTrue(process - 0.001 <= stats.cpu_s <= process_after + 0.001, (process, stats.cpu_s))
        self.assertTrue(thread - 0.001 <= stats.main_cpu_s <= thread_after + 0.001, (thread, stats.main_cpu_s))

    def test_main_thread_apart(self):
        """CPU time spent by another thread counts for the process, not for its main thread."""

        def burn() -> None:
            start = time.thread_time()
            while time.thread_time() - start < 0.3:
                pass

        before = proc_stats(os.getpid())
        worker = threading.Thread(target=burn)
        worker.start()
        worker.join()
        after = proc_stats(os.getpid())
        spent, main_spent = after.cpu_s - before.cpu_s, after.main_cpu_s - before.main_cpu_s
        self.assertGreaterEqual(spent, 0.25)
        self.assertLess(main_spent, 0.05)

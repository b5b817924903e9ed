"""End to end: the real `twistd -n p2pdiscovery` process on a loopback ephemeral port, spoken to
over real TLS exactly as PROTOCOL.md says."""

from __future__ import annotations

import os
import resource
import socket
import stat
import sys

from twisted.internet import defer, reactor, task
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol, wrapClientTLS
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.trial.unittest import SkipTest, TestCase

from p2pchat.tls import ServerTrust

from .support import (
    DiscoveryServer, LineClient, changes, fake_keys, start_process, twistd_argv, with_timeout,
)

PASSWORD = "correct horse"


class E2E(TestCase):
    timeout = 120

    def setUp(self):
        self.data_dir = self.mktemp()
        self.keys: dict[str, tuple[str, str]] = {}

    async def server(self, *options: str) -> DiscoveryServer:
        return await DiscoveryServer(self, self.data_dir, *options).start()

    async def connect(self, server: DiscoveryServer) -> LineClient:
        trust = ServerTrust("127.0.0.1", pinned=server.fingerprint)
        endpoint = wrapClientTLS(trust.creator(), TCP4ClientEndpoint(reactor, "127.0.0.1", server.port))
        client = await with_timeout(connectProtocol(endpoint, LineClient()), what="connect")
        self.addCleanup(lambda: client.transport.abortConnection() if client.transport.connected else None)
        hello = await client.event("hello")
        self.assertEqual(hello.fields["protocol"], 1)
        reply = await client.request("hello", protocol=1)
        self.assertTrue(reply.ok)
        return client

    async def user(self, server: DiscoveryServer, name: str, register: bool = True) -> LineClient:
        client = await self.connect(server)
        if register and name not in self.keys:
            fp, ek = self.keys.setdefault(name, fake_keys())
            reply = await client.request("register", username=name, password=PASSWORD, fingerprint=fp, envelope_key=ek)
            self.assertTrue(reply.ok, reply)
        reply = await client.request("login", username=name, password=PASSWORD, port=4000)
        self.assertTrue(reply.ok, reply)
        client.login_result = reply.result
        return client


def e2e(f):
    def test(self):
        return defer.Deferred.fromCoroutine(f(self))

    test.__doc__ = f.__doc__
    test.__name__ = f.__name__
    return test


class ServerProcessTests(E2E):
    @e2e
    async def test_chat_over_tls(self):
        """Two users on the real server over TLS: presence, who, lookup, a relayed envelope and logout."""
        server = await self.server()
        alice = await self.user(server, "alice")
        bob = await self.user(server, "bob")
        self.assertEqual(changes(await alice.event("presence")), [("bob", "online")])
        self.assertEqual((await alice.request("who")).result["users"], ["bob"])
        found = (await alice.request("lookup", user="bob")).result
        self.assertEqual((found["host"], found["port"], found["fingerprint"]), ("127.0.0.1", 4000, self.keys["bob"][0]))
        sent = await alice.request("send", to="bob", msg_id="m1", envelope="sealed bytes")
        self.assertEqual(sent.result["status"], "delivered")
        got = await bob.event("envelope")
        self.assertEqual((got.fields["from"], got.fields["envelope"]), ("alice", "sealed bytes"))
        self.assertTrue((await bob.request("logout")).ok)
        self.assertEqual((await bob.event("bye")).fields["reason"], "logout")
        await with_timeout(bob.lost, what="server closes after logout")
        self.assertEqual(changes(await alice.event("presence")), [("bob", "logout")])

    @e2e
    async def test_kill9_durability(self):
        """Envelopes whose send was confirmed survive a kill -9 of the server and are delivered
        exactly once after restart; accounts, blocks and login history survive too."""
        server = await self.server()
        alice = await self.user(server, "alice")
        bob = await self.user(server, "bob")
        carol = await self.user(server, "carol")
        self.assertTrue((await carol.request("block", user="alice")).ok)
        await bob.request("logout")
        confirmed = []
        for i in range(50):
            reply = await alice.request("send", to="bob", msg_id=f"m{i}", envelope=f"envelope {i}")
            self.assertEqual(reply.result["status"], "stored")
            confirmed.append(f"m{i}")
        # A resend of a confirmed id after the crash must not double it.
        await server.kill("KILL")

        server = await self.server()
        alice = await self.user(server, "alice", register=False)
        again = await alice.request("send", to="bob", msg_id="m7", envelope="envelope 7")
        self.assertTrue(again.result["duplicate"])
        self.assertEqual((await alice.request("send", to="carol", msg_id="x", envelope="e")).code, "blocked_by_user")
        self.assertNotIn("carol", (await alice.request("whosince", seconds=3600)).result["users"])
        bob = await self.user(server, "bob", register=False)
        self.assertEqual((await bob.request("whosince", seconds=3600)).result["users"], ["alice", "carol"])
        self.assertEqual(bob.login_result["mailbox"], 50)
        got = [await bob.event("envelope") for _ in range(50)]
        self.assertEqual([e.fields["msg_id"] for e in got], confirmed)
        self.assertTrue((await bob.request("ack", seqs=[e.fields["seq"] for e in got])).ok)
        self.assertEqual(bob.queued("envelope"), [])
        await bob.request("logout")
        await server.kill("TERM")

        server = await self.server()
        bob = await self.user(server, "bob", register=False)
        self.assertEqual(bob.login_result["mailbox"], 0)

    @e2e
    async def test_garbage_burst(self):
        """One client pours garbage (and finally an over-long line) while two others keep chatting:
        the garbage gets error replies, then the connection closes; the chat loses nothing."""
        server = await self.server("--message-rate", "0")
        alice = await self.user(server, "alice")
        bob = await self.user(server, "bob")
        mallory = await self.connect(server)
        garbage = [b"\xff\xfe\xfd", b"{", b"[]", b'{"id":1}', b'{"id":1,"op":"x"}', b"null", b'{"id":2,"op":"who"}',
                   b'{"id":"' + b"a" * 100 + b'","op":"ping"}', os.urandom(200).replace(b"\n", b"")]
        sends = []
        for i in range(100):
            for line in garbage:
                mallory.send_raw(line + b"\n")
            sends.append(alice.request("send", to="bob", msg_id=f"m{i}", envelope=f"hello {i}"))
            sends.append(bob.request("send", to="alice", msg_id=f"r{i}", envelope=f"reply {i}"))
        mallory.send_raw(b"x" * 70000 + b"\n")
        results = await defer.gatherResults(sends)
        self.assertTrue(all(r.ok and r.result["status"] == "delivered" for r in results))
        to_bob = [await bob.event("envelope") for _ in range(100)]
        to_alice = [await alice.event("envelope") for _ in range(100)]
        self.assertEqual([e.fields["msg_id"] for e in to_bob], [f"m{i}" for i in range(100)])
        self.assertEqual([e.fields["msg_id"] for e in to_alice], [f"r{i}" for i in range(100)])
        await with_timeout(mallory.lost, what="over-long line closes the connection")
        codes = [r.code for r in mallory.raw_replies[1:]]  # after the reply to hello
        self.assertEqual(len(codes), 901)
        self.assertEqual(codes[-1], "line_too_long")
        self.assertNotIn(None, codes)
        self.assertEqual((await alice.request("who")).result["users"], ["bob"])

    @e2e
    async def test_backlog_of_large_envelopes(self):
        """A mailbox of 300 envelopes of the largest size (about 18 MiB) reaches its user whole and in
        order: the server sends it as fast as the client reads, and never cuts the client off as a
        slow consumer for a backlog the server chose to send."""
        server = await self.server("--message-rate", "0")
        alice = await self.user(server, "alice")
        bob = await self.user(server, "bob")
        await bob.request("logout")
        large = "e" * 60 * 1024
        for i in range(300):
            reply = await alice.request("send", to="bob", msg_id=f"m{i}", envelope=f"{i:03d}{large}")
            self.assertEqual(reply.result["status"], "stored")
        bob = await self.user(server, "bob", register=False)
        self.assertEqual(bob.login_result["mailbox"], 300)
        got = []
        for _ in range(300):
            envelope = await bob.event("envelope")
            got.append(envelope.fields["msg_id"])
            self.assertTrue((await bob.request("ack", seqs=[envelope.fields["seq"]])).ok)
        self.assertEqual(got, [f"m{i}" for i in range(300)])
        self.assertEqual((await bob.request("who")).result["users"], ["alice"])

    @e2e
    async def test_killed_client_leaves_no_ghost(self):
        """A client process killed with kill -9 is offline at once for everyone else."""
        server = await self.server()
        alice = await self.user(server, "alice")
        fp, ek = fake_keys()
        script = CLIENT_SCRIPT.format(port=server.port, fp=fp, ek=ek)
        child = start_process(self, [sys.executable, "-c", script])
        await child.output.wait_for("logged in")
        self.assertEqual(changes(await alice.event("presence")), [("zoe", "online")])
        child.signal("KILL")
        offline = await alice.event("presence", timeout=10)
        self.assertEqual(changes(offline), [("zoe", "disconnected")])
        self.assertEqual((await alice.request("who")).result["users"], [])

    @e2e
    async def test_silent_client_dropped(self):
        """A client that stays connected but silent (its network gone) is dropped after the
        keep-alive timeout, and its user is offline."""
        server = await self.server("--keepalive-timeout", "3")
        alice = await self.user(server, "alice")
        bob = await self.user(server, "bob")
        await alice.event("presence")

        def ping():
            # A ping still unanswered when the cleanup closes alice's connection fails with it.
            return alice.request("ping").addErrback(lambda f: f.trap(ConnectionDone, ConnectionLost))

        pinger = task.LoopingCall(ping)  # alice keeps pinging; bob says nothing
        pinger.start(1.0)
        self.addCleanup(pinger.stop)
        self.assertEqual((await bob.event("bye", timeout=10)).fields["reason"], "keepalive_timeout")
        offline = await alice.event("presence", timeout=5)
        self.assertEqual(changes(offline), [("bob", "keepalive_timeout")])

    @e2e
    async def test_credentials_and_closed_registration(self):
        """Accounts from a credentials file log in (binding keys on first login); registration is closed."""
        creds = self.mktemp()
        with open(creds, "w") as f:
            f.write("hans falcon*solo\nyoda wise@!man\n")
        server = await self.server("--credentials", creds, "--no-registration")
        client = await self.connect(server)
        fp, ek = fake_keys()
        reply = await client.request("register", username="eve", password=PASSWORD, fingerprint=fp, envelope_key=ek)
        self.assertEqual(reply.code, "registration_closed")
        self.assertEqual((await client.request("login", username="hans", password="Falcon*solo", port=0,
                                               fingerprint=fp, envelope_key=ek)).code, "bad_credentials")
        reply = await client.request("login", username="hans", password="falcon*solo", port=0,
                                     fingerprint=fp, envelope_key=ek)
        self.assertTrue(reply.ok, reply)
        with open(os.path.join(self.data_dir, "discovery.sqlite3"), "rb") as f:
            self.assertNotIn(b"falcon*solo", f.read())

    @e2e
    async def test_own_certificate(self):
        """With an ssl: endpoint the server serves that (CA-issued) certificate, and a client that
        trusts only the CA, hostname checked, talks to it."""
        from cryptography.hazmat.primitives.serialization import Encoding

        from .test_tls import CA_PEM, CA_SIGNED_SERVER

        key, cert = os.path.abspath(self.mktemp()), os.path.abspath(self.mktemp())
        with open(key, "wb") as f:
            f.write(CA_SIGNED_SERVER.key_pem())
        with open(cert, "wb") as f:
            f.write(CA_SIGNED_SERVER.certificate.public_bytes(Encoding.PEM))
        server = DiscoveryServer(self, self.data_dir)
        server.endpoint = f"ssl:0:interface=127.0.0.1:privateKey={key}:certKey={cert}"
        await server.start()
        trust = ServerTrust("discovery.test", ca_pem=CA_PEM)
        endpoint = wrapClientTLS(trust.creator(), TCP4ClientEndpoint(reactor, "127.0.0.1", server.port))
        client = await with_timeout(connectProtocol(endpoint, LineClient()), what="connect")
        self.addCleanup(client.transport.abortConnection)
        self.assertEqual((await client.event("hello")).fields["protocol"], 1)
        self.assertIsNone(server.fingerprint)  # it logs none of its own: peers check the CA's
        self.assertFalse(os.path.exists(os.path.join(self.data_dir, "server.key")))

    @e2e
    async def test_port_in_use(self):
        """A port another program holds stops the server with one line saying so, and a failing
        exit status (for systemd and scripts), rather than a traceback and status 0."""
        holder = socket.socket()
        self.addCleanup(holder.close)
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        child = start_process(self, twistd_argv() + [
            "-n", "--pidfile=", "p2pdiscovery", "--port", f"tcp:{port}:interface=127.0.0.1", "--data-dir", self.data_dir,
        ])
        code = await with_timeout(child.when_ended(), what="twistd exit")
        self.assertEqual(code, 1)
        output = "\n".join(child.output.lines)
        self.assertIn(f"p2pdiscovery cannot start: Couldn't listen on 127.0.0.1:{port}", output)
        self.assertNotIn("Traceback", output)

    @e2e
    async def test_unusable_data_dir_or_port(self):
        """A data directory that cannot be made, a database file that is not one, or a port
        description Twisted cannot use, stops the server with one line and exit status 1 (the first
        used to leave it running, idle)."""
        blocker = self.mktemp()
        os.close(os.open(blocker, os.O_CREAT | os.O_WRONLY, 0o600))  # a file where a directory should be
        damaged = self.mktemp()
        os.makedirs(damaged)
        with open(os.path.join(damaged, "discovery.sqlite3"), "wb") as f:
            f.write(b"not a database, " * 512)
        for options, said in [
            (["--port", "tcp:0:interface=127.0.0.1", "--data-dir", os.path.join(blocker, "data")], "Not a directory"),
            (["--port", "tcp:0:interface=127.0.0.1", "--data-dir", damaged],
             os.path.join(damaged, "discovery.sqlite3") + ": file is not a database"),
            (["--port", "nonsense", "--data-dir", self.data_dir], "--port 'nonsense': "),
            (["--port", "tcp:99999:interface=127.0.0.1", "--data-dir", self.data_dir], "--port 'tcp:99999:interface=127.0.0.1': "),
        ]:
            child = start_process(self, twistd_argv() + ["-n", "--pidfile=", "p2pdiscovery", *options])
            code = await with_timeout(child.when_ended(), what="twistd exit")
            output = "\n".join(child.output.lines)
            self.assertEqual(code, 1, output)
            self.assertIn("p2pdiscovery cannot start: ", output)
            self.assertIn(said, output)
            self.assertNotIn("Traceback", output)

    @e2e
    async def test_open_file_limit_raised(self):
        """Each connection is an open file: started with a low soft limit (the usual one is 1024,
        which turned users away at about a thousand), the server raises it to the hard one, says so,
        and takes more connections than the low limit allowed."""
        _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if hard == resource.RLIM_INFINITY or hard < 1024:
            raise SkipTest(f"the hard limit on open files here ({hard}) leaves nothing to show")
        server = DiscoveryServer(self, self.data_dir)
        server.launcher = ["/bin/sh", "-c", 'ulimit -Sn 64 && exec "$@"', "sh"]
        await server.start()
        self.assertIn(f"open files: up to {hard} (raised from 64)", "\n".join(server.process.output.lines))
        with open(f"/proc/{server.process.transport.pid}/limits") as f:
            self.assertIn(f"Max open files            {hard}", f.read())
        idle = []
        for _ in range(100):
            idle.append(socket.create_connection(("127.0.0.1", server.port)))
            self.addCleanup(idle[-1].close)
        await with_timeout(defer.Deferred.fromCoroutine(self.connect(server)), 20, "a TLS connection past the low limit")

    @e2e
    async def test_private_files_made_private(self):
        """The key and the database (password hashes) are made readable by their owner only at each
        start, even when they come back from a copy that made them readable to all."""
        server = await self.server()
        await server.kill("TERM")
        private = [os.path.join(self.data_dir, name) for name in ("server.key", "discovery.sqlite3")]
        for path in private:
            os.chmod(path, 0o644)
        await self.server()
        self.assertEqual([stat.S_IMODE(os.stat(path).st_mode) for path in private], [0o600, 0o600])

    @e2e
    async def test_second_server_on_one_data_dir(self):
        """A second server on the data directory of a running one is refused (its pid file is
        there), even when started from another directory, on another port."""
        data_dir = os.path.abspath(self.data_dir)
        argv = twistd_argv() + ["-n", "p2pdiscovery", "--port", "tcp:0:interface=127.0.0.1", "--data-dir", data_dir]
        runs = []
        for _ in range(2):
            cwd = os.path.abspath(self.mktemp())
            os.makedirs(cwd)
            runs.append(start_process(self, argv, path=cwd))
            if len(runs) == 1:
                await runs[0].output.wait_for("p2pdiscovery listening on")
        code = await with_timeout(runs[1].when_ended(), what="second twistd exit")
        self.assertEqual(code, 1)
        self.assertIn(f"a discovery server is running already on {data_dir} (process ", "\n".join(runs[1].output.lines))
        self.assertTrue(os.path.exists(os.path.join(data_dir, "p2pdiscovery.pid")))

    @e2e
    async def test_bad_option(self):
        """A bad option value stops twistd with a clear message instead of starting."""
        child = start_process(self, twistd_argv() + ["-n", "--pidfile=", "p2pdiscovery", "--block-duration", "soon"])
        code = await with_timeout(child.when_ended(), what="twistd exit")
        self.assertNotEqual(code, 0)
        self.assertIn("--block-duration takes a number", "\n".join(child.output.lines))


# A client in another process, so that kill -9 takes its socket away as a crash would.
CLIENT_SCRIPT = r"""
import json, socket, ssl, sys, time
ctx = ssl.create_default_context()
ctx.check_hostname = False
ctx.verify_mode = ssl.CERT_NONE
s = ctx.wrap_socket(socket.create_connection(("127.0.0.1", {port})))
f = s.makefile("rwb")
def call(**req):
    f.write(json.dumps(req).encode() + b"\n"); f.flush()
    while True:
        frame = json.loads(f.readline())
        if frame.get("id") == req["id"]:
            return frame
call(id=1, op="hello", protocol=1)
call(id=2, op="register", username="zoe", password="correct horse", fingerprint="{fp}", envelope_key="{ek}")
assert call(id=3, op="login", username="zoe", password="correct horse", port=0)["ok"]
print("logged in", flush=True)
while True:
    time.sleep(1)
"""

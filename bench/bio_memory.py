"""What large reads and writes leave in a TLS server's memory: Twisted's TLS layer against our
server's (L{MeteredTLS}, which gives a connection new memory BIOs after a large read or write).

    python -m bench.bio_memory [--connections 500] [--burst 60000] [--line 15000] [--rounds 2]
                               [--users 500] [--broadcasts 15]

Each round starts a bare TLS line relay (L{bench.relay}'s protocol) once with each TLS layer, in
turn. CONNECTIONS clients log in. Reads: each client sends one burst of BURST bytes of lines
addressed to nobody, each answered with a short C{?nobody} line, and waits for all the answers.
Writes: each client sends itself one line of LINE bytes, which the relay writes back at once. The
relay's RSS is read SETTLE seconds (2) before the bursts, and as long after the last answer of each
phase. A memory BIO keeps a buffer as large as the most it ever held until its connection closes;
Twisted reads up to 64 KiB at once and writes up to 16 KiB at a time.

Then our discovery server: USERS (500) load users log in and idle; one of them sends BROADCASTS
(15) broadcasts of 1000 characters at once, which reach every other user in one write each (about
1 KiB per broadcast). The server's RSS is read SETTLE seconds before and after the last delivery.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.procs import Processes, free_port, proc_stats, wait_for_port
from bench.servers import child_env

LINE = b"@nobody " + b"x" * 91 + b"\n"  # 100 bytes


def serve(port: int, layer: str) -> None:
    from twisted.internet import reactor
    from twisted.protocols.tls import TLSMemoryBIOProtocol

    from bench.relay import listen
    from p2pchat.discovery.protocol import MeteredTLS

    listen(port, {"twisted": TLSMemoryBIOProtocol, "ours": MeteredTLS}[layer])
    reactor.run()


def run_once(main, result: dict) -> dict:
    """Run the coroutine C{main()} on the reactor, once per process; C{result}, with C{error} set if
    it failed."""
    from twisted.internet import defer, reactor
    from twisted.python.failure import Failure

    def stop(outcome):
        if isinstance(outcome, Failure):
            result["error"] = outcome.getErrorMessage()
        reactor.stop()

    defer.ensureDeferred(main()).addBoth(stop)
    reactor.run()
    return result


def child(what: str, *argv: str) -> dict:
    """Run C{python -m bench.bio_memory ARGV} (the clients: a reactor runs once per process) and
    give the JSON it printed last; exit with C{what} and the error if it failed."""
    out = subprocess.run(
        [sys.executable, "-m", "bench.bio_memory", *argv],
        capture_output=True, text=True, env=child_env(), timeout=300, check=False,
    )
    r = json.loads(out.stdout.strip().splitlines()[-1]) if out.stdout.strip() else {"error": out.stderr[-500:]}
    if "error" in r:
        raise SystemExit(f"{what}: {r['error']}")
    return r


async def measure(pid: int, connections: int, settle: float, work) -> dict:
    """Read the server C{settle} s after its clients are in, run C{await work()}, and read it again
    as long after: RSS growth per connection, CPU over the work, RSS with the clients connected."""
    from bench.loadgen import sleep

    await sleep(settle)
    before = proc_stats(pid)
    await work()
    cpu_s = proc_stats(pid).cpu_s - before.cpu_s
    await sleep(settle)
    after = proc_stats(pid)
    return {"growth_kib": (after.rss_kib - before.rss_kib) / connections, "cpu_s": cpu_s,
            "connected_rss_kib": before.rss_kib}


def drive(port: int, pid: int, phase: str, connections: int, burst: int, line: int, settle: float) -> dict:
    """Connect, run C{phase} ("reads" or "writes") and read the server's RSS and CPU; runs its own
    reactor once."""
    from twisted.internet import defer, reactor
    from twisted.internet.endpoints import SSL4ClientEndpoint
    from twisted.internet.protocol import Factory
    from twisted.internet.ssl import CertificateOptions
    from twisted.protocols.basic import LineOnlyReceiver

    from bench.loadgen import bounded

    class Client(LineOnlyReceiver):
        delimiter = b"\n"
        MAX_LENGTH = line + 100

        def connectionMade(self) -> None:
            self.answers, self.expected, self.done = 0, 1, defer.Deferred()
            self.name = b"u%d" % id(self)
            self.sendLine(self.name)

        def lineReceived(self, line: bytes) -> None:
            self.answers += 1
            if self.answers == self.expected:
                self.done.callback(None)

        def burst(self, lines: int) -> defer.Deferred:
            self.answers, self.expected, self.done = 0, lines, defer.Deferred()
            self.transport.write(LINE * lines)
            return self.done

        def to_self(self) -> defer.Deferred:
            self.answers, self.expected, self.done = 0, 1, defer.Deferred()
            self.sendLine(b"@" + self.name + b" " + b"x" * line)
            return self.done

    result: dict = {}

    async def main() -> None:
        endpoint = SSL4ClientEndpoint(reactor, "127.0.0.1", port, CertificateOptions(verify=False))
        clients = [await bounded(endpoint.connect(Factory.forProtocol(Client)), 10) for _ in range(connections)]
        for client in clients:
            await bounded(client.done, 10)  # logged in

        async def work() -> None:
            for client in clients:
                await bounded(client.burst(burst // len(LINE)) if phase == "reads" else client.to_self(), 10)

        result.update(await measure(pid, connections, settle, work))
        for client in clients:
            client.transport.abortConnection()

    return run_once(main, result)


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.bio_memory", description=__doc__.split("\n\n")[0])
    parser.add_argument("--connections", type=int, default=500)
    parser.add_argument("--burst", type=int, default=60_000, help="bytes each client sends at once")
    parser.add_argument("--line", type=int, default=15_000, help="bytes of the line each client sends itself")
    parser.add_argument("--users", type=int, default=500, help="load users on our server")
    parser.add_argument("--broadcasts", type=int, default=15, help="broadcasts of 1000 characters, sent at once")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--settle", type=float, default=2.0, help="seconds before each RSS reading")
    parser.add_argument("--serve", nargs=2, metavar=("PORT", "LAYER"), help=argparse.SUPPRESS)
    parser.add_argument("--drive", nargs=3, metavar=("PORT", "PID", "PHASE"), help=argparse.SUPPRESS)
    parser.add_argument("--broadcast-to", nargs=3, metavar=("PORT", "PID", "TOKENS"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv[1:])
    if not 0 < args.line <= 16_000:
        parser.error("--line must be 1 to 16000 bytes: the relay's longest line is 16 KiB")
    if args.users < 2 or args.broadcasts < 1:
        parser.error("--users must be at least 2 and --broadcasts at least 1")
    if args.serve:
        serve(int(args.serve[0]), args.serve[1])
        return
    if args.broadcast_to:
        port, pid, tokens = args.broadcast_to
        print(json.dumps(broadcast(int(port), int(pid), tokens, args.users, args.broadcasts, args.settle)),
              flush=True)
        return
    if args.drive:
        port, pid, phase = args.drive
        print(json.dumps(drive(int(port), int(pid), phase, args.connections, args.burst, args.line, args.settle)),
              flush=True)
        return
    workdir = Path(tempfile.mkdtemp(prefix="p2pchat-bio-memory-"))
    try:
        run_rounds(args, workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def broadcast(port: int, pid: int, tokens: str, users: int, broadcasts: int, settle: float) -> dict:
    """Log USERS load users in to our server, broadcast and read its RSS; runs its own reactor once."""
    from twisted.internet import defer

    from bench.loadgen import Load, bounded

    result: dict = {}

    async def main() -> None:
        load = Load("ours", port, tokens)
        links = await bounded(defer.ensureDeferred(load.connect_all(load.users(users))), 120)
        heard, expected, done = [0], (len(links) - 1) * broadcasts, defer.Deferred()

        def on_broadcast(link, sender, text) -> None:
            heard[0] += 1
            if heard[0] == expected:
                done.callback(None)

        async def work() -> None:
            load.on_broadcast = on_broadcast
            for _ in range(broadcasts):
                links[0].send_broadcast("x" * 1000)
            links[0].flush()
            await bounded(done, 60)

        result.update(await measure(pid, len(links), settle, work), users=len(links))
        await load.close_all()

    return run_once(main, result)


def run_server(args: argparse.Namespace, procs: Processes, workdir: Path) -> None:
    from bench.run import Bench

    bench = Bench(argparse.Namespace(quick=True, idle_connections=0, client_writes="coalesced"), procs, workdir)
    bench.prepare(args.users)
    server = bench.start_ours()
    try:
        r = child("our server", "--broadcast-to", str(server.port), str(server.pid), str(bench.tokens),
                  "--users", str(args.users), "--broadcasts", str(args.broadcasts), "--settle", str(args.settle))
    finally:
        server.stop()
    print(f"our server  broadcasts +{r['growth_kib']:5.1f} KiB per connection ({r['users']} users,"
          f" {args.broadcasts} broadcasts of 1000 characters; RSS with the users online"
          f" {r['connected_rss_kib'] / 1024:.1f} MiB); server CPU {r['cpu_s']:.2f} s", flush=True)


def run_rounds(args: argparse.Namespace, workdir: Path) -> None:
    with Processes() as procs:
        for round_ in range(args.rounds):
            for layer in ("twisted", "ours"):
                # A relay of its own for each phase: what one phase freed, the other could reuse.
                r = {phase: run_phase(args, procs, workdir, layer, phase) for phase in ("reads", "writes")}
                reads, writes = r["reads"], r["writes"]
                print(f"round {round_ + 1}  {layer:8s} reads +{reads['growth_kib']:6.1f} KiB, writes"
                      f" +{writes['growth_kib']:5.1f} KiB per connection (RSS with the clients connected"
                      f" {reads['connected_rss_kib'] / 1024:.1f} MiB); server CPU {reads['cpu_s']:.2f} s for the"
                      f" reads, {writes['cpu_s']:.2f} s for the writes", flush=True)
        run_server(args, procs, workdir)


def run_phase(args: argparse.Namespace, procs: Processes, workdir: Path, layer: str, phase: str) -> dict:
    port = free_port()
    server = procs.start([sys.executable, "-m", "bench.bio_memory", "--serve", str(port), layer],
                         workdir / f"{layer}.log", cwd=workdir, env=child_env())
    wait_for_port(port, server, 30)
    try:
        return child(f"{layer}, {phase}", "--drive", str(port), str(server.pid), phase,
                     "--connections", str(args.connections), "--burst", str(args.burst), "--line", str(args.line),
                     "--settle", str(args.settle))
    finally:
        procs.stop(server)


if __name__ == "__main__":
    main(sys.argv)

"""What one burst from each client leaves in a TLS server's memory: OpenSSL handed each socket read
whole (Twisted's TLS as it comes) against 2048 bytes at a time (our server's L{ChunkedReadTLS}).

    python -m bench.read_chunks [--connections 500] [--burst 60000] [--rounds 2]

Each round starts a bare TLS line relay (L{bench.relay}'s protocol) once with each TLS layer, in
turn. CONNECTIONS clients log in; each then sends one burst of BURST bytes of lines addressed to
nobody, each answered with a short C{?nobody} line, and waits for all the answers. The relay's RSS
is read SETTLE seconds (2) before the bursts and as long after the last answer. A memory BIO keeps
a buffer as large as the most it ever held until its connection closes, and Twisted reads up to
64 KiB at once.
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
    from p2pchat.discovery.protocol import ChunkedReadTLS

    listen(port, {"whole": TLSMemoryBIOProtocol, "chunked": ChunkedReadTLS}[layer])
    reactor.run()


def drive(port: int, pid: int, connections: int, burst: int, settle: float) -> dict:
    """Connect, burst and read the server's RSS and CPU; runs its own reactor once."""
    from twisted.internet import defer, reactor
    from twisted.internet.endpoints import SSL4ClientEndpoint
    from twisted.internet.protocol import Factory
    from twisted.internet.ssl import CertificateOptions
    from twisted.protocols.basic import LineOnlyReceiver
    from twisted.python.failure import Failure

    from bench.loadgen import bounded, sleep

    class Client(LineOnlyReceiver):
        delimiter = b"\n"

        def connectionMade(self) -> None:
            self.answers, self.expected, self.done = 0, 1, defer.Deferred()
            self.sendLine(b"u%d" % id(self))

        def lineReceived(self, line: bytes) -> None:
            self.answers += 1
            if self.answers == self.expected:
                self.done.callback(None)

        def burst(self, lines: int) -> defer.Deferred:
            self.answers, self.expected, self.done = 0, lines, defer.Deferred()
            self.transport.write(LINE * lines)
            return self.done

    result: dict = {}

    async def main() -> None:
        endpoint = SSL4ClientEndpoint(reactor, "127.0.0.1", port, CertificateOptions(verify=False))
        clients = [await bounded(endpoint.connect(Factory.forProtocol(Client)), 10) for _ in range(connections)]
        for client in clients:
            await bounded(client.done, 10)  # logged in
        await sleep(settle)
        before = proc_stats(pid)
        for client in clients:
            await bounded(client.burst(burst // len(LINE)), 10)
        after_cpu = proc_stats(pid).cpu_s
        await sleep(settle)
        after = proc_stats(pid)
        result.update(
            growth_per_conn_kib=(after.rss_kib - before.rss_kib) / connections,
            burst_cpu_s=after_cpu - before.cpu_s,
            rss_before_kib=before.rss_kib,
            rss_after_kib=after.rss_kib,
        )
        for client in clients:
            client.transport.abortConnection()

    def stop(outcome):
        if isinstance(outcome, Failure):
            result["error"] = outcome.getErrorMessage()
        reactor.stop()

    defer.ensureDeferred(main()).addBoth(stop)
    reactor.run()
    return result


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.read_chunks", description=__doc__.split("\n\n")[0])
    parser.add_argument("--connections", type=int, default=500)
    parser.add_argument("--burst", type=int, default=60_000, help="bytes each client sends at once")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--settle", type=float, default=2.0, help="seconds before each RSS reading")
    parser.add_argument("--serve", nargs=2, metavar=("PORT", "LAYER"), help=argparse.SUPPRESS)
    parser.add_argument("--drive", nargs=2, metavar=("PORT", "PID"), type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv[1:])
    if args.serve:
        serve(int(args.serve[0]), args.serve[1])
        return
    if args.drive:
        print(json.dumps(drive(*args.drive, args.connections, args.burst, args.settle)), flush=True)
        return
    workdir = Path(tempfile.mkdtemp(prefix="p2pchat-read-chunks-"))
    try:
        run_rounds(args, workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def run_rounds(args: argparse.Namespace, workdir: Path) -> None:
    with Processes() as procs:
        for round_ in range(args.rounds):
            for layer in ("whole", "chunked"):
                port = free_port()
                server = procs.start([sys.executable, "-m", "bench.read_chunks", "--serve", str(port), layer],
                                     workdir / f"{layer}.log", cwd=workdir, env=child_env())
                wait_for_port(port, server, 30)
                # The clients in a process of their own: a reactor runs once per process.
                out = subprocess.run(
                    [sys.executable, "-m", "bench.read_chunks", "--drive", str(port), str(server.pid),
                     "--connections", str(args.connections), "--burst", str(args.burst), "--settle", str(args.settle)],
                    capture_output=True, text=True, env=child_env(), timeout=300, check=False,
                )
                procs.stop(server)
                r = json.loads(out.stdout.strip().splitlines()[-1]) if out.stdout.strip() else {"error": out.stderr[-500:]}
                if "error" in r:
                    raise SystemExit(f"round {round_ + 1}, {layer}: {r['error']}")
                print(f"round {round_ + 1}  {layer:8s} +{r['growth_per_conn_kib']:6.1f} KiB per connection after"
                      f" the bursts (RSS {r['rss_before_kib'] / 1024:.1f} -> {r['rss_after_kib'] / 1024:.1f} MiB),"
                      f" server CPU for the bursts {r['burst_cpu_s']:.2f} s", flush=True)


if __name__ == "__main__":
    main(sys.argv)

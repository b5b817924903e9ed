"""The floor under a server on Twisted's TLS: a bare line relay with the discovery server's TLS options.

bench.run starts it as C{python -m bench.relay PORT} (0: any free port; it prints the one it got) for
the C{*_floor} scenarios; it keeps its certificate in C{relay-identity} under its working directory.
What Twisted, pyOpenSSL and OpenSSL cost per connection and per line, this costs too; whatever our
server costs above it is our own code. With C{--stack stdlib} its TLS goes through Python's own
C{ssl} module (L{bench.stdlib_tls}) instead of Twisted's layer on pyOpenSSL.

Its protocol, one line each: the first line names the user and is answered C{ok}; C{@NAME TEXT}
goes to NAME's connection as C{<SENDER TEXT} (or back as C{?NAME} when NAME is not connected);
any other line comes back as it is (keep-alives). No parsing beyond that, no checks, no acks.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys

from twisted.internet.protocol import Factory
from twisted.protocols.basic import LineOnlyReceiver
from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol

from bench.stdlib_tls import StdlibTLSFactory, server_context
from p2pchat.crypto import load_or_create_identity
from p2pchat.tls import server_certificate_options


class Relay(LineOnlyReceiver):
    delimiter = b"\n"
    name: bytes | None = None

    def connectionMade(self) -> None:
        self.transport.setTcpNoDelay(True)

    def lineReceived(self, line: bytes) -> None:
        users = self.factory.users
        if self.name is None:
            self.name = line
            users[line] = self
            self.sendLine(b"ok")
        elif line.startswith(b"@"):
            to, _, text = line[1:].partition(b" ")
            target = users.get(to)
            if target is None:
                self.sendLine(b"?" + to)
            else:
                target.sendLine(b"<" + self.name + b" " + text)
        else:
            self.sendLine(line)

    def connectionLost(self, reason=None) -> None:
        if self.factory.users.get(self.name) is self:
            del self.factory.users[self.name]


class RelayFactory(Factory):
    protocol = Relay

    def __init__(self) -> None:
        self.users: dict[bytes, Relay] = {}


def listen(port: int, tls_protocol: type[TLSMemoryBIOProtocol] | None = None, stack: str = "pyopenssl"):
    """Listen on 127.0.0.1:C{port} (0: any free one) with C{tls_protocol} as the TLS layer
    (Twisted's default when None), or with Python's C{ssl} module when C{stack} is C{stdlib};
    the listening port."""
    from twisted.internet import reactor

    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    directory, basename = "relay-identity", "relay"
    identity = load_or_create_identity(directory, basename, "p2pchat bench relay")
    if stack == "stdlib":
        # The files load_or_create_identity keeps: Python's ssl loads a certificate from files only.
        path = os.path.join(directory, basename)
        factory = StdlibTLSFactory(server_context(path + ".crt", path + ".key"), RelayFactory())
    else:
        factory = TLSMemoryBIOFactory(server_certificate_options(identity), False, RelayFactory())
        if tls_protocol is not None:
            factory.protocol = tls_protocol
    return reactor.listenTCP(port, factory, interface="127.0.0.1")


def main(argv: list[str]) -> None:
    from twisted.internet import reactor

    parser = argparse.ArgumentParser(prog="python -m bench.relay", description="A bare TLS line relay.")
    parser.add_argument("port", type=int, help="0: any free port")
    parser.add_argument("--stack", choices=("pyopenssl", "stdlib"), default="pyopenssl",
                        help="TLS through Twisted's layer on pyOpenSSL, or through Python's ssl module")
    args = parser.parse_args(argv[1:])
    port = listen(args.port, stack=args.stack)
    print(f"relay listening on 127.0.0.1:{port.getHost().port}", flush=True)
    reactor.run()


if __name__ == "__main__":
    main(sys.argv)

"""`twistd p2pdiscovery`: command-line options and the service that runs the discovery server."""

from __future__ import annotations

import gc
import os
import resource

from twisted.application.service import MultiService, Service
from twisted.internet import endpoints
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.error import CannotListenError
from twisted.logger import Logger
from twisted.python import usage

from p2pchat import data_home, exit_status_at_exit, pid_file_in
from p2pchat.crypto import CryptoError, cert_fingerprint, format_fingerprint, load_or_create_identity
from p2pchat.discovery.directory import Directory, Limits
from p2pchat.discovery.dispatch import dispatch_directly
from p2pchat.discovery.passwords import PasswordHasher
from p2pchat.discovery.protocol import DiscoveryFactory, DiscoveryTLSFactory, Outbox, serve_promptly
from p2pchat.discovery.store.base import StoreError
from p2pchat.discovery.store.sqlite import SQLiteStore
from p2pchat.tls import server_certificate_options

log = Logger()

MAX_HOLD = 10.0  # seconds; peers give up on an unanswered request after 30
GC_THRESHOLDS = (20_000, 20, 20)  # CPython's defaults are (700, 10, 10)


def quiet_collector() -> None:
    """
    What the process made so far (modules, the snapshot) lives as long as it does: out of the
    cyclic collector's sight, so its full collections scan only what connections made, and run
    less often (each is a pause of every connection, tens of ms with thousands online).
    """
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


def default_data_dir() -> str:
    return os.path.join(data_home(), "discovery")


def _number(kind, minimum, name):
    def coerce(value: str):
        try:
            number = kind(value)
        except ValueError:
            raise ValueError(f"--{name} takes a number, not {value!r}") from None
        if number < minimum or number != number:
            raise ValueError(f"--{name} must be at least {minimum}")
        return number

    coerce.coerceDoc = ""
    return coerce


class Options(usage.Options):
    synopsis = "[options]"
    longdesc = (
        "Run the p2pchat discovery server: accounts, presence, blocks, relay and a durable mailbox, "
        "over TLS with a self-signed certificate made on first start."
    )
    optFlags = [
        ["no-registration", None, "Close open registration: only accounts that exist (or come from --credentials) log in."],
        ["insecure-plaintext", None, "Serve plaintext TCP instead of TLS (debugging only: passwords travel in clear)."],
    ]
    optParameters = [
        ["port", "p", "5000", "A port number, or a Twisted server endpoint description (e.g. tcp:5000:interface=127.0.0.1; "
         "an ssl: description brings its own certificate, e.g. one from a CA)."],
        ["data-dir", "d", None, "Where the database, key and certificate live. [default: $XDG_DATA_HOME/p2pchat/discovery]"],
        ["credentials", "c", None, "A file of 'username password' lines to import as accounts (hashed; the file is not the store)."],
        ["block-duration", None, 60.0, "Seconds an account stays blocked after 3 failed logins.", _number(float, 0, "block-duration")],
        ["timeout", None, 0.0, "Log out a user who sends no command for this many seconds; 0 = never.", _number(float, 0, "timeout")],
        ["keepalive-timeout", None, 45.0, "Drop a connection silent for this many seconds (clients ping every third of it).", _number(float, 3, "keepalive-timeout")],
        ["mailbox-limit", None, 10000, "Envelopes stored for one user at most.", _number(int, 1, "mailbox-limit")],
        ["message-rate", None, 50.0, "Messages (send, broadcast), lists of users (who, whosince) and blocks per second per user, told to peers, which pace themselves by it; 0 = no limit.", _number(float, 0, "message-rate")],
        ["message-burst", None, 200, "Messages a user may send at once before --message-rate applies.", _number(int, 1, "message-burst")],
        ["login-rate", None, 30.0, "Password attempts (login, register) per minute per address (IPv6: per /64); 0 = no limit.", _number(float, 0, "login-rate")],
        ["max-connections-per-address", None, 1000, "Connections at once from one address (IPv6: one /64; a class behind one router needs one per user); past it new ones are told so and closed; 0 = no limit.", _number(int, 0, "max-connections-per-address")],
        ["max-line", None, 65536, "Longest request line in bytes.", _number(int, 1024, "max-line")],
        ["max-queued-bytes", None, 1 << 20, "Bytes queued for a client that does not read before it is cut off.", _number(int, 65536, "max-queued-bytes")],
        ["presence-batch", None, 0.05, "Seconds presence changes are gathered before they go out together; one flush to everyone follows another after at least 0.3 ms per user online; 0 = at once.", _number(float, 0, "presence-batch")],
        ["hold", None, 1.0, "Seconds an envelope for an online user waits in memory for their ack before it is stored (at most 10); 0 = store every envelope first.", _number(float, 0, "hold")],
        ["hash-threads", None, 1, "Threads that hash passwords.", _number(int, 1, "hash-threads")],
        ["sync", None, "normal", "SQLite durability: 'normal' survives a killed server, 'full' also a power cut."],
    ]

    def postOptions(self) -> None:
        if self["sync"] not in ("normal", "full"):
            raise usage.UsageError("--sync is 'normal' or 'full'")
        if self["hold"] > MAX_HOLD:
            raise usage.UsageError(f"--hold must be at most {MAX_HOLD:g}: the sender waits that long for its answer")
        if self["data-dir"] is None:
            self["data-dir"] = default_data_dir()
        try:
            # Two servers on one data directory would each keep their own idea of it in memory.
            pid_file_in(self, self["data-dir"], "p2pdiscovery.pid", f"a discovery server is running already on {self['data-dir']}")
        except OSError as e:
            raise usage.UsageError(f"--data-dir: {e}") from None
        if self["credentials"] is not None and not os.path.isfile(self["credentials"]):
            raise usage.UsageError(f"--credentials: no such file: {self['credentials']}")
        port = self["port"]
        if port.isdigit():
            if not 0 <= int(port) <= 65535:
                raise usage.UsageError("--port must be between 0 and 65535")
            # A restarted server meets every user's reconnect at once: a short backlog would turn
            # that into SYN retries of a second and more.
            self["port"] = f"tcp:{port}:backlog=1024"

    def limits(self) -> Limits:
        return Limits(
            block_duration=self["block-duration"], idle_timeout=self["timeout"],
            keepalive_timeout=self["keepalive-timeout"], mailbox_limit=self["mailbox-limit"],
            open_registration=not self["no-registration"], message_rate=self["message-rate"],
            message_burst=self["message-burst"], login_rate=self["login-rate"],
            max_connections_per_address=self["max-connections-per-address"], max_line=self["max-line"],
            max_queued_bytes=self["max-queued-bytes"], presence_batch=self["presence-batch"],
            hold=self["hold"],
        )


def raise_open_file_limit() -> tuple[int, int]:
    """
    Raise the soft limit on open files to the hard one, since each connection is an open file: the
    usual soft limit (1024) would turn users away at about a thousand, where the hard one (set by
    the system, or C{LimitNOFILE=} in a systemd unit) is usually far higher.

    @return: the soft limit before and after.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft == hard:
        return soft, soft  # no number to raise it to (where the hard one is infinite), or nothing to do
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ValueError, OSError):
        return soft, soft
    return soft, hard


class DiscoveryService(Service):
    """Opens the store, imports credentials, then listens; undoes it all in reverse on stop."""

    def __init__(self, config: Options, reactor, outbox: Outbox | None = None) -> None:
        self.config = config
        self.reactor = reactor
        self.outbox = outbox
        self.store = None
        self.hasher = None
        self.directory = None
        self.listening = None
        self._started: Deferred | None = None

    def startService(self) -> None:
        super().startService()
        self._started = Deferred.fromCoroutine(self._start())
        self._started.addErrback(self._failed)

    def _failed(self, failure) -> None:
        if failure.check(CancelledError):
            return  # stopped while starting
        if failure.check(CryptoError, OSError, StoreError, usage.UsageError, CannotListenError):
            log.critical("p2pdiscovery cannot start: {why}", why=str(failure.value))
        else:
            log.failure("p2pdiscovery cannot start", failure)
        exit_status_at_exit(1)  # for systemd and scripts: the server is not running
        # A failure before the first await (the data directory) comes before the reactor runs.
        self.reactor.callWhenRunning(self.reactor.stop)

    async def _start(self) -> None:
        config = self.config
        data_dir = config["data-dir"]
        os.makedirs(data_dir, mode=0o700, exist_ok=True)
        own_certificate = config["port"].startswith("ssl:")
        identity = None  # ours to serve: not with an ssl: port (it names its own), not in plaintext
        if not own_certificate and not config["insecure-plaintext"]:
            identity = load_or_create_identity(data_dir, "server", "p2pchat discovery server")
            os.chmod(os.path.join(data_dir, "server.key"), 0o600)  # restored from a copy made readable to all
            fingerprint = cert_fingerprint(identity.certificate)
            log.info("certificate fingerprint sha256:{fp}", fp=fingerprint)
            log.info("(for people: {fp})", fp=format_fingerprint(fingerprint))

        before, limit = raise_open_file_limit()
        log.info("open files: up to {limit}{raised}, so about as many connections at once", limit=limit,
                 raised=f" (raised from {before})" if limit != before else "")

        database = os.path.join(data_dir, "discovery.sqlite3")
        # Password hashes live there: owner-only, like the key (SQLite gives -wal and -shm the same mode).
        os.close(os.open(database, os.O_CREAT | os.O_WRONLY, 0o600))
        os.chmod(database, 0o600)
        self.store = SQLiteStore(database, self.reactor, synchronous=config["sync"])
        snapshot = await self.store.start(self.reactor.seconds())
        self.hasher = PasswordHasher(self.reactor, threads=config["hash-threads"])
        self.hasher.start()
        self.directory = Directory(self.store, self.reactor, config.limits(), self.hasher)
        self.directory.load(snapshot)
        if config["credentials"]:
            with open(config["credentials"], encoding="utf-8", errors="surrogateescape") as f:
                lines = f.read().splitlines()
            imported, existing, skipped = await self.directory.import_credentials(lines)
            log.info("credentials: {imported} accounts imported, {existing} there already (left as they are),"
                     " {skipped} lines skipped", imported=imported, existing=existing, skipped=skipped)

        factory = DiscoveryFactory(self.directory, self.reactor, self.outbox)
        if identity is not None:
            factory = DiscoveryTLSFactory(server_certificate_options(identity), False, factory)
        elif own_certificate:
            log.info("TLS with the certificate named in --port; peers pin or check that one")
        else:
            log.warn("serving PLAINTEXT: passwords and tokens travel in clear")
        quiet_collector()
        try:
            endpoint = endpoints.serverFromString(self.reactor, config["port"])
            self.listening = await endpoint.listen(factory)
        except (CannotListenError, OSError):
            raise
        except Exception as e:  # noqa: BLE001 - a description Twisted cannot use (unknown type, port out of range...)
            raise usage.UsageError(f"--port {config['port']!r}: {e}") from None
        serve_promptly(self.listening)
        address = self.listening.getHost()
        log.info("p2pdiscovery listening on {host}:{port}", host=address.host, port=address.port)

    async def _stop(self) -> None:
        if self._started is not None and not self._started.called:
            self._started.cancel()
        if self.listening is not None:
            await self.listening.stopListening()
        if self.directory is not None:
            self.directory.shutdown()
        if self.store is not None:
            await self.store.stop()
        if self.hasher is not None:
            self.hasher.stop()

    def stopService(self):
        super().stopService()
        return Deferred.fromCoroutine(self._stop())


def makeService(config: Options, reactor=None) -> MultiService:
    if reactor is None:
        from twisted.internet import reactor
    # The reactor tells the connections' outbox where each pass over socket events ends.
    outbox = Outbox(reactor)
    dispatch_directly(reactor, outbox)
    top = MultiService()
    DiscoveryService(config, reactor, outbox).setServiceParent(top)
    return top

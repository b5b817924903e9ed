"""C{twistd -n p2ppeer --user alice}: the options, and the service that wires the console,
messenger, direct links, server link and history together."""

from __future__ import annotations

import os
import signal
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, succeed
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.stdio import StandardIO
from twisted.logger import ILogObserver, Logger, textFileLogObserver
from twisted.python.logfile import LogFile
from twisted.python import usage

from .. import data_home, exit_status_at_exit, pid_file_in
from ..crypto import CryptoError, load_or_create_envelope_key, load_or_create_identity, valid_fingerprint
from ..tls import ServerTrust
from .console import Console, cbreak
from .history import History, ThreadRunner
from .links import Links
from .messenger import Messenger, PasswordSource, valid_username
from .server_link import KnownServers, ServerLink, UnusablePins

log = Logger()

LOG_FILE_BYTES = 1_000_000  # peer.log is rotated at this size
LOG_FILES_KEPT = 5  # rotated logs kept (peer.log.1 to .5), the oldest deleted


def default_data_dir(user: str) -> str:
    return os.path.join(data_home(), "peer", user)


def parse_server(value: str) -> tuple[str, int]:
    """C{host:port} or C{[v6 address]:port}."""
    host, sep, port = value.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise usage.UsageError(f"--server must be HOST:PORT, not {value!r}")
    return host, int(port)


class Options(usage.Options):
    synopsis = "--user NAME [options]"
    longdesc = (
        "A p2pchat peer: logs in to the discovery server, talks to other peers over direct "
        "mutually authenticated TLS links, and keeps its history in its data directory."
    )
    optParameters = [
        ["user", "u", None, "Your username (required)."],
        ["server", "s", "localhost:5000", "The discovery server, HOST:PORT."],
        ["port", "p", 0, "Port for direct links from other peers (0: any free port).", int],
        ["interface", None, "", "Address to accept direct links on (default: all)."],
        ["data-dir", "d", None, "Keys, history and pins (default: $XDG_DATA_HOME/p2pchat/peer/USER)."],
        ["password-file", None, None, "Read the password from this file instead of prompting."],
        ["server-fingerprint", None, None, "Trust only the server certificate with this SHA-256 (sha256:HEX)."],
        ["server-ca", None, None, "Trust the server through this CA (PEM file); the hostname is checked."],
    ]

    def postOptions(self) -> None:
        parent = getattr(self, "parent", None)
        if parent is not None and not parent.get("nodaemon", True):
            # In the background it would have no input: it would log in, read the end of its
            # input and log out at once, leaving nothing running.
            raise SystemExit("the peer is a console program: start it in the foreground, twistd -n p2ppeer ...")
        user = self["user"]
        if user is None:
            raise usage.UsageError("--user is required")
        if not valid_username(user):
            raise usage.UsageError(
                "--user: 1 to 32 characters from A-Z a-z 0-9 _ . -, starting with a letter or digit"
            )
        self["host"], self["server_port"] = parse_server(self["server"])
        self["server_name"] = f"{self['host']}:{self['server_port']}"
        if not 0 <= self["port"] < 65536:
            raise usage.UsageError("--port must be between 0 and 65535")
        self._check_trust()
        data_dir = os.path.abspath(self["data-dir"] or default_data_dir(user))
        self["data-dir"] = data_dir
        try:
            os.makedirs(data_dir, mode=0o700, exist_ok=True)
            os.chmod(data_dir, 0o700)
        except OSError as e:
            raise usage.UsageError(f"--data-dir {data_dir}: {e.strerror}") from None
        try:
            self["identity"] = load_or_create_identity(data_dir, "identity", user)
            self["envelope_key"] = load_or_create_envelope_key(os.path.join(data_dir, "envelope.key"))
        except (OSError, CryptoError) as e:
            raise usage.UsageError(str(e)) from None
        owner = self["identity"].name
        if owner != user:
            # Its history, outbox and pins are that user's too: used as another's, they would mix.
            raise usage.UsageError(
                f"{data_dir} holds the keys and history of {owner}, not {user}: start the peer with"
                f" --user {owner}, or give {user} a data directory of their own (--data-dir; the"
                " default is one per user)"
            )
        self["known_servers"] = known = os.path.join(data_dir, "known_servers")
        self["pinned"] = self["server-fingerprint"]
        if self["pinned"] is None and "ca_pem" not in self:
            try:
                self["pinned"] = KnownServers(known).get(self["server_name"])
            except UnusablePins as e:
                raise usage.UsageError(str(e)) from None
        password_file = self["password-file"]
        if password_file is not None:
            try:
                with open(password_file, encoding="utf-8") as f:
                    f.readline()
            except OSError as e:
                raise usage.UsageError(f"cannot read the password file {password_file}: {e.strerror}") from None
            except UnicodeDecodeError:
                raise usage.UsageError(f"the password file {password_file} is not UTF-8 text") from None
        self._adjust_twistd(data_dir)

    def _check_trust(self) -> None:
        pinned = self["server-fingerprint"]
        if pinned is not None:
            pinned = pinned.lower().removeprefix("sha256:").replace(":", "").replace(" ", "")
            if not valid_fingerprint(pinned):
                raise usage.UsageError("--server-fingerprint must be sha256: and 64 hex digits")
            self["server-fingerprint"] = pinned
        if self["server-ca"] is not None:
            if pinned is not None:
                raise usage.UsageError("give --server-fingerprint or --server-ca, not both")
            try:
                with open(self["server-ca"], "rb") as f:
                    self["ca_pem"] = f.read()
                ServerTrust(self["host"], ca_pem=self["ca_pem"])  # the file is usable: PEM certificates
            except OSError as e:
                raise usage.UsageError(f"cannot read {self['server-ca']}: {e.strerror}") from None
            except CryptoError as e:
                raise usage.UsageError(f"--server-ca {self['server-ca']}: {e}") from None

    def _adjust_twistd(self, data_dir: str) -> None:
        # twistd's defaults would make two peers started from one directory fight over
        # ./twistd.pid and print log lines into the chat.
        running = f"{self['user']} is running already from {data_dir}: one user runs one peer at a time"
        pid_file_in(self, data_dir, "p2ppeer.pid", running)
        parent = getattr(self, "parent", None)
        if parent is not None and "logfile" in parent and parent["logfile"] is None:
            parent["logfile"] = _log_file["path"] = os.path.join(data_dir, "peer.log")
            if parent.get("logger") is None:
                parent["logger"] = f"{__name__}.peer_log"  # twistd imports it by name


# Where peer_log writes: twistd calls a --logger factory without arguments.
_log_file: dict[str, str] = {}


def peer_log() -> ILogObserver:
    """
    The peer's log file, rotated at LOG_FILE_BYTES with the newest LOG_FILES_KEPT of the old ones
    kept: twistd's own rotation keeps every one, and a peer runs for months.
    """
    return textFileLogObserver(
        LogFile.fromFullPath(_log_file["path"], rotateLength=LOG_FILE_BYTES, maxRotatedFiles=LOG_FILES_KEPT)
    )


def file_passwords(path: str) -> PasswordSource:
    """The password in the first line of C{path}; a refused one is final (there is no other)."""

    def password(retry: bool) -> Deferred[str | None]:
        if retry:
            return succeed(None)
        with open(path, encoding="utf-8") as f:
            return succeed(f.readline().rstrip("\r\n"))

    return password


class PeerService(Service):
    """The running peer; stops the reactor when the messenger finishes (logout, failed login)."""

    def __init__(self, config: Options, reactor: Any = None) -> None:
        if reactor is None:
            from twisted.internet import reactor
        self._config = config
        self._reactor = reactor
        self._restore_terminal: Any = None  # set once the terminal is in character mode

    def startService(self) -> None:
        super().startService()
        config, reactor = self._config, self._reactor
        data_dir, user = config["data-dir"], config["user"]
        terminal = os.isatty(0)
        self.console = console = Console(user, terminal)
        StandardIO(console, reactor=reactor)
        self._runner = ThreadRunner(reactor)
        self._history = History(os.path.join(data_dir, "history.sqlite3"), self._runner)
        server_name = config["server_name"]
        known_path = config["known_servers"]
        known = KnownServers(known_path)

        def first_use(fingerprint: str) -> None:
            known.pin(server_name, fingerprint)
            self.messenger.server_pinned(fingerprint)

        trust = ServerTrust(
            config["host"],
            pinned=config["pinned"],
            ca_pem=config.get("ca_pem"),
            on_first_use=first_use,
            remedy="start the peer with --server-fingerprint set to the new one."
            if config["server-fingerprint"]
            else f"delete the line for {server_name} in {known_path} and start the peer again.",
        )
        endpoint = wrapClientTLS(trust.creator(), HostnameEndpoint(reactor, config["host"], config["server_port"]))
        if config["password-file"]:
            passwords, confirm = file_passwords(config["password-file"]), None
        else:
            passwords, confirm = console.password, console.confirm_password if terminal else None
        self.messenger = messenger = Messenger(
            user, config["identity"], config["envelope_key"], self._history, reactor, console, passwords, server_name,
            confirm,
        )
        links = Links(reactor, config["identity"], user, messenger, config["interface"], config["port"])
        messenger.attach(ServerLink(endpoint, reactor, messenger), links)
        console.attach(messenger)
        # Last, so that nothing above can fail with the terminal left without echo, or with a
        # thread that keeps the process from exiting.
        self._restore_terminal = cbreak(0, 1) if terminal else None
        if terminal:
            signal.signal(signal.SIGCONT, lambda *_: reactor.callFromThread(self._continued))
            # A resized terminal: the prompt line is drawn again to fit the new width at once.
            signal.signal(signal.SIGWINCH, lambda *_: reactor.callFromThread(console.redraw))
        self._runner.start()
        Deferred.fromCoroutine(self._run())

    def _continued(self) -> None:
        # Stopped (ctrl-Z) and continued (fg): the shell had the terminal meanwhile, and may have
        # left it in line mode with echo; and the prompt line is gone from the screen.
        if self.running:
            cbreak(0, 1)
            self.console.redraw()

    async def _run(self) -> None:
        status = 1
        try:
            await self._history.open()
            finished = self.messenger.when_finished()
            ready = self.messenger.when_ready()
            await Deferred.fromCoroutine(self.messenger.run())
            await ready
            if not finished.called:
                self.console.start_commands().addErrback(lambda f: log.failure("console", f))
            status = await finished
        except Exception as e:
            log.failure("the peer failed")
            self.console.show("internal_error", message=str(e))
        finally:
            if status:
                exit_status_at_exit(status)
            if self._reactor.running:
                self._reactor.stop()

    def stopService(self) -> Deferred[None]:
        super().stopService()
        return Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        try:
            await self.messenger.stop()
            await self._history.close()
        finally:
            self._runner.stop()
            self.console.close()
            if self._restore_terminal is not None:
                signal.signal(signal.SIGCONT, signal.SIG_DFL)
                signal.signal(signal.SIGWINCH, signal.SIG_DFL)
                self._restore_terminal()


def makeService(config: Options) -> Service:
    return PeerService(config)

"""The servers under test as processes: ours (twistd p2pdiscovery), the baseline (ngircd), and bench.relay."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from bench import ircd
from bench.procs import Processes, ProcStats, free_port, proc_stats, wait_for_port

REPO = Path(__file__).resolve().parent.parent

TWISTD = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]


def child_env() -> dict[str, str]:
    """Our environment, with this checkout first on the path (the bench runs from a checkout)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


class Server:
    """
    One server process on a fixed loopback port (a port picked once, so that a restart comes
    back where clients expect it).
    """

    def __init__(self, procs: Processes, argv: list[str], port: int, log_path: Path, cwd: Path) -> None:
        self._procs = procs
        self._argv = argv
        self.port = port
        self._log_path = log_path
        self._cwd = cwd
        self._proc = None

    @property
    def pid(self) -> int:
        return self._proc.pid

    def start(self, timeout: float = 60.0) -> dict[str, float]:
        """Start and wait until the port accepts connections; return the monotonic times of both."""
        spawned_at = time.monotonic()
        self._proc = self._procs.start(
            self._argv, self._log_path, cwd=self._cwd, env=child_env()
        )
        wait_for_port(self.port, self._proc, timeout)
        return {"spawned_at": spawned_at, "ready_at": time.monotonic()}

    def stop(self) -> int:
        return self._procs.stop(self._proc, timeout=30.0)

    def restart(self) -> dict[str, float]:
        self.stop()
        return self.start()

    def stats(self) -> ProcStats:
        return proc_stats(self._proc.pid)


def discovery_server(procs: Processes, workdir: Path, data_dir: Path, name: str, *extra: str) -> Server:
    """Our server with the limits that would refuse a benchmark's load switched off or raised."""
    port = free_port()
    argv = [
        *TWISTD, "-n", "--pidfile=", "p2pdiscovery",
        "--port", f"tcp:{port}:interface=127.0.0.1",
        "--data-dir", str(data_dir),
        "--mailbox-limit", "1000000",
        "--message-rate", "0",
        "--login-rate", "0",
        "--max-connections-per-address", "0",  # every load user comes from 127.0.0.1 (ngircd: MaxConnectionsIP = 0)
        *extra,
    ]
    return Server(procs, argv, port, workdir / f"{name}.log", workdir)


def ngircd_server(procs: Processes, binary: str, workdir: Path, name: str) -> Server:
    directory = workdir / name
    directory.mkdir()
    port = free_port()
    conf = ircd.write_config(directory, port)
    return Server(procs, ircd.ngircd_argv(binary, conf), port, workdir / f"{name}.log", directory)


def relay_server(procs: Processes, workdir: Path, name: str, stack: str = "pyopenssl") -> Server:
    port = free_port()
    argv = [sys.executable, "-m", "bench.relay", str(port), "--stack", stack]
    return Server(procs, argv, port, workdir / f"{name}.log", workdir)

"""Start, watch and stop the processes a benchmark run needs; read their CPU time and RSS from /proc."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class ProcStats:
    """
    CPU time (user + system) in seconds, of all threads and of the main thread alone (for our
    server, the reactor's), and resident set size in KiB.
    """

    cpu_s: float
    rss_kib: int
    main_cpu_s: float


def _cpu_s(stat_path: str) -> float:
    stat = Path(stat_path).read_text()
    # The command name may hold spaces and parentheses: the fields start after the last ')'.
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def _process_cpu_s(pid: int) -> float:
    """
    The CPU time of all of process C{pid}'s threads, living and gone: the time whose utime and
    stime /proc/PID/stat shows in ticks of 10 ms, here to the nanosecond, from the process's
    CPU-time clock (the clock ID that glibc's C{clock_getcpuclockid} makes on Linux). An idle
    server spends a dozen ticks in a minute; a tick either way was a tenth of a ratio.
    """
    try:
        return time.clock_gettime(((~pid) << 3) | 2)
    except OSError:
        return _cpu_s(f"/proc/{pid}/stat")


def _thread_cpu_s(pid: int, tid: int) -> float:
    """The CPU time of one thread, to the nanosecond (the first field of its schedstat)."""
    try:
        return int(Path(f"/proc/{pid}/task/{tid}/schedstat").read_text().split()[0]) / 1e9
    except (OSError, ValueError, IndexError):
        return _cpu_s(f"/proc/{pid}/task/{tid}/stat")


def proc_stats(pid: int) -> ProcStats:
    """CPU time of process C{pid} and of its main thread, and VmRSS from /proc/PID/status."""
    rss = 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1])
            break
    return ProcStats(_process_cpu_s(pid), rss, _thread_cpu_s(pid, pid))


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (for servers that need a fixed port)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, proc: subprocess.Popen, timeout: float) -> None:
    """Wait until something accepts TCP connections on 127.0.0.1:PORT; fail if C{proc} dies first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[0]} exited with status {proc.returncode} before listening")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.02)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {timeout:g} s")


class Processes:
    """
    Every process the benchmark starts, so that all of them stop on any exit path
    (normal end, exception, Ctrl-C).
    """

    def __init__(self) -> None:
        self._running: list[subprocess.Popen] = []

    def start(self, argv: list[str], log_path: Path, **popen_args) -> subprocess.Popen:
        """Start C{argv} with stdout and stderr appended to C{log_path}."""
        with open(log_path, "ab") as log_file:
            proc = subprocess.Popen(
                argv, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True, **popen_args
            )
        self._running.append(proc)
        return proc

    def start_piped(self, argv: list[str], log_path: Path, **popen_args) -> subprocess.Popen:
        """Start C{argv} with line-buffered text pipes on stdin and stdout, stderr to C{log_path}."""
        with open(log_path, "ab") as log_file:
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log_file,
                text=True,
                bufsize=1,
                start_new_session=True,
                **popen_args,
            )
        self._running.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen, timeout: float = 10.0) -> int:
        """SIGTERM, then SIGKILL after C{timeout} seconds; return the exit status."""
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        for stream in (proc.stdin, proc.stdout):
            if stream is not None:
                stream.close()
        if proc in self._running:
            self._running.remove(proc)
        return proc.returncode

    def stop_all(self) -> None:
        for proc in reversed(list(self._running)):
            self.stop(proc, timeout=5.0)

    def __enter__(self) -> Processes:
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop_all()


def driver_mark(name: str, **info) -> dict:
    """
    A blocking driver's side of the mark protocol (see bench.loadgen): report reaching C{name}
    on stdout, then wait for bench.run's answer on stdin.
    """
    print(json.dumps({"mark": name, "t": time.monotonic(), **info}), flush=True)
    return json.loads(sys.stdin.readline() or "{}")

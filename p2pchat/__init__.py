"""p2pchat: a self-hostable secure chat system on Twisted."""

import atexit
import os
import sys


def data_home() -> str:
    """Where p2pchat keeps its data by default: $XDG_DATA_HOME/p2pchat (~/.local/share/p2pchat)."""
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return os.path.join(base, "p2pchat")


def pid_file_in(options, data_dir: str, name: str, running: str) -> None:
    """
    Point twistd's pid file (when left at its default, ./twistd.pid) into C{data_dir}, so that a
    second process on the same data directory is refused wherever it is started from: with
    C{running} (what runs there already) and its process id, rather than twistd's words, which
    tell the user to give another pid file.

    @raise SystemExit: the process whose pid is in that file runs.
    """
    parent = getattr(options, "parent", None)
    if parent is not None and parent.get("pidfile") == "twistd.pid":
        os.makedirs(data_dir, mode=0o700, exist_ok=True)
        parent["pidfile"] = path = os.path.join(data_dir, name)
        pid = _running(path)
        if pid is not None:
            raise SystemExit(f"{running} (process {pid})")


def _running(pid_file: str) -> int | None:
    """The process id in C{pid_file}, if that process runs (twistd removes a stale file itself)."""
    try:
        with open(pid_file) as f:
            pid = int(f.read().strip())
        os.kill(pid, 0)
    except PermissionError:  # someone else's process
        return pid
    except (OSError, ValueError):
        return None
    return pid


def exit_status_at_exit(status: int) -> None:
    """
    Have the process exit with C{status} once twistd is done (pid file removed, logs closed):
    twistd has no way for a plugin to set its exit status, and would exit 0.
    """

    def leave() -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)

    atexit.register(leave)

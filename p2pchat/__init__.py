"""p2pchat: a self-hostable secure chat system on Twisted."""

import os


def data_home() -> str:
    """Where p2pchat keeps its data by default: $XDG_DATA_HOME/p2pchat (~/.local/share/p2pchat)."""
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return os.path.join(base, "p2pchat")

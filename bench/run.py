"""C{python -m bench}: every scenario against our server and its baseline, interleaved A B A B, with
medians, ratios ours/baseline and the issue's targets, written to bench/results/latest.json and .png.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import queue
import resource
import shutil
import signal
import sys
import tempfile
import threading
import time
from functools import partial
from pathlib import Path
from typing import Any, Callable

from bench import ircd, loadgen
from bench.codecs import median_metrics, ratios
from bench.procs import Processes, proc_stats
from bench.servers import (
    REPO,
    Server,
    child_env,
    discovery_server,
    ngircd_server,
    relay_server,
)

RESULTS = Path(__file__).resolve().parent / "results"

# Floor scenario -> the scenario whose load it gives to the bare relay (bench.relay) in place of
# ngircd. Floors run only when named with --scenarios: context for the figures, no target of their own.
# The *_stdlib floors run the relay with its TLS on Python's ssl module (bench.relay --stack stdlib).
FLOORS = {
    "idle_tls_floor": "idle_tls", "dm_relay_tls_floor": "dm_relay_tls",
    "idle_tls_floor_stdlib": "idle_tls", "dm_relay_tls_floor_stdlib": "dm_relay_tls",
}
STDLIB_FLOORS = tuple(floor for floor in FLOORS if floor.endswith("_stdlib"))

# Sizes per scenario: "quick" finishes the whole run in under 3 minutes on 2 cores, "full" in under 15.
# keepalive_s: every connection sends a keep-alive this often, for both servers. 0.5 s where senders
# burst: ngircd 26 handles what GnuTLS has already read ahead from a socket only once the socket turns
# readable again, so a sender's last messages would otherwise wait for its next write.
SIZES: dict[str, dict[str, dict[str, Any]]] = {
    "idle_tls": {
        "quick": dict(connections=300, idle_s=3, keepalive_s=3, settle_s=1),
        "full": dict(connections=2000, idle_s=60, keepalive_s=15, settle_s=5),
    },
    "dm_relay_tls": {
        "quick": dict(users=50, messages=100, window=20, size=100, timeout_s=60, keepalive_s=0.5),
        "full": dict(users=200, messages=1000, window=20, size=100, timeout_s=240, keepalive_s=0.5),
    },
    "paced_latency_tls": {
        "quick": dict(users=50, rate=10, duration_s=3, size=100, keepalive_s=15),
        "full": dict(users=200, rate=10, duration_s=20, size=100, keepalive_s=15),
    },
    "broadcast_tls": {
        "quick": dict(users=50, broadcasts=4, window=10, size=100, timeout_s=60, keepalive_s=0.5),
        "full": dict(users=200, broadcasts=10, window=10, size=100, timeout_s=240, keepalive_s=0.5),
    },
    "reconnect_storm": {
        "quick": dict(users=250, storm_users=50, paced_users=20, rate=10, calm_s=1, storm_duration_s=3,
                      retry_s=0.2, size=100, timeout_s=30, keepalive_s=15),
        "full": dict(users=2000, storm_users=200, paced_users=50, rate=10, calm_s=2, storm_duration_s=12,
                     retry_s=0.2, size=100, timeout_s=60, keepalive_s=15),
    },
    "offline_backlog": {
        "quick": dict(envelopes=5000, senders=10, window=50, size=200, timeout_s=120, keepalive_s=15),
        "full": dict(envelopes=50000, senders=10, window=50, size=200, timeout_s=300, keepalive_s=15),
    },
    "p2p_direct": {
        "quick": dict(round_trips=500, bulk_messages=20000, window=64, size=1024),
        "full": dict(round_trips=5000, bulk_messages=200000, window=64, size=1024),
    },
}
SIZES |= {floor: SIZES[of] for floor, of in FLOORS.items()}

DESCRIPTIONS = {
    "idle_tls": "authenticated idle TLS connections with keep-alives: server RSS per connection, idle CPU",
    "idle_tls_floor": "idle_tls against a bare Twisted TLS line relay with our server's TLS options: what our "
                      "own code adds to what Twisted, pyOpenSSL and OpenSSL cost per connection",
    "dm_relay_tls": "server-relayed direct messages in a burst (window per sender): deliveries/s, CPU per delivery",
    "dm_relay_tls_floor": "dm_relay_tls against the bare Twisted TLS line relay: what our own code adds per "
                          "relayed message",
    "idle_tls_floor_stdlib": "idle_tls_floor with the relay's TLS on Python's ssl module instead of pyOpenSSL",
    "dm_relay_tls_floor_stdlib": "dm_relay_tls_floor with the relay's TLS on Python's ssl module instead of pyOpenSSL",
    "paced_latency_tls": "users sending 10 messages/s each: delivery latency p50/p99",
    "broadcast_tls": "presence fan-out while users log in, then broadcasts to every other user",
    "reconnect_storm": "server restart with users online: time until all are back; then a password-login "
                       "storm while online users exchange paced messages",
    "offline_backlog": "envelopes stored for one offline user, then delivered at its login, "
                       "against a raw sqlite3 loop with the same durability",
    "p2p_direct": "a direct peer link (TLS 1.3 mTLS JSON lines) against a plain TLS echo: RTT and bulk throughput",
}

BASELINES = {name: "ngircd" for name in SIZES} | {
    **dict.fromkeys(FLOORS, "bare Twisted TLS line relay (bench.relay)"),
    **dict.fromkeys(STDLIB_FLOORS, "bare Twisted line relay, TLS on Python's ssl (bench.relay --stack stdlib)"),
    "offline_backlog": "raw sqlite3 loop",
    "p2p_direct": "plain TLS echo (Python ssl)",
}

# (what the issue asks, "ratio" or "ours", metric, comparison, bound)
TARGETS: dict[str, list[tuple[str, str, str, str, float]]] = {
    "idle_tls": [
        ("RSS per connection <= 2.0x ngircd", "ratio", "rss_per_conn_kib", "<=", 2.0),
        ("idle CPU <= 2x ngircd", "ratio", "idle_cpu_s", "<=", 2.0),
    ],
    **{floor: [] for floor in FLOORS},
    "dm_relay_tls": [
        ("deliveries/s >= 1.0x ngircd", "ratio", "deliveries_per_s", ">=", 1.0),
        ("CPU per delivery <= 1.3x ngircd", "ratio", "cpu_per_delivery_us", "<=", 1.3),
    ],
    "paced_latency_tls": [
        ("p99 <= 5 ms", "ours", "p99_ms", "<=", 5.0),
        ("p50 <= 1.5 ms", "ours", "p50_ms", "<=", 1.5),
    ],
    "broadcast_tls": [("deliveries/s >= 0.6x ngircd", "ratio", "deliveries_per_s", ">=", 0.6)],
    "reconnect_storm": [
        ("all back online within 5 s", "ours", "back_after_start_s", "<=", 5.0),
        ("no failed login", "ours", "failed_logins", "<=", 0),
        ("p99 during a login storm <= 20 ms", "ours", "storm_p99_ms", "<=", 20.0),
    ],
    "offline_backlog": [
        ("store rate >= 0.5x raw loop", "ratio", "store_per_s", ">=", 0.5),
        ("delivery rate >= 0.5x raw loop", "ratio", "deliver_per_s", ">=", 0.5),
    ],
    "p2p_direct": [
        ("bulk throughput >= 0.5x plain TLS echo", "ratio", "bulk_mb_per_s", ">=", 0.5),
        ("RTT p99 <= 2 ms", "ours", "rtt_p99_ms", "<=", 2.0),
    ],
}


class DriverError(Exception):
    """A driver process failed or broke the mark protocol."""


class Bench:
    """One invocation: the options, the work directory and every process started."""

    def __init__(self, args: argparse.Namespace, procs: Processes, workdir: Path) -> None:
        self.mode = "quick" if args.quick else "full"
        self.procs = procs
        self.workdir = workdir
        self.ngircd = ircd.find_ngircd()
        self.data_dir = workdir / "ours-data"
        self.tokens = workdir / "tokens.json"
        self.overrides = {"idle_tls": {"connections": args.idle_connections}} if args.idle_connections else {}
        self.client_writes = args.client_writes
        self._runs = 0

    def params(self, scenario: str) -> dict[str, Any]:
        p = {**SIZES[scenario][self.mode], **self.overrides.get(FLOORS.get(scenario, scenario), {})}
        if scenario != "p2p_direct":  # the one scenario without the load generator
            p["client_writes"] = self.client_writes
        return p

    def name(self, what: str) -> str:
        self._runs += 1
        return f"{self._runs:03d}-{what}"

    def start_ours(self, *extra: str) -> Server:
        server = discovery_server(self.procs, self.workdir, self.data_dir, self.name("p2pdiscovery"), *extra)
        server.start()
        return server

    def start_ngircd(self) -> Server:
        server = ngircd_server(self.procs, self.ngircd, self.workdir, self.name("ngircd"))
        server.start()
        return server

    def start_relay(self, stack: str = "pyopenssl") -> Server:
        server = relay_server(self.procs, self.workdir, self.name("relay"), stack)
        server.start()
        return server

    def drive(
        self, module: str, config: dict, measured: Server | None, timeout: float
    ) -> tuple[dict[str, dict], dict]:
        """
        Run C{python -m MODULE CONFIG} and answer its marks: read the measured process's CPU
        time and RSS (the server, or the driver itself when C{measured} is None), restart the
        server when asked. Returns the readings by mark name and the driver's result.
        """
        log_path = self.workdir / f"{self.name(module.rsplit('.', 1)[-1])}.log"
        argv = [sys.executable, "-m", module, json.dumps({**config, "deadline_s": timeout})]
        proc = self.procs.start_piped(argv, log_path, cwd=REPO, env=child_env())
        lines: queue.Queue[str | None] = queue.Queue()

        def pump() -> None:
            for line in proc.stdout:
                lines.put(line)
            lines.put(None)

        threading.Thread(target=pump, daemon=True).start()
        readings: dict[str, dict] = {}
        deadline = time.monotonic() + timeout + 15
        try:
            while True:
                try:
                    line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
                except queue.Empty:
                    raise DriverError(f"{module} gave no result within {timeout:g} s; see {log_path}") from None
                if line is None:
                    raise DriverError(f"{module} exited without a result; see {log_path}")
                message = json.loads(line)
                if "mark" in message:
                    stats = measured.stats() if measured is not None else proc_stats(proc.pid)
                    reading = {**message, "cpu_s": stats.cpu_s, "main_cpu_s": stats.main_cpu_s, "rss_kib": stats.rss_kib}
                    answer = measured.restart() if message.get("restart") else {}
                    readings[message["mark"]] = {**reading, **answer}
                    proc.stdin.write(json.dumps(answer) + "\n")
                    proc.stdin.flush()
                elif "result" in message:
                    return readings, message["result"]
                else:
                    raise DriverError(f"{module}: {message.get('error')} {message.get('counts', '')}; see {log_path}")
        finally:
            self.procs.stop(proc)

    def loadgen(
        self, side: str, scenario: str, params: dict, timeout: float, server_args: tuple = (), baseline: str = "irc"
    ) -> tuple:
        """Run the load generator's C{scenario} against our server or the C{baseline} (irc, relay or
        relay-stdlib: the relay with its TLS on Python's ssl module)."""
        kind = "ours" if side == "ours" else baseline
        server = {
            "ours": lambda: self.start_ours(*server_args),
            "irc": self.start_ngircd,
            "relay": self.start_relay,
            "relay-stdlib": lambda: self.start_relay("stdlib"),
        }[kind]()
        try:
            config = {
                "server": kind.removesuffix("-stdlib"),  # the relay's protocol either way
                "port": server.port,
                "scenario": scenario,
                "params": params,
                "tokens": str(self.tokens),
            }
            readings, result = self.drive("bench.loadgen", config, server, timeout)
        finally:
            server.stop()
        return readings, result

    def prepare(self, users: int) -> dict:
        """Register the load users on our server once and keep a session token for each (not timed)."""
        started = time.monotonic()
        server = self.start_ours("--hash-threads", str(os.cpu_count() or 1))
        try:
            config = {"server": "ours", "port": server.port, "scenario": "prepare", "tokens": str(self.tokens),
                      "params": {"users": users, "concurrency": 8}}
            _, result = self.drive("bench.loadgen", config, None, 1800)
        finally:
            server.stop()
        return {**result, "users": users, "setup_s": time.monotonic() - started}


# -- readings -> metrics -------------------------------------------------------------------


def _cpu_spent(readings: dict, first: str, last: str, key: str) -> float:
    """CPU time C{key} between two marks, rounded to the microsecond (so that the float arithmetic's
    last digits do not show in the figures)."""
    return round(readings[last].get(key, 0) - readings[first].get(key, 0), 6)


def between(readings: dict, first: str, last: str) -> tuple[float, float, float]:
    """Wall time, measured process CPU and load generator CPU between two marks."""
    wall = readings[last]["t"] - readings[first]["t"]
    return wall, _cpu_spent(readings, first, last, "cpu_s"), _cpu_spent(readings, first, last, "loadgen_cpu_s")


def _main_cpu(readings: dict, first: str, last: str) -> float:
    """CPU time of the measured process's main thread between two marks."""
    return _cpu_spent(readings, first, last, "main_cpu_s")


def _errors(result: dict) -> dict:
    """The error count (a metric) and the load generator's counters (context, from the first round)."""
    bad = ("error_", "login_failed", "connect_failed", "traffic_timeout", "presence_timeout", "deliver_timeout")
    counts = result.get("counts", {})
    return {"errors": sum(n for name, n in counts.items() if name.startswith(bad)), "counts": counts}


def _traffic_metrics(readings: dict, result: dict, first: str, last: str, name: str = "deliveries") -> dict:
    wall, cpu, loadgen_cpu = between(readings, first, last)
    delivered = result[name]
    return {
        f"{name}_per_s": result[f"{name}_per_s"],
        "cpu_per_delivery_us": cpu / delivered * 1e6 if delivered else math.nan,
        "server_cpu_util": cpu / wall,
        "loadgen_cpu_util": loadgen_cpu / wall,
        # Near one core, the load generator may be what limits the rate, not the server.
        "loadgen_bound": loadgen_cpu / wall >= 0.9,
        "p50_ms": result["p50_ms"],
        "p99_ms": result["p99_ms"],
        "max_ms": result["max_ms"],
        name: delivered,
        "lost": result[f"{name}_expected"] - delivered,
        **_errors(result),
    }


def run_idle_tls(bench: Bench, side: str, p: dict, baseline: str = "irc") -> dict:
    readings, result = bench.loadgen(side, "idle_tls", p, timeout=p["idle_s"] + 300, baseline=baseline)
    connections = result["connections"]
    start, connected = readings["start"], readings["connected"]
    idle_wall, idle_cpu, _ = between(readings, "connected", "idle_end")
    return {
        "rss_per_conn_kib": (connected["rss_kib"] - start["rss_kib"]) / connections,
        "idle_cpu_s": idle_cpu,
        "idle_cpu_pct": idle_cpu / idle_wall * 100,
        "connect_s": result["connect_s"],
        "connect_cpu_per_conn_ms": (connected["cpu_s"] - start["cpu_s"]) / connections * 1e3,
        "rss_start_kib": start["rss_kib"],
        "rss_connected_kib": connected["rss_kib"],
        "connections": connections,
        "still_online": result["still_online"],
        **_errors(result),
    }


def run_dm_relay_tls(bench: Bench, side: str, p: dict, baseline: str = "irc") -> dict:
    readings, result = bench.loadgen(side, "dm_relay_tls", p, timeout=p["timeout_s"] + 120, baseline=baseline)
    return _traffic_metrics(readings, result, "start", "end")


def run_paced_latency_tls(bench: Bench, side: str, p: dict) -> dict:
    readings, result = bench.loadgen(side, "paced_latency_tls", p, timeout=p["duration_s"] + 120)
    return {**_traffic_metrics(readings, result, "start", "end"), "offered_per_s": result["offered_per_s"]}


def run_broadcast_tls(bench: Bench, side: str, p: dict) -> dict:
    readings, result = bench.loadgen(side, "broadcast_tls", p, timeout=2 * p["timeout_s"] + 120)
    _, presence_cpu, _ = between(readings, "start", "presence_end")
    presence, pairs = result["presence_deliveries"], result["presence_pairs"]
    return {
        **_traffic_metrics(readings, result, "presence_end", "end"),
        # Pairs of users who have heard of each other: the same n(n-1)/2 for both servers.
        "presence_per_s": pairs / result["presence_s"],
        "presence_cpu_per_delivery_us": presence_cpu / presence * 1e6 if presence else math.nan,
        "presence_deliveries": presence,
        "presence_lost": result["presence_expected"] - pairs,
    }


def run_reconnect_storm(bench: Bench, side: str, p: dict) -> dict:
    readings, result = bench.loadgen(side, "reconnect_storm", p, timeout=2 * p["timeout_s"] + 300)
    keys = ("back_after_start_s", "back_after_ready_s", "server_start_s", "failed_logins", "back_online",
            "storm_p50_ms", "storm_p99_ms", "calm_p50_ms", "calm_p99_ms", "storm_login_s", "storm_logins",
            "storm_messages")
    return {
        **{k: result[k] for k in keys},
        # CPU of the new process from its start until everyone is back.
        "restart_cpu_s": readings["back"]["cpu_s"],
        "restart_cpu_per_user_ms": readings["back"]["cpu_s"] / p["users"] * 1e3,
        **_errors(result),
    }


def run_offline_backlog(bench: Bench, side: str, p: dict) -> dict:
    if side == "ours":
        readings, result = bench.loadgen(side, "offline_backlog", p, timeout=2 * p["timeout_s"] + 60)
    else:
        path = bench.workdir / f"{bench.name('rawstore')}.sqlite3"
        config = {"path": str(path), "envelopes": p["envelopes"], "senders": p["senders"],
                  "batch": p["senders"] * p["window"], "size": p["size"]}
        readings, result = bench.drive("bench.rawstore", config, None, 2 * p["timeout_s"])
        for suffix in ("", "-wal", "-shm"):
            Path(f"{path}{suffix}").unlink(missing_ok=True)
    store_wall, store_cpu, store_loadgen_cpu = between(readings, "store_start", "store_end")
    deliver_wall, deliver_cpu, deliver_loadgen_cpu = between(readings, "store_end", "deliver_end")
    return {
        "store_per_s": result["store_per_s"],
        "deliver_per_s": result["deliver_per_s"],
        "store_s": result["store_s"],
        "deliver_s": result["deliver_s"],
        "store_cpu_per_envelope_us": store_cpu / result["stored"] * 1e6,
        "deliver_cpu_per_envelope_us": deliver_cpu / max(1, result["received"]) * 1e6,
        # Which of the two processes, and which thread of the server, were busy: the server's
        # threads share one interpreter lock.
        "store_server_cpu_util": store_cpu / store_wall,
        "store_main_thread_cpu_util": _main_cpu(readings, "store_start", "store_end") / store_wall,
        "store_loadgen_cpu_util": store_loadgen_cpu / store_wall,
        "deliver_server_cpu_util": deliver_cpu / deliver_wall,
        "deliver_main_thread_cpu_util": _main_cpu(readings, "store_end", "deliver_end") / deliver_wall,
        "deliver_loadgen_cpu_util": deliver_loadgen_cpu / deliver_wall,
        "stored": result["stored"],
        "received": result["received"],
        **_errors(result),
    }


def run_p2p_direct(bench: Bench, side: str, p: dict) -> dict:
    from bench.p2p import run_p2p

    return run_p2p(bench, side, p)


RUNNERS: dict[str, Callable[[Bench, str, dict], dict]] = {
    "idle_tls": run_idle_tls,
    "dm_relay_tls": run_dm_relay_tls,
    "paced_latency_tls": run_paced_latency_tls,
    "broadcast_tls": run_broadcast_tls,
    "reconnect_storm": run_reconnect_storm,
    "offline_backlog": run_offline_backlog,
    "p2p_direct": run_p2p_direct,
}
RUNNERS |= {
    floor: partial(RUNNERS[of], baseline="relay-stdlib" if floor in STDLIB_FLOORS else "relay")
    for floor, of in FLOORS.items()
}


def users_needed(bench: Bench, scenarios: list[str]) -> int:
    """How many registered load users our server needs for these scenarios."""
    counts = [0]
    for name in scenarios:
        p = bench.params(name)
        counts.append({
            "idle_tls": p.get("connections", 0),
            "reconnect_storm": p.get("users", 0) + p.get("storm_users", 0) + p.get("paced_users", 0),
            "offline_backlog": p.get("senders", 0) + 1,
            "p2p_direct": 0,
        }.get(FLOORS.get(name, name), p.get("users", 0)))
    return max(counts)


# -- results -------------------------------------------------------------------------------


def check_targets(name: str, ours: dict, ratio: dict) -> list[dict]:
    checks = []
    for label, of, metric, comparison, bound in TARGETS[name]:
        value = (ratio if of == "ratio" else ours).get(metric)
        met = None
        if isinstance(value, (int, float)) and not math.isnan(value):
            met = value <= bound if comparison == "<=" else value >= bound
        checks.append({"target": label, "of": of, "metric": metric, "value": value, "met": met})
    return checks


def summarise(name: str, p: dict, rounds: dict[str, list[dict]], notes: list[str]) -> dict:
    good = {side: [r for r in rs if "failed" not in r] for side, rs in rounds.items()}
    ours = median_metrics(good["ours"]) if good["ours"] else {}
    baseline = median_metrics(good["baseline"]) if good["baseline"] else {}
    ratio = ratios(ours, baseline) if ours and baseline else {}
    return {
        "description": DESCRIPTIONS[name],
        "baseline_is": BASELINES[name],
        "params": p,
        "ours": ours,
        "baseline": baseline,
        "ratio": ratio,
        "targets": check_targets(name, ours, ratio),
        "notes": notes,
        "rounds": rounds,
    }


def machine_info(bench: Bench) -> dict:
    import OpenSSL
    import twisted

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    memory = next((line.split()[1] for line in Path("/proc/meminfo").read_text().splitlines()
                   if line.startswith("MemTotal")), "0")
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_mib": int(memory) // 1024,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "twisted": twisted.__version__,
        "openssl": OpenSSL.SSL.OpenSSL_version(OpenSSL.SSL.OPENSSL_VERSION).decode(),
        "ngircd": ircd.ngircd_version(bench.ngircd) if bench.ngircd else None,
        "loadavg_at_start": os.getloadavg(),
    }


def _json_safe(value: Any) -> Any:
    """JSON has no NaN or infinity: write null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def write_results(results: dict, output: Path) -> None:
    output.mkdir(parents=True, exist_ok=True)
    scratch = output / "latest.json.tmp"
    scratch.write_text(json.dumps(_json_safe(results), indent=1) + "\n")
    scratch.replace(output / "latest.json")


def print_summary(name: str, entry: dict) -> None:
    print(f"== {name} (baseline: {entry['baseline_is']}; {entry['duration_s']:.0f} s)", flush=True)
    for metric in dict.fromkeys([*entry["ours"], *entry["baseline"]]):
        ours, baseline = entry["ours"].get(metric), entry["baseline"].get(metric)
        if _fmt(ours) != "-" or _fmt(baseline) != "-":
            ratio = entry["ratio"].get(metric)
            print(f"   {metric:32} ours {_fmt(ours):>12}   baseline {_fmt(baseline):>12}   ratio {_fmt(ratio):>8}")
    for check in entry["targets"]:
        verdict = {True: "MET", False: "MISSED", None: "n/a"}[check["met"]]
        print(f"   target: {check['target']:45} {_fmt(check['value']):>10}  {verdict}")
    for note in entry["notes"]:
        print(f"   note: {note}")


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, (int, float)) and not isinstance(value, bool) else "-"


# -- main ----------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="Benchmarks p2pchat against ngircd, a raw sqlite3 loop and a plain TLS echo (and a bare Twisted TLS relay, when asked).",
    )
    parser.add_argument("--quick", action="store_true", help="small sizes: the whole run in under 3 minutes")
    parser.add_argument("--scenarios", default=",".join(name for name in SIZES if name not in FLOORS),
                        help=f"comma-separated, from: {', '.join(SIZES)} (default: all but {', '.join(FLOORS)})")
    parser.add_argument("--rounds", type=int, default=3, help="A B rounds per scenario (default: 3)")
    parser.add_argument("--idle-connections", type=int, default=0,
                        help="connections in idle_tls and idle_tls_floor (default 2000, --quick 300); try 10000 with the memory for it")
    parser.add_argument("--client-writes", choices=loadgen.CLIENT_WRITES, default="coalesced",
                        help="how the load users' writes go out, the same for both servers: coalesced (default: "
                             "Twisted's client TLS as it comes, each reactor pass's writes together in records of up "
                             "to 16 KiB), records (a TLS record per write of at most 2048 bytes), prompt (records, "
                             "each sent at once, as from a process per client)")
    parser.add_argument("--output", type=Path, default=RESULTS, help="where latest.json and latest.png go")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (server logs, databases)")
    args = parser.parse_args(argv)
    args.scenarios = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    unknown = [s for s in args.scenarios if s not in SIZES]
    if unknown:
        parser.error(f"unknown scenario(s): {', '.join(unknown)}")
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # A plain kill stops the run like Ctrl-C does: every process started is stopped.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    workdir = Path(tempfile.mkdtemp(prefix="p2pchat-bench-"))
    started = time.monotonic()
    with Processes() as procs:
        bench = Bench(args, procs, workdir)
        results: dict[str, Any] = {
            "scenarios": {},
            "machine": machine_info(bench),
            "run": {"mode": bench.mode, "rounds": args.rounds, "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                    "workdir": str(workdir) if args.keep else None},
        }
        if not bench.ngircd:
            print(f"ngircd is not installed: the ngircd baselines are skipped. Install it with: {ircd.INSTALL_COMMAND}",
                  flush=True)
        try:
            needed = users_needed(bench, args.scenarios)
            if needed:
                print(f"preparing {needed} load users on our server (registration, with a session token each; not timed) ...",
                      flush=True)
                results["run"]["setup"] = bench.prepare(needed)
            for name in args.scenarios:
                run_scenario(bench, name, args.rounds, results["scenarios"])
                print_summary(name, results["scenarios"][name])
                write_results(results, args.output)
        except KeyboardInterrupt:
            results["run"]["interrupted"] = True
            print("interrupted: stopping every process started, writing what was measured", flush=True)
        finally:
            results["run"]["duration_s"] = time.monotonic() - started
            write_results(results, args.output)
            if not args.keep:
                shutil.rmtree(workdir, ignore_errors=True)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("matplotlib is missing (pip install .[bench]): no chart", flush=True)
    else:
        from bench.chart import write_chart

        write_chart(results, args.output / "latest.png")
    print(f"wrote {args.output / 'latest.json'} in {results['run']['duration_s']:.0f} s", flush=True)
    return 130 if results["run"].get("interrupted") else 0


def run_scenario(bench: Bench, name: str, rounds: int, into: dict) -> None:
    """Run C{name} A B A B ...; C{into[name]} holds the summary of the runs so far after each one."""
    started = time.monotonic()
    p = bench.params(name)
    notes = []
    sides = ["ours", "baseline"]
    if BASELINES[name] == "ngircd" and not bench.ngircd:
        sides = ["ours"]
        notes.append(f"baseline skipped: ngircd is not installed ({ircd.INSTALL_COMMAND})")
    runs: dict[str, list[dict]] = {"ours": [], "baseline": []}
    for number in range(rounds):
        for side in sides:
            print(f"-- {name} round {number + 1}/{rounds}: {side}", flush=True)
            try:
                runs[side].append(RUNNERS[name](bench, side, p))
            except Exception as e:  # a failed run is reported, and the others still run
                print(f"   failed: {type(e).__name__}: {e}", flush=True)
                runs[side].append({"failed": f"{type(e).__name__}: {e}"})
            into[name] = {**summarise(name, p, runs, notes), "duration_s": time.monotonic() - started}

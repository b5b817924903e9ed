"""The baseline server: ngircd from Debian, configured for TLS on ECDSA P-256, flood penalty off."""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
from pathlib import Path

from bench.certs import write_certificate

INSTALL_COMMAND = "apt-get install -y ngircd"
CHANNEL = "#bench"

# RFC 7919 ffdhe2048: without a DHFile ngircd generates parameters at every start (up to a
# second here), which would count against it in the restart scenario.
FFDHE2048 = """\
-----BEGIN DH PARAMETERS-----
MIIBCAKCAQEA//////////+t+FRYortKmq/cViAnPTzx2LnFg84tNpWp4TZBFGQz
+8yTnc4kmz75fS/jY2MMddj2gbICrsRhetPfHtXV/WVhJDP1H18GbtCFY2VVPe0a
87VXE15/V8k1mE8McODmi3fipona8+/och3xWKE2rec1MKzKT0g6eXq8CrGCsyT7
YdEIqUuyyOP7uWrat2DX9GgdT0Kj3jlN9K5W7edjcrsZCwenyO4KbXCeAvzhzffi
7MA0BM0oNC9hkXL+nOmFg/+OTxIy7vKBg8P+OxtMb61zO7X8vC7CIAXFjvGDfRaD
ssbzSibBsu/6iGtCOGEoXJf//////////wIBAg==
-----END DH PARAMETERS-----
"""


def find_ngircd() -> str | None:
    """The path of the ngircd binary, or C{None} when it is not installed."""
    return shutil.which("ngircd") or next(
        (p for p in ("/usr/sbin/ngircd", "/usr/local/sbin/ngircd") if os.access(p, os.X_OK)), None
    )


def ngircd_version(binary: str) -> str:
    out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=10).stdout
    return out.splitlines()[0] if out else "unknown"


def write_config(directory: Path, port: int) -> Path:
    """
    Write ngircd.conf and its certificate into C{directory}; TLS only, on 127.0.0.1:PORT.

    Run as root, ngircd drops to "nobody" after reading its configuration, so the key is
    handed to that user (REHASH re-reads it).
    """
    cert, key = write_certificate(directory, "ngircd")
    include_dir = directory / "conf.d"
    include_dir.mkdir()
    dh_file = directory / "ffdhe2048.pem"
    dh_file.write_text(FFDHE2048)
    conf = directory / "ngircd.conf"
    conf.write_text(
        f"""\
[Global]
\tName = bench.localhost
\tInfo = p2pchat benchmark baseline
\tListen = 127.0.0.1
\tMotdPhrase = bench
\tAdminInfo1 = p2pchat benchmark
\tAdminInfo2 = localhost
\tAdminEMail = bench@localhost

[Limits]
\t# Every load user comes from 127.0.0.1.
\tMaxConnections = 0
\tMaxConnectionsIP = 0
\tMaxJoins = 0
\tMaxNickLength = 30
\t# 0 disables the flood penalty (ngircd.conf(5), "MaxPenaltyTime").
\tMaxPenaltyTime = 0
\tPingTimeout = 120
\tPongTimeout = 60

[Options]
\tDNS = no
\tIdent = no
\tPAM = no
\t# An empty directory: no system-wide snippets from /etc/ngircd.
\tIncludeDir = {include_dir}

[SSL]
\tCertFile = {cert}
\tKeyFile = {key}
\tDHFile = {dh_file}
\tPorts = {port}
"""
    )
    if os.geteuid() == 0:
        nobody = pwd.getpwnam("nobody")
        os.chown(key, nobody.pw_uid, nobody.pw_gid)
        directory.chmod(0o755)
    return conf


def ngircd_argv(binary: str, conf: Path) -> list[str]:
    """Foreground (-n), our configuration only (-f)."""
    return [binary, "--nodaemon", "--config", str(conf)]

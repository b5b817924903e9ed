"""Benchmarks of p2pchat against ngircd, a raw sqlite3 loop and a plain TLS echo; run C{python -m bench}."""

